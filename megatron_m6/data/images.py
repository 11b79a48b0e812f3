"""Images for the corpus: decoded once, normalised, and stored as JPEG at the training resolution.

Decoding, EXIF orientation, conversion to RGB, resize and centre crop all happen here, at
preprocessing time, so a DataLoader worker only decodes a small JPEG. Images that cannot be used
are reported with a reason instead of raising.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_NOT_FOUND, BAD_BASE64 = "image_not_found", "bad_base64"
UNREADABLE, TRUNCATED, TOO_SMALL, EXTREME_ASPECT, TOO_LARGE = (
    "unreadable_image", "truncated_image", "too_small", "extreme_aspect", "too_large")
# How images are kept unless told otherwise, by preprocessing (its flags' defaults) and fine-tuning.
JPEG_QUALITY, MIN_IMAGE_SIZE, MAX_ASPECT_RATIO = 90, 64, 3.0
_BASE64_RE = re.compile(r"[A-Za-z0-9+/=\s]+")


def load_image_bytes(value: str, base_dir: str) -> tuple[bytes | None, str | None]:
    """The encoded image a jsonl "image" field points to: a data URI, a path (relative to the
    jsonl's folder) or bare base64. Returns (bytes, None) or (None, reason)."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    elif len(value) < 4096:
        path = os.path.join(base_dir, value)
        if os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    return f.read(), None
            except OSError:
                return None, IMAGE_NOT_FOUND
        if len(value) < 64 or not _BASE64_RE.fullmatch(value):
            return None, IMAGE_NOT_FOUND
    try:
        return base64.b64decode(value, validate=False), None
    except (binascii.Error, ValueError):
        return None, BAD_BASE64


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent parts (alpha, or a palette's transparent colour) on white, and
    16-bit greyscale (modes I;16*, and I as 16-bit PNGs may open) scaled to 8 bits: Pillow's own
    conversion clips every value above 255, which turns such an image white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic, reducing in steps for speed), then the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((w2, h2), Image.BICUBIC, reducing_gap=3.0)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(data: bytes, size: int, quality: int, min_side: int,
                  max_aspect: float) -> tuple[bytes | None, str | None]:
    """Encoded image in any format Pillow reads -> (size x size RGB JPEG bytes, None), or
    (None, reason) for corrupt, truncated, tiny, huge or extremely elongated images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if min(w, h) < min_side:
                    return None, TOO_SMALL
                if max(w, h) > max_aspect * min(w, h):
                    return None, EXTREME_ASPECT
                img.draft("RGB", (size, size))  # JPEG: decode at the smallest scale >= size
                img = to_rgb(ImageOps.exif_transpose(img))
                img = resize_and_crop(img, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, TOO_LARGE
    except UnidentifiedImageError:
        return None, UNREADABLE
    except OSError as e:
        return None, TRUNCATED if "truncated" in str(e) else UNREADABLE
    except (ValueError, SyntaxError, TypeError, EOFError, IndexError, KeyError):
        return None, UNREADABLE  # what Pillow's format plugins raise on malformed headers
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), None
