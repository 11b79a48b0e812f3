"""Image-code datasets (megatron_m6/data/image_codes.py, tools/encode_image_codes.py): every
document's codes equal the tokenizer's encoding of the image prepared here independently (Pillow
and numpy, not the module's pixel helper), its caption ids decode to the NFKC-folded caption,
for both input kinds; the metadata identifies the tokenizer, another tokenizer is refused in one
line, bad images are counted, and the tool's errors are one line without a traceback."""

import base64
import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m6.data.image_codes import (
    check_code_dataset,
    encode_image_codes,
    metadata_path,
    read_code_metadata,
)
from megatron_m6.data.images import JPEG_QUALITY, MAX_ASPECT_RATIO, MIN_IMAGE_SIZE, prepare_image
from megatron_m6.data.indexed import IndexedDataset, dataset_exists
from megatron_m6.data.preprocess import PreprocessConfig, preprocess
from megatron_m6.data.sample_data import draw_scene
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer
from megatron_m6.vision import (
    VQVAE,
    ImageTokenizerError,
    VQConfig,
    image_tensor,
    load_image_tokenizer,
    tensor_to_image,
    tokenizer_info,
)

REPO = Path(__file__).resolve().parents[1]
TINY = VQConfig(image_size=48, downsample=8, codebook_size=32, code_dim=8, channels=16)  # 6x6 codes
NUM_IMAGES = 7


def make_tokenizer(folder: Path, seed: int, cfg: VQConfig = TINY) -> str:
    """An untrained tokenizer whose codebook starts from its encoder's outputs (one training-mode
    forward), so codes vary; saved as tools/train_image_tokenizer.py saves it."""
    torch.manual_seed(seed)
    model = VQVAE(cfg).train()
    with torch.no_grad():
        rng = random.Random(seed)
        images = [np.asarray(draw_scene(rng, cfg.image_size)[0], dtype=np.float32) for _ in range(8)]
        model(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, folder / "tokenizer.pt")
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tokenizers of one shape (seeds 1, 2), a jsonl of pairs (paths and one data URI, captions
    with full-width punctuation, one corrupt image) and the image-text dataset of its good rows."""
    root = tmp_path_factory.mktemp("codes")
    rng = random.Random(0)
    (root / "images").mkdir()
    rows = []
    for i in range(NUM_IMAGES):
        img, caption = draw_scene(rng, 64)
        img.save(root / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "caption": f"{caption}，第{i}张！"})
    with open(root / "images" / "0.png", "rb") as f:
        rows[0]["image"] = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows.insert(3, {"image": "images/broken.jpg", "caption": "坏图"})
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    good = [r for r in rows if "broken" not in r["image"]]
    (root / "good.jsonl").write_text("".join(json.dumps({"image": r["image"], "text": r["caption"]},
                                                        ensure_ascii=False) + "\n" for r in good), encoding="utf-8")
    cfg = PreprocessConfig(inputs=[str(root / "good.jsonl")], output_prefix=str(root / "pp"), image_key="image",
                           image_size=64, progress=False)
    preprocess(cfg)
    (indexed,) = cfg.output_names().values()
    return {"root": root, "jsonl": str(jsonl), "good": good, "indexed": indexed,
            "tok1": make_tokenizer(root / "tok1", 1), "tok2": make_tokenizer(root / "tok2", 2)}


def raw_image(world: dict, value: str) -> bytes:
    if value.startswith("data:"):
        return base64.b64decode(value.partition(",")[2])
    return (world["root"] / value).read_bytes()


def reference_pixels(data: bytes) -> torch.Tensor:
    """[1, 3, 48, 48] in [-1, 1]: the image as preprocessing stores it at the tokenizer's size."""
    jpeg, reason = prepare_image(data, TINY.image_size, JPEG_QUALITY, MIN_IMAGE_SIZE, MAX_ASPECT_RATIO)
    assert reason is None
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1


