import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m6.data.indexed import (
    IMAGE_MODE,
    TEXT_MODE,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    dataset_exists,
    decode_image_item,
    encode_image_item,
    merge_datasets,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MCoreDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MCoreBuilder

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def random_docs(n, dtype=np.uint16, high=30000):
    """n documents of 1-3 items of random lengths (some empty)."""
    return [[RNG.integers(0, high, RNG.integers(0, 20)).astype(dtype)
             for _ in range(RNG.integers(1, 4))] for _ in range(n)]


def jpeg(size=(20, 12), colour=(200, 30, 60)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_pairs(prefix, n):
    captions = [RNG.integers(0, 5000, RNG.integers(1, 9)).astype(np.int32) for _ in range(n)]
    images = [jpeg((10 + i, 7 + 2 * i)) for i in range(n)]  # lengths not multiples of 4
    with IndexedDatasetWriter(str(prefix), np.int32, multimodal=True) as w:
        for c, im in zip(captions, images):
            w.add_item(c)
            w.add_image(im)
            w.end_document()
    return captions, images


def test_text_round_trip_and_layout(tmp_path):
    docs = random_docs(50)
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as w:
        for doc in docs[:20]:
            for item in doc:
                w.add_item(item)
            w.end_document()
        rest = docs[20:]
        w.add_documents(np.concatenate([i for d in rest for i in d]),
                        np.array([len(i) for d in rest for i in d]), np.array([len(d) for d in rest]))
    ds = IndexedDataset(str(tmp_path / "d"))
    items = [i for d in docs for i in d]
    assert len(ds) == len(items) and ds.num_documents == 50 and not ds.multimodal
    assert ds.dtype == np.uint16
    assert all(np.array_equal(ds[k], item) for k, item in enumerate(items))
    assert all(np.array_equal(ds.document(k), np.concatenate(d)) for k, d in enumerate(docs))
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and raw[9:17] == (1).to_bytes(8, "little") and raw[17] == 8
    assert int.from_bytes(raw[18:26], "little") == len(items)
    assert int.from_bytes(raw[26:34], "little") == 51
    assert len(raw) == 34 + 12 * len(items) + 8 * 51
    # Pickles as its prefix, not its contents (DataLoader workers reopen the files).
    assert len(pickle.dumps(ds)) < 300 and np.array_equal(pickle.loads(pickle.dumps(ds))[3], ds[3])


def test_image_items(tmp_path):
    for dtype in (np.int32, np.uint16, np.uint8):
        for data in (b"", b"a", b"abcd", jpeg()):
            assert decode_image_item(encode_image_item(data, dtype)) == data
    captions, images = write_pairs(tmp_path / "mm", 6)
    ds = IndexedDataset(str(tmp_path / "mm"))
    assert ds.multimodal and ds.num_documents == 6
    assert ds.sequence_modes.tolist() == [TEXT_MODE, IMAGE_MODE] * 6
    for k in range(6):
        assert np.array_equal(ds[2 * k], captions[k]) and ds.image_bytes(2 * k + 1) == images[k]
    with pytest.raises(IndexedDatasetError, match="not an image"):
        ds.image_bytes(0)


def test_megatron_core_reads_ours(tmp_path):
    docs = random_docs(30)
    with IndexedDatasetWriter(str(tmp_path / "t"), np.uint16) as w:
        for doc in docs:
            for item in doc:
                w.add_item(item)
            w.end_document()
    theirs = MCoreDataset(str(tmp_path / "t"))
    items = [i for d in docs for i in d]
    assert len(theirs) == len(items) and theirs.index.dtype == np.uint16
    assert all(np.array_equal(theirs[k], item) for k, item in enumerate(items))
    assert np.array_equal(theirs.document_indices, np.cumsum([0] + [len(d) for d in docs]))
    captions, images = write_pairs(tmp_path / "mm", 5)
    theirs = MCoreDataset(str(tmp_path / "mm"), multimodal=True)
    for k in range(5):
        text, mode = theirs[2 * k]
        image, image_mode = theirs[2 * k + 1]
        assert np.array_equal(text, captions[k]) and (mode, image_mode) == (TEXT_MODE, IMAGE_MODE)
        assert decode_image_item(image) == images[k]


def test_we_read_megatron_core(tmp_path):
    docs = random_docs(30, np.int32, 100000)
    builder = MCoreBuilder(str(tmp_path / "t.bin"), dtype=np.int32)
    for doc in docs:
        for item in doc:
            builder.add_item(torch.from_numpy(item))
        builder.end_document()
    builder.finalize(str(tmp_path / "t.idx"))
    ours = IndexedDataset(str(tmp_path / "t"))
    assert ours.dtype == np.int32 and not ours.multimodal and ours.num_documents == 30
    assert all(np.array_equal(ours.document(k), np.concatenate(d)) for k, d in enumerate(docs))
    # Multimodal, as Megatron's tools/preprocess_mmdata.py writes it: [text, image] documents.
    builder = MCoreBuilder(str(tmp_path / "mm.bin"), dtype=np.int32, multimodal=True)
    images = [jpeg((9 + i, 9)) for i in range(4)]
    for k, im in enumerate(images):
        builder.add_item(torch.IntTensor([k, k + 1]))
        builder.add_item(torch.from_numpy(encode_image_item(im, np.int32)), IMAGE_MODE)
        builder.end_document()
    builder.finalize(str(tmp_path / "mm.idx"))
    ours = IndexedDataset(str(tmp_path / "mm"))
    assert ours.multimodal and ours.sequence_modes.tolist() == [0, 1] * 4
    assert [ours.image_bytes(2 * k + 1) for k in range(4)] == images
    assert ours[2].tolist() == [1, 2]


def test_merge(tmp_path):
    parts = [random_docs(n) for n in (3, 0, 7)]
    for k, docs in enumerate(parts):
        with IndexedDatasetWriter(str(tmp_path / f"p{k}"), np.uint16) as w:
            for doc in docs:
                for item in doc:
                    w.add_item(item)
                w.end_document()
    merged = merge_datasets([str(tmp_path / f"p{k}") for k in range(3)], str(tmp_path / "all"))
    docs = [d for p in parts for d in p]
    assert merged.num_documents == 10
    assert all(np.array_equal(merged.document(k), np.concatenate(d)) for k, d in enumerate(docs))
    assert MCoreDataset(str(tmp_path / "all")).document_indices.tolist() == \
        merged.document_indices.tolist()
    write_pairs(tmp_path / "mm", 2)
    with pytest.raises(IndexedDatasetError, match="multimodal"):
        merge_datasets([str(tmp_path / "p0"), str(tmp_path / "mm")], str(tmp_path / "bad"))
    assert not dataset_exists(str(tmp_path / "bad"))
    # The CLI: a folder of shards, merged in name order.
    (tmp_path / "shards").mkdir()
    for k in (0, 2):
        for ext in (".bin", ".idx"):
            (tmp_path / "shards" / f"s{k}{ext}").write_bytes((tmp_path / f"p{k}{ext}").read_bytes())
    out = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input",
                          str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "cli")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert IndexedDataset(str(tmp_path / "cli")).num_documents == 10 and "10 documents" in out.stdout


def test_outputs_appear_only_complete(tmp_path):
    prefix = str(tmp_path / "d")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_item(np.arange(5))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_item(np.arange(5))
        assert not dataset_exists(prefix)  # only temporary names until finalize
    assert IndexedDataset(prefix).num_documents == 1 and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"garbage"), "bad header"),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-3]), "truncated"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "shorter"),
    (lambda p: p.with_suffix(".idx").unlink(), "d.idx not found"),
])
def test_damaged_datasets_fail_clearly(tmp_path, damage, message):
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as w:
        w.add_item(np.arange(9))
    damage(tmp_path / "d")
    with pytest.raises(IndexedDatasetError, match=message) as e:
        IndexedDataset(str(tmp_path / "d"))
    assert "\n" not in str(e.value)


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "e"), np.uint16):
        pass
    ds = IndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_documents == 0  # (megatron-core cannot mmap an empty .bin)
