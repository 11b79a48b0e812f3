import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m6.config import ConfigError, parse_args
from megatron_m6.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    M6PretrainDataset,
    MockDataset,
    build_data_loader,
    collate,
    image_to_tensor,
)
from megatron_m6.data.indexed import IndexedDatasetError, IndexedDatasetWriter
from megatron_m6.data.task_spec import IMAGE_TASKS, TASK_NAMES
from megatron_m6.data.tasks import build_sample
from tests.conftest import FakeTokenizer

SEQ, N_IMG, IMG = 40, 4, 16


TOK = FakeTokenizer()


def write_text(prefix, texts):
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for t in texts:
            w.add_item(np.array(TOK.encode(t)))
            w.end_document()
    return str(prefix)


def write_pairs(prefix, pairs):
    """[caption, image] documents, as tools/preprocess_data.py writes them."""
    with IndexedDatasetWriter(str(prefix), np.int32, multimodal=True) as w:
        for (size, colour, fmt), caption in pairs:
            buf = io.BytesIO()
            Image.new("RGB", size, colour).save(buf, format=fmt)
            w.add_item(np.array(TOK.encode(caption)))
            w.add_image(buf.getvalue())
            w.end_document()
    return str(prefix)


@pytest.fixture
def data_dir(tmp_path):
    write_text(tmp_path / "text", ["我们的猫", "abcdefghij" * 20, "x", "hello world", "图片的狗和猫" * 3])
    write_pairs(tmp_path / "pairs", [(((40, 30), (255, 0, 0), "PNG"), "红色的图片"),
                                     (((20, 50), (0, 128, 255), "JPEG"), "蓝色"),
                                     (((32, 32), (10, 200, 30), "PNG"), "green square picture"),
                                     (((32, 32), (10, 200, 30), "PNG"), "绿色")])
    return tmp_path


def make(data_dir, weights=None, seed=0, num_samples=64, split="train", splits="3,1,0",
         names=("text", "pairs")):
    return M6PretrainDataset([str(data_dir / n) for n in names], TOK, SEQ, N_IMG, IMG, weights,
                             seed, num_samples, split, splits)


def same(a, b):
    return (torch.equal(a["tokens"], b["tokens"]) and a["prefix_len"] == b["prefix_len"]
            and a["task_id"] == b["task_id"] and (a["image"] is None) == (b["image"] is None)
            and (a["image"] is None or torch.equal(a["image"], b["image"])))


