"""The formats real corpora come in (jsonl.gz, jsonl.zst, parquet, webdataset tars) give the
datasets, skips and counts that the same rows give as plain jsonl: the plain jsonl path, tested
in tests/test_preprocess.py, is the reference."""

import gzip
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from PIL import Image

from megatron_m6.data.indexed import bin_path, idx_path
from megatron_m6.data.preprocess import PreprocessConfig, preprocess
from megatron_m6.data.sample_data import make_text_corpus

CHUNK = 2048  # bytes: several chunks per file, handed to the workers out of order


def build(tmp_path, name, inputs, **kw):
    cfg = PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / f"out_{name}" / "c"),
                           progress=False, workers=2, chunk_bytes=CHUNK, **kw)
    stats = preprocess(cfg)
    (prefix,) = cfg.output_names().values()
    return stats, open(bin_path(prefix), "rb").read() + open(idx_path(prefix), "rb").read()


def jsonl_bytes(rows) -> bytes:
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows)


@pytest.fixture(scope="module")
def text_rows():
    docs = make_text_corpus(120, np.random.default_rng(0))
    return [{"text": d} for d in docs] + [{"text": docs[3]}, {"other": 1}, {"text": "短"}]  # a duplicate, skips


def test_compressed_and_parquet_text_equal_the_jsonl(tmp_path, text_rows):
    plain = tmp_path / "c.jsonl"
    plain.write_bytes(jsonl_bytes(text_rows) + b"{bad\n")
    want_stats, want = build(tmp_path, "plain", [plain])
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + plain.read_bytes()))  # a BOM first
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for name in ("c.jsonl.gz", "c.jsonl.zst"):
        stats, got = build(tmp_path, name, [tmp_path / name])
        assert got == want, name
        assert (stats.skipped, stats.documents.total(), stats.lines) == \
            (want_stats.skipped, want_stats.documents.total(), want_stats.lines)
    table = pa.table({"text": [r.get("text") for r in text_rows], "other": [r.get("other") for r in text_rows]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=50)
    stats, got = build(tmp_path, "parquet", [tmp_path / "c.parquet"])
    assert got == want
    assert stats.skipped == {k: v for k, v in want_stats.skipped.items() if k != "bad_json"}  # no line to be bad


def image_png(colour, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Image-text pairs as files on disk: (folder, [(key, caption, png bytes)]); one image corrupt."""
    out = tmp_path_factory.mktemp("pairs")
    (out / "img").mkdir()
    rows = []
    for i in range(40):
        data = image_png((i * 6, 255 - i * 6, (i * 37) % 256)) if i != 7 else b"not an image"
        (out / "img" / f"{i:04d}.png").write_bytes(data)
        rows.append((f"{i:04d}", f"第{i}张图片里有一个圆形", data))
    return out, rows


def test_parquet_and_webdataset_pairs_equal_the_jsonl(tmp_path, pairs):
    folder, rows = pairs
    jsonl = folder / "pairs.jsonl"
    jsonl.write_bytes(jsonl_bytes([{"image": f"img/{k}.png", "text": t} for k, t, _ in rows]))
    opts = dict(image_key="image", image_size=32, min_image_size=16)
    want_stats, want = build(tmp_path, "jsonl", [jsonl], **opts)
    assert want_stats.skipped == {"unreadable_image": 1} and want_stats.images == 39

    pq.write_table(pa.table({"text": [t for _, t, _ in rows], "image": [d for _, _, d in rows]}),
                   tmp_path / "pairs.parquet", row_group_size=16)
    hf = pa.table({"text": [t for _, t, _ in rows],
                   "image": [{"bytes": d, "path": f"{k}.png"} for k, _, d in rows]})  # Hugging Face's Image
    pq.write_table(hf, tmp_path / "hf.parquet")
    with tarfile.open(tmp_path / "pairs.tar", "w") as tar:
        for i, (key, text, data) in enumerate(rows):
            members = {f"{key}.png": data, f"{key}.txt": ("错的" if i % 5 == 0 else text).encode()}
            if i % 5 == 0:  # KEY.json wins over KEY.txt
                members[f"{key}.json"] = json.dumps({"text": text, "url": "http://x"}).encode()
            for name, payload in members.items():
                info = tarfile.TarInfo(f"shard/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for name in ("pairs.parquet", "hf.parquet", "pairs.tar"):
        stats, got = build(tmp_path, name, [tmp_path / name], **opts)
        assert got == want, name
        assert (stats.skipped, stats.images) == (want_stats.skipped, want_stats.images), name


def test_a_corrupt_compressed_file_keeps_its_rows_before_the_damage(tmp_path, text_rows):
    plain = jsonl_bytes(text_rows[:120])
    whole = gzip.compress(plain)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) * 2 // 3])
    stats, _ = build(tmp_path, "cut", [tmp_path / "cut.jsonl.gz"])
    assert stats.skipped["corrupt_file"] == 1 and 0 < stats.documents.total() < 120
    assert any(e[0] == "corrupt_file" and "unreadable after" in e[3] for e in stats.examples)


def test_a_parquet_file_without_the_columns_is_one_error(tmp_path):
    pq.write_table(pa.table({"body": ["一段文字"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet has none of the columns text \(it has body\)"):
        build(tmp_path, "p", [tmp_path / "t.parquet"])
    assert build(tmp_path, "q", [tmp_path / "t.parquet"], json_keys=["body"])[0].documents.total() == 0  # too short
