import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m6.config import ConfigError, parse_args
from megatron_m6.data.blending import epoch_permutation, parse_blend, parse_split, sample_index, split_ranges
from megatron_m6.data.dataset import M6PretrainDataset, build_data_loader
from megatron_m6.data.indexed import IndexedDatasetWriter
from megatron_m6.data.task_spec import IMAGE_TASKS, TASK_NAMES
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer

TOK = M6Tokenizer.from_vocab_file(DEFAULT_VOCAB_FILE)
SEQ, N_IMG, IMG = 48, 4, 16


def write_text(prefix, n, tag):
    """n documents; document d reads "<tag> d" in tokens, with an [EOS] as --append-eod adds."""
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for d in range(n):
            w.add_item(np.array([TOK.token_to_id(tag), *TOK.encode(str(d)), TOK.eos_id]))
            w.end_document()
    return str(prefix)


def write_pairs(prefix, n):
    with IndexedDatasetWriter(str(prefix), np.int32, multimodal=True) as w:
        for d in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (d * 10 % 256, 0, 0)).save(buf, format="JPEG")
            w.add_item(np.array([TOK.token_to_id("图"), *TOK.encode(str(d))]))
            w.add_image(buf.getvalue())
            w.end_document()
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return {"a": write_text(root / "a", 100, "甲"), "b": write_text(root / "b", 50, "乙"),
            "mm": write_pairs(root / "mm", 30)}


def dataset(path, n=400, weights=None, split="train", splits="98,2,0", seed=5):
    return M6PretrainDataset(path, TOK, SEQ, N_IMG, IMG, weights, seed, n, split, splits)


def test_parse_blend_and_split():
    assert parse_blend(["a"]) == [(1.0, "a")] and parse_blend(["a", "b"]) == [(1.0, "a"), (1.0, "b")]
    assert parse_blend(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    for bad in (["0.7", "a", "0.3"], ["0.7", "a", "x", "b"], ["-1", "a"], ["0", "a", "0", "b"], []):
        with pytest.raises(ValueError):
            parse_blend(bad)
    assert parse_split("98,2,0") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split("1") == (1.0, 0.0, 0.0)
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ValueError):
            parse_split(bad)
    assert split_ranges(100, (0.98, 0.02, 0.0)) == [(0, 98), (98, 100), (100, 100)]
    assert split_ranges(3, (0.5, 0.5, 0.0)) == [(0, 2), (2, 3), (3, 3)]


def test_sample_index_is_prefix_stable_and_weighted():
    probs = np.array([0.2, 0.8])
    weights = [np.array([3.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])]
    t1, s1, d1 = sample_index(probs, weights, 0, 0, 1000)
    t2, s2, d2 = sample_index(probs, weights, 0, 0, 20000)
    assert np.array_equal(t1, t2[:1000]) and np.array_equal(s1, s2[:1000]) and np.array_equal(d1, d2[:1000])
    assert set(s2[t2 == 1]) == {2} and set(s2[t2 == 0]) == {0, 1}
    # Binomial bounds on a fixed draw (numpy's generators give it on every CPU): 7 and 4.4 sd.
    assert abs((t2 == 1).mean() - 0.8) < 0.02
    assert abs((s2[t2 == 0] == 0).mean() - 0.75) < 0.03
    for s in range(3):  # draws count each source's samples in order
        assert d2[s2 == s].tolist() == list(range((s2 == s).sum()))
    assert not np.array_equal(sample_index(probs, weights, 1, 0, 1000)[0], t1)


def test_each_epoch_reads_every_document_once(data):
    ds = dataset([data["a"]], n=300, weights={"prefix_lm": 1}, splits="1,0,0")
    docs = [ds._document(0, k) for k in range(300)]
    for epoch in range(3):
        assert sorted(docs[100 * epoch:100 * (epoch + 1)]) == list(range(100))
    assert docs[:100] != docs[100:200]  # a fresh order every epoch
    assert np.array_equal(epoch_permutation(5, 0, 0, 1, 100), epoch_permutation(5, 0, 0, 1, 100))


def first_token_source(sample):
    """Which dataset a text sample came from, by its tag character."""
    tokens = sample["tokens"].tolist()
    return "甲" if TOK.token_to_id("甲") in tokens else "乙" if TOK.token_to_id("乙") in tokens else "图"


def test_blend_weights_tasks_and_splits(data):
    ds = dataset(["0.75", data["a"], "0.25", data["b"], "1", data["mm"]], n=1200)
    counts = Counter()
    for i in range(len(ds)):
        s = ds[i]
        task = TASK_NAMES[s["task_id"]]
        counts[first_token_source(s), task in IMAGE_TASKS] += 1
        assert (s["image"] is not None) == (task in IMAGE_TASKS)
        assert TOK.eos_id not in s["tokens"].tolist()[:-1]  # the stored [EOS] is stripped
    text = counts["甲", False] + counts["乙", False]
    # Binomial bounds on a fixed draw: 3.5 sd (1200 samples) and 2.5 sd (~480 text samples).
    assert counts["图", True] + text == 1200 and abs(text / 1200 - 0.4) < 0.05  # 2 of 5 tasks
    assert abs(counts["甲", False] / text - 0.75) < 0.05
    # Splits: valid reads documents 98-99 of a (98% of 100), 49 of b, 29 of mm.
    valid = dataset([data["a"], data["b"], data["mm"]], n=200, split="valid")
    assert [d.tolist() for d in valid.docs] == [[98, 99], [49], [29]]
    with pytest.raises(ValueError, match="no text documents .* test split"):
        dataset([data["a"]], split="test", weights={"prefix_lm": 1})


def test_resume_from_consumed_samples(data):
    path = [data["a"], data["mm"]]
    full = list(build_data_loader(dataset(path, n=48), 8, SEQ, TOK.pad_id, IMG, 0, 0))
    longer = dataset(path, n=96)  # more --train-iters on resume: the same first samples
    resumed = list(build_data_loader(longer, 8, SEQ, TOK.pad_id, IMG, 16, 2))[:4]
    assert len(resumed) == 4
    for a, b in zip(full[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_and_trainer_read_indexed_data(data, tmp_path):
    with pytest.raises(ConfigError, match="nope.bin/.idx does not exist"):
        parse_args(["--data-path", data["a"], str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="not a weight"):
        parse_args(["--data-path", "0.5", data["a"], "x", data["b"]])
    with pytest.raises(ConfigError, match="--split"):
        parse_args(["--data-path", data["a"], "--split", "a,b"])
    with pytest.raises(ConfigError, match="--vocab-file"):
        parse_args(["--data-path", data["a"], "--vocab-file", str(tmp_path / "v.txt")])
    from megatron_m6.pretrain import run
    cfg = parse_args(["--data-path", "0.7", data["a"], "0.3", data["b"], "1", data["mm"],
                      "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
                      "--ffn-hidden-size", "64", "--seq-length", "24", "--image-size", "64",
                      "--resnet-layers", "1,1,1,1", "--resnet-width", "8", "--micro-batch-size", "2",
                      "--global-batch-size", "4", "--train-iters", "3", "--eval-interval", "3",
                      "--eval-iters", "1", "--split", "90,10,0", "--no-resnet-bottleneck"])
    lines = []
    trainer = run(cfg, log=lines.append)
    assert len(trainer.history) == 3 and all(np.isfinite(trainer.history))
    assert any("valid" in line or "eval" in line for line in lines)