@pytest.mark.parametrize("kind", ["jsonl", "indexed"])
def test_every_document_holds_its_caption_and_the_codes_of_its_image(world, tmp_path, kind):
    out = str(tmp_path / "codes")
    report = encode_image_codes(world[kind], out, world["tok1"], batch_size=4, max_bad_fraction=0.2)
    model = load_image_tokenizer(world["tok1"])
    tok = M6Tokenizer.from_vocab_file(DEFAULT_VOCAB_FILE)
    if kind == "jsonl":
        images = [raw_image(world, r["image"]) for r in world["good"]]
        assert report.rows == NUM_IMAGES + 1 and report.skipped == {"unreadable_image": 1}
    else:
        source = IndexedDataset(world["indexed"])
        images = [source.image_bytes(2 * d + 1) for d in range(source.num_documents)]
        assert report.rows == NUM_IMAGES and report.skipped == {}
    ds = IndexedDataset(out)
    assert report.documents == ds.num_documents == NUM_IMAGES and not ds.multimodal
    assert ds.dtype == np.uint16  # the shipped vocabulary (21,371 tokens) and 32 codes fit
    stored, expected = [], []
    for d, (row, data) in enumerate(zip(world["good"], images)):
        caption, codes = ds[2 * d], ds[2 * d + 1]
        assert ds.document_indices[d + 1] == 2 * d + 2 and len(codes) == TINY.grid ** 2
        assert tok.decode(caption.tolist()) == unicodedata.normalize("NFKC", row["caption"])
        if kind == "indexed":
            assert caption.tolist() == source[2 * d].tolist()
        want = model.encode(reference_pixels(data))[0]  # one image at a time, unlike the module
        assert codes.astype(np.int64).tolist() == want.reshape(-1).tolist()
        stored.append(torch.from_numpy(codes.astype(np.int64)).reshape(TINY.grid, TINY.grid))
        expected.append(want)
    pixels = model.decode(torch.stack(stored))
    for got, want in zip(pixels, model.decode(torch.stack(expected))):
        assert np.array_equal(np.asarray(tensor_to_image(got)), np.asarray(tensor_to_image(want)))
    meta = json.loads(Path(metadata_path(out)).read_text(encoding="utf-8"))
    assert read_code_metadata(out) == tokenizer_info(model)
    assert meta["vocab_sha256"] == tok.digest and meta["documents"] == NUM_IMAGES
    assert meta["skipped"] == report.skipped and meta["dtype"] == "uint16"


def test_another_tokenizer_is_refused_in_one_line(world, tmp_path):
    out = str(tmp_path / "codes")
    encode_image_codes(world["indexed"], out, world["tok1"])
    check_code_dataset(out, tokenizer_info(load_image_tokenizer(world["tok1"])))
    mine, other = (tokenizer_info(load_image_tokenizer(world[t])) for t in ("tok1", "tok2"))
    with pytest.raises(ImageTokenizerError) as e:
        check_code_dataset(out, other)
    assert str(e.value) == f"{out} was encoded with another image tokenizer: sha256 {mine.sha256} " \
                           f"where {other.sha256} was expected"
    bigger = tokenizer_info(load_image_tokenizer(make_tokenizer(tmp_path / "big", 1, dataclasses.replace(
        TINY, codebook_size=64))))
    with pytest.raises(ImageTokenizerError, match=r"^\S+ was encoded with another image tokenizer: "
                                                  r"codebook_size 32 where 64 was expected$"):
        check_code_dataset(out, bigger)