def test_image_to_tensor():
    x = image_to_tensor(Image.new("RGB", (60, 20), (255, 0, 128)), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    want = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    # fp32 arithmetic on values below 3 against Python's float64: rounding ~3e-7.
    assert torch.allclose(x, torch.tensor(want)[:, None, None].expand(3, 16, 16), rtol=0, atol=1e-5)
    # Centre crop: a wide image whose outer thirds are black keeps only its white middle.
    img = Image.new("L", (90, 30), 0)
    img.paste(255, (30, 0, 60, 30))
    x = image_to_tensor(img, 30)
    assert torch.allclose(x[0], torch.full((30, 30), (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]), rtol=0, atol=1e-5)


def test_samples_follow_layout(data_dir):
    ds = make(data_dir)
    for i in range(len(ds)):
        s = ds[i]
        task = TASK_NAMES[s["task_id"]]
        tokens = s["tokens"].tolist()
        n_img = N_IMG if task in IMAGE_TASKS else 0
        assert len(tokens) <= SEQ and tokens[-1] == TOK.eos_id
        assert tokens[:n_img + 1] == [TOK.img_id] * n_img + [TOK.cls_id]
        assert tokens[s["prefix_len"] - 1] == TOK.sep_id
        if task in IMAGE_TASKS:
            assert s["image"].shape == (3, IMG, IMG) and s["image"].dtype == torch.float32
        else:
            assert s["image"] is None


def test_deterministic(data_dir):
    a, b, c = make(data_dir, seed=7), make(data_dir, seed=7), make(data_dir, seed=8)
    assert all(same(a[i], b[i]) for i in range(20))
    assert all(same(a[i], a[i]) for i in range(20))
    assert not all(same(a[i], c[i]) for i in range(20))
    assert not same(a[0], a[1]) or not same(a[1], a[2])


def test_task_weights(data_dir):
    ds = make(data_dir, {"prefix_lm": 1, "captioning": 3}, num_samples=2000)
    counts = Counter(ds[i]["task_id"] for i in range(len(ds)))
    assert set(counts) == {TASK_NAMES.index("prefix_lm"), TASK_NAMES.index("captioning")}
    assert abs(counts[TASK_NAMES.index("captioning")] / 2000 - 0.75) < 0.04  # 4.1 binomial sd
    # Only text tasks: the caption file is not needed, no image is ever decoded.
    ds = make(data_dir, {"text_denoising": 1}, num_samples=50)
    assert {ds[i]["task_id"] for i in range(50)} == {0}


def test_equal_weights_by_default(data_dir):
    ds = make(data_dir, None, num_samples=1500)
    counts = Counter(ds[i]["task_id"] for i in range(len(ds)))
    assert sorted(counts) == list(range(len(TASK_NAMES)))
    assert all(abs(c / 1500 - 0.2) < 0.04 for c in counts.values())  # 3.9 binomial sd


def test_split_reads_its_share_of_documents(data_dir):
    ds = make(data_dir, {"captioning": 1}, split="valid", num_samples=5)  # the last of 4 pairs
    want = [TOK.img_id] * N_IMG + [TOK.cls_id, TOK.sep_id] + TOK.encode("绿色") + [TOK.eos_id]
    assert all(ds[i]["tokens"].tolist() == want for i in range(5))


def test_errors(data_dir):
    with pytest.raises(IndexedDatasetError, match="nope.idx not found"):
        make(data_dir, names=("text", "nope"))
    with pytest.raises(ValueError, match="captioning has weight > 0 but .* no image-text pairs"):
        make(data_dir, {"prefix_lm": 1, "captioning": 1}, names=("text",))
    make(data_dir, {"prefix_lm": 1}, names=("text",))  # pairs not needed
    make(data_dir, {"captioning": 1, "mm_denoising": 2}, names=("pairs",))  # text not needed
    assert {make(data_dir, names=("text",))[i]["task_id"] for i in range(30)} == {0, 1}
    write_text(data_dir / "short", ["x"])
    with pytest.raises(ValueError, match="no text documents of at least 2 tokens"):
        make(data_dir, {"text_denoising": 1}, names=("short",))
    # Weights and lengths are checked once, where the flags are read (config.validate).
    flags = ["--data-path", str(data_dir / "text"), str(data_dir / "pairs"), "--image-size", "96"]
    with pytest.raises(ConfigError, match="unknown task 'vqa'"):
        parse_args(flags + ["--task-weights", "vqa=1"])
    with pytest.raises(ConfigError, match="positive total"):
        parse_args(flags + ["--task-weights", "captioning=0"])
    with pytest.raises(ConfigError, match="too short"):
        parse_args(flags + ["--seq-length", "10", "--task-weights", "captioning=1"])
    with pytest.raises(IndexError):
        make(data_dir, {"captioning": 1}, num_samples=4)[4]


def test_collate_masks_and_labels():
    rng = np.random.default_rng(0)
    samples = []
    for task in TASK_NAMES * 2:
        text = rng.integers(108, TOK.vocab_size, int(rng.integers(2, 60))).tolist()
        s = build_sample(task, text, TOK, rng, SEQ, N_IMG)
        image = torch.randn(3, IMG, IMG) if task in IMAGE_TASKS else None
        samples.append({"tokens": torch.tensor(s.tokens), "prefix_len": s.prefix_len,
                        "task_id": TASK_NAMES.index(task), "image": image})
    batch = collate(samples, SEQ, TOK.pad_id, IMG)
    B = len(samples)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (B, SEQ)
    assert batch["images"].shape == (B, 3, IMG, IMG) and batch["loss_mask"].dtype == torch.float32
    for b, s in enumerate(samples):
        toks, P, V = s["tokens"].tolist(), s["prefix_len"], len(s["tokens"])
        assert batch["valid_len"][b] == V and batch["prefix_len"][b] == P
        assert batch["tokens"][b].tolist() == toks + [TOK.pad_id] * (SEQ - V)
        assert batch["task_id"][b] == s["task_id"]
        assert bool(batch["has_image"][b]) == (s["image"] is not None)
        want_image = s["image"] if s["image"] is not None else torch.zeros(3, IMG, IMG)
        assert torch.equal(batch["images"][b], want_image)
        for i in range(SEQ):
            predicts_target = i + 1 < V and i + 1 >= P  # next token is a target token or the EOS
            assert batch["loss_mask"][b, i] == float(predicts_target)
            assert batch["labels"][b, i] == (toks[i + 1] if predicts_target else TOK.pad_id)
        # Exactly the target tokens and the EOS are predicted.
        assert batch["loss_mask"][b].sum() == V - P
    with pytest.raises(ValueError, match="exceeds seq_length"):
        collate(samples, 8, TOK.pad_id, IMG)


def batches_equal(x, y):
    return len(x) == len(y) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(x, y))


