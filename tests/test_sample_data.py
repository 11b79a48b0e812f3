import io
import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_m6.data.sample_data import (
    CELL_NAMES,
    COLOUR_JITTER,
    COLOURS,
    COUNT_WORDS,
    SHAPES,
    cell_box,
    draw_scene,
    make_sample_data,
    make_text_corpus,
)
from megatron_m6.tokenizer import M6Tokenizer, build_vocab

CAPTION_RE = re.compile(f"^({'|'.join(CELL_NAMES)})有({'|'.join(COUNT_WORDS)})个"
                        f"({'|'.join(COLOURS)})的({'|'.join(SHAPES)})$")
REPO = Path(__file__).resolve().parents[1]


def parse_caption(caption):
    m = CAPTION_RE.match(caption)
    assert m, f"caption {caption!r} does not parse"
    return CELL_NAMES.index(m[1]), COUNT_WORDS.index(m[2]) + 1, m[3], m[4]


def blobs(mask):
    """8-connected components of a boolean mask, as lists of (y, x) pixels (flood fill)."""
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, pixels = True, [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, mask.shape[0])):
                for nx in range(max(x - 1, 0), min(x + 2, mask.shape[1])):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        found.append(pixels)
    return found


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def scenes(seed, n, size=96):
    rng = random.Random(seed)
    return [draw_scene(rng, size) for _ in range(n)]


def test_draw_scene_is_deterministic():
    a, b, c = scenes(1, 10), scenes(1, 10), scenes(2, 10)
    assert [t for _, t in a] == [t for _, t in b]
    assert [png_bytes(i) for i, _ in a] == [png_bytes(i) for i, _ in b]
    assert [png_bytes(i) for i, _ in a] != [png_bytes(i) for i, _ in c]
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    assert draw_scene(g1, 64)[1] == draw_scene(g2, 64)[1]


@pytest.mark.parametrize("size", [96, 48])
def test_image_matches_caption(size):
    for img, caption in scenes(3, 30, size):
        cell, count, colour, _ = parse_caption(caption)
        pixels = np.asarray(img, dtype=np.int16)
        assert pixels.shape == (size, size, 3)
        # Drawn without antialiasing into a lossless PNG: a pixel is white or the caption's colour
        # jittered by at most COLOUR_JITTER (+5 slack); named colours are >= 160 apart, white >= 215.
        near = (np.abs(pixels - np.array(COLOURS[colour])) <= COLOUR_JITTER + 5).all(-1)
        assert (near | (pixels == 255).all(-1)).all(), "pixels other than white and the colour"
        found = blobs(near)
        assert len(found) == count, caption
        x0, y0, x1, y1 = cell_box(cell, size)
        assert all(y0 <= y < y1 and x0 <= x < x1 for b in found for y, x in b), caption


def test_make_sample_data(tmp_path):
    summary = make_sample_data(str(tmp_path), num_train_images=20, num_test_images=5,
                               num_text_docs=50, image_size=64, seed=7, vocab_size=500)
    assert (summary["train_images"], summary["test_images"], summary["text_docs"]) == (20, 5, 50)
    assert not list(tmp_path.rglob(".*.tmp")), "temporary files left behind"
    captions = []
    for split, n in (("train", 20), ("test", 5)):
        rows = [json.loads(line) for line in (tmp_path / f"captions_{split}.jsonl").read_text("utf-8").splitlines()]
        assert len(rows) == n
        for i, row in enumerate(rows):
            assert set(row) == {"image", "text"} and row["image"] == f"images/{split}_{i:05d}.png"
            parse_caption(row["text"])
            with Image.open(tmp_path / row["image"]) as img:
                assert img.size == (64, 64) and img.mode == "RGB"
            captions.append(row["text"])
    docs = [json.loads(line) for line in (tmp_path / "text.jsonl").read_text("utf-8").splitlines()]
    assert len(docs) == 50 and all(set(d) == {"text"} and d["text"] for d in docs)
    tok = M6Tokenizer.from_vocab_file(str(tmp_path / "vocab.txt"))
    assert tok.vocab_size == summary["vocab_size"]
    for caption in captions:
        assert tok.encode(caption) == [tok.token_to_id(c) for c in caption]
    for d in docs:
        assert tok.unk_id not in tok.encode(d["text"])


def test_make_sample_data_is_deterministic(tmp_path):
    def run(name, seed):
        make_sample_data(str(tmp_path / name), 6, 2, 20, 48, seed, 300)
        return {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a == b
    assert a[Path("captions_train.jsonl")] != c[Path("captions_train.jsonl")]
    assert a[Path("text.jsonl")] != c[Path("text.jsonl")]


def test_corpus_round_trips_through_tokenizer(tmp_path):
    docs = make_text_corpus(300, seed=0)
    assert len(set(docs)) > 200 and any(re.search("[a-z]", d, re.I) for d in docs)
    tok = build_vocab(docs, str(tmp_path / "vocab.txt"), vocab_size=1000)
    for d in docs:
        assert tok.decode(tok.encode(d)) == unicodedata.normalize("NFKC", d).lower()


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "tools/prepare_sample_data.py", "--output-dir", str(tmp_path),
                          "--num-train-images", "3", "--num-test-images", "1", "--num-text-docs", "5",
                          "--image-size", "48", "--vocab-size", "200"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "train_images=3" in out
    assert (tmp_path / "vocab.txt").is_file()
