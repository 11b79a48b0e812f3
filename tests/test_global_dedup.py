"""Deduplication across shards (data/global_dedup.py): a sharded run merged by
tools/merge_datasets.py --shards equals the one-process run byte for byte for any number of
shards, planted duplicates across shard boundaries are removed and nothing else, and the
deduplication's arrays stay within --dedup-memory-gb."""

import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from megatron_m6.data.dedup import BANDS, EXACT_DUPLICATE, NEAR_DUPLICATE, NUM_BINS, Deduplicator
from megatron_m6.data.global_dedup import EXACT, KEEP, KEY_RECORD, NEAR, drop_reasons, keys_path
from megatron_m6.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_m6.data.preprocess import PreprocessConfig, preprocess
from megatron_m6.data.sample_data import make_text_corpus
from tests.test_shards import dataset_bytes

REPO = Path(__file__).resolve().parents[1]
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def config(inputs, prefix, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix), progress=False,
                            chunk_bytes=4096, **kw)


def build_sharded(inputs, prefix: Path, num_shards: int, partitions: int = 1, memory_gb: float = 0.01) -> str:
    """preprocess_data.py's shards one by one, then the merge with its global deduplication."""
    for i in range(num_shards):
        preprocess(config(inputs, prefix, num_shards=num_shards, shard_index=i, partitions=partitions,
                          workers=partitions))
    done = subprocess.run([sys.executable, "tools/merge_datasets.py", "--shards", str(prefix), "--num-shards",
                           str(num_shards), "--dedup-memory-gb", str(memory_gb)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("num_shards,partitions", [(2, 1), (7, 1), (2, 2)])
def test_sharded_and_deduplicated_equals_one_process(tmp_path, num_shards, partitions):
    """The sample corpus's templated sentences are full of near duplicates, chains among them;
    a shard built with --partitions writes its parts' keys end to end."""
    docs = make_text_corpus(1500, np.random.default_rng(5))
    docs += docs[::7]  # exact duplicates, far from their originals
    inputs = [write_jsonl(tmp_path / "a.jsonl", docs[:900]), write_jsonl(tmp_path / "b.jsonl", docs[900:])]
    one = config(inputs, tmp_path / "one" / "zh")
    stats = preprocess(one)
    assert stats.skipped["exact_duplicate"] > 200 and stats.skipped["near_duplicate"] > 20, stats.skipped
    (want,) = one.output_names().values()
    report = build_sharded(inputs, tmp_path / "sharded" / "zh", num_shards, partitions)
    got = str(tmp_path / "sharded" / "zh_text_document")
    assert dataset_bytes(got) == dataset_bytes(want)
    shard_exact = sum(json.load(open(f"{tmp_path / 'sharded' / 'zh'}.shard-{i:05d}-of-{num_shards:05d}.manifest.json"))
                      ["stats"]["skipped"].get("exact_duplicate", 0) for i in range(num_shards))
    across = stats.skipped["exact_duplicate"] - shard_exact
    near = stats.skipped["near_duplicate"]
    assert f"dropped across shards: {across} exact_duplicate, {near} near_duplicate" in report


def test_planted_duplicates_across_shard_boundaries_are_removed_exactly(tmp_path):
    """Random texts (no two alike) with exact and near copies planted in later shards: the merge
    equals the one-process output of the texts without the copies."""
    rng = random.Random(0)
    base = ["".join(rng.choice(CJK) for _ in range(rng.randint(150, 250))) for _ in range(400)]
    planted, exact, near = list(base), 0, 0
    for i in range(0, 200, 4):
        copy = base[i] if i % 8 else base[i][:100] + rng.choice(CJK) + base[i][101:]  # one character changed
        planted.insert(rng.randrange(300, len(planted)), copy)  # after its original, mostly in another shard
        exact, near = exact + bool(i % 8), near + (not i % 8)
    want_cfg = config([write_jsonl(tmp_path / "base.jsonl", base)], tmp_path / "base" / "zh")
    assert not preprocess(want_cfg).skipped  # the random texts have no duplicates among themselves
    inputs = [write_jsonl(tmp_path / "planted.jsonl", planted)]
    report = build_sharded(inputs, tmp_path / "sharded" / "zh", 5)
    (want,) = want_cfg.output_names().values()
    assert dataset_bytes(str(tmp_path / "sharded" / "zh_text_document")) == dataset_bytes(want)
    assert f"dropped across shards: {exact} exact_duplicate, {near} near_duplicate\n" in report


def synthetic_keys(n: int, rng: np.random.Generator) -> np.ndarray:
    """KEY_RECORDs with exact copies, shared band keys whose signatures agree above and below the
    threshold, and documents without a signature (texts shorter than a shingle)."""
    keys = np.zeros(n, KEY_RECORD)
    keys["digest"] = np.frombuffer(rng.bytes(16 * n), "V16")
    keys["bands"] = rng.integers(1, 2**63, (n, BANDS), dtype=np.uint64) | np.uint64(1)
    keys["sig"] = rng.integers(0, 2**16, (n, NUM_BINS), dtype=np.uint16)
    for j in range(1, n):
        i, kind = int(rng.integers(0, j)), rng.random()
        if kind < 0.1:
            keys[j] = keys[i]
        elif kind < 0.3:
            shared = rng.choice(BANDS, int(rng.integers(1, 4)), replace=False)
            keys["bands"][j, shared] = keys["bands"][i, shared]
            same = rng.random(NUM_BINS) < rng.uniform(0.5, 1.0)
            keys["sig"][j, same] = keys["sig"][i, same]
        elif kind < 0.35:
            keys["bands"][j] = 0
    return keys


def test_the_deduplication_is_deduplicators_rule_within_its_memory_bound(tmp_path):
    """Over key files of 20x the budget, split in 3 shards: the codes equal Deduplicator's
    decisions on the same keys in order (the one-process rule), and the peak traced allocations
    (numpy's arrays included) stay within the 512 KiB budget."""
    keys = synthetic_keys(60_000, np.random.default_rng(0))
    shards = []
    for i, part in enumerate(np.array_split(keys, 3)):
        shards.append(str(tmp_path / f"s{i}"))
        part.tofile(keys_path(shards[-1]))
    dedup = Deduplicator()
    want = [{None: KEEP, EXACT_DUPLICATE: EXACT, NEAR_DUPLICATE: NEAR}[dedup.check(k["digest"].tobytes(), k["bands"],
                                                                                  k["sig"])] for k in keys]
    assert min(want.count(EXACT), want.count(NEAR)) > 1000
    budget = 512 << 10
    assert keys.nbytes > 20 * budget
    drop_reasons(shards[:1], True, True, 1 << 30, str(tmp_path))  # imports what numpy imports lazily
    tracemalloc.start()
    got = drop_reasons(shards, True, True, budget, str(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.tolist() == want
    assert peak <= budget, (peak, budget)


@pytest.mark.parametrize("multimodal", [False, True])
def test_a_merge_keeps_exactly_the_marked_documents(tmp_path, multimodal):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 500, rng.integers(0, 6)) for _ in range(rng.integers(1, 4))] for _ in range(60)]
    dtype = np.int32 if multimodal else np.uint16
    with IndexedDatasetWriter(str(tmp_path / "src"), dtype, multimodal) as writer:
        for doc in docs:
            for item in doc:
                writer.add_item(item)
            if multimodal:
                writer.add_image(rng.bytes(int(rng.integers(1, 40))))
            writer.end_document()
    keep = rng.random(60) < 0.6
    keep[10:20] = True  # a run
    with IndexedDatasetWriter(str(tmp_path / "out"), dtype, multimodal) as writer:
        writer.add_dataset(str(tmp_path / "src"), keep=keep)
    src, out = IndexedDataset(str(tmp_path / "src")), IndexedDataset(str(tmp_path / "out"))
    kept = np.flatnonzero(keep)
    assert out.num_documents == len(kept)
    for j, i in enumerate(kept):
        a, b = src.document_indices[i], src.document_indices[i + 1]
        c, d = out.document_indices[j], out.document_indices[j + 1]
        assert [src[k].tolist() for k in range(a, b)] == [out[k].tolist() for k in range(c, d)]
        if multimodal:
            assert list(src.sequence_modes[a:b]) == list(out.sequence_modes[c:d])


def shapes_image(rng: random.Random, size: int = 96) -> Image.Image:
    """A random picture of several coloured boxes: no two drawn alike."""
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(size - 20), rng.randrange(size - 20)
        draw.rectangle((x, y, x + rng.randrange(8, 30), y + rng.randrange(8, 30)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Image-text pairs with planted duplicates, each after its original and mostly in another
    shard: the same file again (exact), the image resized and re-encoded as PNG (near), the same
    file with another caption (a duplicate only for --dedup-images-any-caption)."""
    out = tmp_path_factory.mktemp("pairs")
    (out / "img").mkdir()
    rng = random.Random(1)
    rows, planted = [], []
    for i in range(120):
        shapes_image(rng).save(out / "img" / f"{i}.jpg", quality=95)
        rows.append({"image": f"img/{i}.jpg", "text": f"第{i}张图片里有几个彩色的方块"})
    for i in range(0, 60, 3):
        with Image.open(out / "img" / f"{i}.jpg") as img:
            img.resize((120, 120), Image.Resampling.BICUBIC).save(out / "img" / f"{i}_big.png")
        planted += [("exact", dict(rows[i])), ("near", {"image": f"img/{i}_big.png", "text": rows[i]["text"]}),
                    ("other caption", {"image": rows[i]["image"], "text": f"另一段说明文字{i}"})]
    for kind, row in planted:
        rows.insert(rng.randrange(70, len(rows) + 1), {**row, "kind": kind})
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def pair_config(inputs, prefix, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix), progress=False,
                            chunk_bytes=2048, image_key="image", image_size=64, **kw)


@pytest.mark.parametrize("flags", [{}, {"image_dedup_distance": 4}, {"image_dedup_distance": 4,
                                                                     "dedup_images_any_caption": True}])
def test_image_text_pairs_lose_exactly_their_planted_duplicates(tmp_path, pairs, flags):
    path, rows = pairs
    dropped = {"exact"} | ({"near"} if flags else set()) | ({"other caption"} if len(flags) == 2 else set())
    keep = [r for r in rows if r.get("kind") not in dropped]
    want = pair_config([write_jsonl_rows(tmp_path / "want.jsonl", keep, path.parent)], tmp_path / "want" / "p")
    assert not preprocess(want).skipped
    got = pair_config([path], tmp_path / "got" / "p", **flags)
    stats = preprocess(got)
    (want_name,), (got_name,) = want.output_names().values(), got.output_names().values()
    assert dataset_bytes(got_name) == dataset_bytes(want_name)
    assert sum(stats.skipped.values()) == len(rows) - len(keep)


def test_image_text_shards_deduplicated_at_the_merge_equal_one_process(tmp_path, pairs):
    path, _ = pairs
    flags = {"image_dedup_distance": 4}
    one = pair_config([path], tmp_path / "one" / "p", **flags)
    preprocess(one)
    for i in range(3):
        preprocess(pair_config([path], tmp_path / "sharded" / "p", num_shards=3, shard_index=i, **flags))
    done = subprocess.run([sys.executable, "tools/merge_datasets.py", "--shards", str(tmp_path / "sharded" / "p"),
                           "--num-shards", "3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (name,) = one.output_names().values()
    assert dataset_bytes(str(tmp_path / "sharded" / Path(name).name)) == dataset_bytes(name)
    assert "near_duplicate" in done.stdout


def write_jsonl_rows(path: Path, rows: list[dict], image_root: Path) -> Path:
    """rows as jsonl at path, their image paths made absolute (path may be in another folder)."""
    rows = [{**r, "image": str(image_root / r["image"])} for r in rows]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