def test_the_metadata_never_describes_another_run(world, tmp_path, monkeypatch):
    """Re-encoding a prefix with another tokenizer: after every rename or removal (where a kill
    could land) a visible dataset has its own run's metadata. Then a metadata of another run and
    a malformed one are refused."""
    out = str(tmp_path / "codes")
    encode_image_codes(world["indexed"], out, world["tok1"])
    old, new = (tokenizer_info(load_image_tokenizer(world[t])).sha256 for t in ("tok1", "tok2"))
    real_replace, real_remove, states = os.replace, os.remove, []

    def visible_run() -> str | None:
        """The tokenizer digest of the visible dataset's metadata; None while none is visible."""
        if not dataset_exists(out):
            return None
        return json.loads(Path(metadata_path(out)).read_text(encoding="utf-8"))["image_tokenizer"]["sha256"]

    def replace(src, dst):
        real_replace(src, dst)
        states.append((dst == out + ".idx", visible_run()))

    def remove(path):
        real_remove(path)
        states.append((False, visible_run()))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "remove", remove)
    encode_image_codes(world["indexed"], out, world["tok2"])
    monkeypatch.undo()
    new_idx = [i for i, (is_idx, _) in enumerate(states) if is_idx]
    assert len(states) >= 4 and len(new_idx) == 1, states
    for i, (_, run) in enumerate(states):
        assert run in ((new,) if i >= new_idx[0] else (None, old)), states
    assert states[-1][1] == new
    meta = json.loads(Path(metadata_path(out)).read_text(encoding="utf-8"))
    Path(metadata_path(out)).write_text(json.dumps({**meta, "documents": 3}), encoding="utf-8")
    with pytest.raises(ImageTokenizerError, match="describes 3 documents but .* holds 7"):
        check_code_dataset(out, read_code_metadata(out))
    Path(metadata_path(out)).write_text("{", encoding="utf-8")
    with pytest.raises(ImageTokenizerError, match=r"image_codes.json is malformed \(JSONDecodeError"):
        read_code_metadata(out)


def test_unreadable_images_above_the_bad_fraction_stop_the_run(world, tmp_path):
    out = str(tmp_path / "codes")
    with pytest.raises(ValueError, match=r"^1 of the first 8 rows have no usable image \(1 unreadable_image\), "
                                         r"more than --max-bad-fraction 0.0 \(first: .*pairs.jsonl:4, "):
        encode_image_codes(world["jsonl"], out, world["tok1"])
    assert not os.listdir(tmp_path)  # nothing, not even temporary files


def test_pixels_round_trip_and_clamp(world):
    png = (world["root"] / "images" / "1.png").read_bytes()
    t = image_tensor(png, 64)
    assert t.shape == (3, 64, 64) and -1 <= t.min() and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(t)), np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    assert np.asarray(tensor_to_image(torch.tensor([3.0, -2.0, 0.0]).reshape(3, 1, 1))).tolist() == [[[255, 0, 128]]]
    assert image_tensor(b"not an image", 64) is None


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/encode_image_codes.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(done: subprocess.CompletedProcess, code: int = 1) -> str:
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_the_tool_encodes_and_its_errors_are_one_line(world, tmp_path):
    out = str(tmp_path / "codes")
    done = run_tool("--input", world["indexed"], "--output-prefix", out, "--image-tokenizer", world["tok1"])
    assert done.returncode == 0, done.stderr
    (summary,) = done.stdout.strip().splitlines()
    assert summary.startswith(f"{out}: 7 documents of 6x6 codes (codebook 32) from 7 rows in ")
    assert summary.endswith("skipped: none") and read_code_metadata(out).grid == 6
    missing = str(tmp_path / "nothing")
    assert one_error_line(run_tool("--input", world["indexed"], "--output-prefix", out, "--image-tokenizer",
                                   missing)) == \
        f"error: image tokenizer {missing} not found (train one with tools/train_image_tokenizer.py)"
    assert one_error_line(run_tool("--input", missing, "--output-prefix", out, "--image-tokenizer", world["tok1"])) \
        == f"error: input {missing} is neither a jsonl file nor an indexed dataset prefix (PREFIX.bin and PREFIX.idx)"
    plain = world["indexed"]
    assert one_error_line(run_tool("--check", plain, "--image-tokenizer", world["tok1"])) == \
        f"error: {plain} is not an image-code dataset (no {plain}.image_codes.json): make it with " \
        "tools/encode_image_codes.py"
    usage = run_tool("--image-tokenizer", world["tok1"])  # argparse's usage line, then the error
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert usage.stderr.strip().splitlines()[-1] == \
        "encode_image_codes.py: error: give --input and --output-prefix (or --check PREFIX)"
