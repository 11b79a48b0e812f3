"""Pixels in and out of the image tokenizer: encoded image bytes -> a [-1, 1] tensor, and back.

The tokenizer's training tool, the code datasets (megatron_m6/data/image_codes.py) and generation
all need the same two conversions; one copy here keeps their pixels identical.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from megatron_m6.data.images import resize_and_crop, to_rgb


def image_tensor(data: bytes, size: int) -> torch.Tensor | None:
    """size x size RGB in [-1, 1], [3, size, size], resized and cropped as preprocessing does;
    None for an image Pillow cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = resize_and_crop(to_rgb(ImageOps.exif_transpose(img)), size)
    except (OSError, ValueError, SyntaxError, TypeError, EOFError, IndexError, KeyError):
        return None  # what Pillow raises on unreadable or truncated files
    pixels = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] (a decoder's output may overshoot: clamped) -> an RGB image, each
    value rounded to the nearest of 0..255, so image_tensor's pixels come back exactly."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(t.shape)}")
    values = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).numpy(), "RGB")