def test_loader_resumes_exactly(data_dir):
    ds = make(data_dir, num_samples=26)
    full = list(build_data_loader(ds, 4, SEQ, TOK.pad_id, IMG, 0, 0))
    assert len(full) == 6  # drop_last
    resumed = list(build_data_loader(ds, 4, SEQ, TOK.pad_id, IMG, 8, 0))
    assert batches_equal(resumed, full[2:])
    workers = list(build_data_loader(ds, 4, SEQ, TOK.pad_id, IMG, 8, 1))
    assert batches_equal(workers, full[2:])


def test_mock_dataset():
    ds = MockDataset(vocab_size=500, seq_length=64, num_image_tokens=9, image_size=IMG, seed=3,
                     num_samples=200)
    again = MockDataset(500, 64, 9, IMG, 3, 200)
    assert all(same(ds[i], again[i]) for i in range(10))
    with_image = 0
    for i in range(len(ds)):
        s = ds[i]
        toks, P = s["tokens"].tolist(), s["prefix_len"]
        task = TASK_NAMES[s["task_id"]]
        n_img = 9 if s["image"] is not None else 0
        with_image += n_img > 0
        assert (task in IMAGE_TASKS) == (n_img > 0)
        assert 57 <= len(toks) <= 64
        assert toks[:n_img + 1] == [7] * n_img + [2] and toks[P - 1] == 3 and toks[-1] == 6
        body = toks[n_img + 1:P - 1] + toks[P:-1]
        assert min(body) >= 8 and max(body) < 500
        if task == "captioning":
            assert P == n_img + 2
    assert 0.35 < with_image / len(ds) < 0.65
    batch = next(iter(build_data_loader(ds, 8, 64, 0, IMG, 0, 0)))
    assert batch["tokens"].shape == (8, 64) and batch["images"].shape == (8, 3, IMG, IMG)


def test_data_parallel_sampler_deals_micro_batches_in_turn():
    from megatron_m6.data.dataset import DataParallelSampler
    for start, stop, micro, size in [(0, 37, 2, 3), (12, 100, 4, 2), (8, 9, 2, 4), (6, 6, 2, 2)]:
        seen = []
        for rank in range(size):
            sampler = DataParallelSampler(start, stop, micro, rank, size)
            got = list(sampler)
            # Direct definition: index i belongs to the rank of its micro-batch, dealt in turn.
            want = [i for i in range(start, stop) if ((i - start) // micro) % size == rank]
            assert got == want and len(sampler) == len(want)
            seen += got
        assert sorted(seen) == list(range(start, stop))
