"""Sharded corpus building (data/shards.py): N shards merged in shard order equal the one-process
output byte for byte, each input row is read by exactly one shard, and a shard whose manifest
matches is skipped while a changed input or a lost output rebuilds it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_m6.data.indexed import IndexedDataset, bin_path, idx_path, merge_datasets
from megatron_m6.data.preprocess import PreprocessConfig, preprocess
from megatron_m6.data.sample_data import make_text_corpus

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, inputs, **kw) -> PreprocessConfig:
    kw = {"exact_dedup": False, "near_dedup": False, **kw}
    return PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / "out" / "zh"),
                            progress=False, chunk_bytes=1024, **kw)


def dataset_bytes(prefix: str) -> bytes:
    return open(bin_path(prefix), "rb").read() + open(idx_path(prefix), "rb").read()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two jsonl files and a compressed one (a streamed file is one unit of a shard)."""
    import gzip

    out = tmp_path_factory.mktemp("corpus")
    docs = make_text_corpus(150, np.random.default_rng(1))
    for name, part in (("a.jsonl", docs[:70]), ("b.jsonl", docs[70:120])):
        (out / name).write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in part))
    with gzip.open(out / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[120:])
    return [out / "a.jsonl", out / "b.jsonl", out / "c.jsonl.gz"]


@pytest.mark.parametrize("num_shards", [2, 7])
def test_shards_merged_in_order_equal_one_process(tmp_path, corpus, num_shards):
    whole = config(tmp_path / "one", corpus)
    preprocess(whole)
    (want,) = whole.output_names().values()
    shards, documents = [], 0
    for i in range(num_shards):
        cfg = config(tmp_path, corpus, num_shards=num_shards, shard_index=i)
        stats = preprocess(cfg)
        documents += stats.documents.total()
        (name,) = cfg.output_names().values()
        assert name.endswith(f"zh_text_document.shard-{i:05d}-of-{num_shards:05d}")
        assert json.load(open(cfg.manifest_path))["stats"]["documents"] == dict(stats.documents)
        shards.append(name)
    merge_datasets(shards, str(tmp_path / "merged"))
    assert dataset_bytes(str(tmp_path / "merged")) == dataset_bytes(want)
    assert documents == IndexedDataset(want).num_documents == 150  # each row read by exactly one shard


def test_a_built_shard_is_skipped_and_a_changed_one_rebuilt(tmp_path, corpus):
    (tmp_path / "in").mkdir()
    corpus = [shutil.copy(p, tmp_path / "in") for p in corpus]  # this test changes one
    cfg = config(tmp_path, corpus, num_shards=3, shard_index=1)
    first = preprocess(cfg)
    (name,) = cfg.output_names().values()
    mtime = os.stat(bin_path(name)).st_mtime_ns
    again = preprocess(cfg)
    assert again.already_built and not first.already_built
    assert (again.documents, again.skipped, again.lines) == (first.documents, first.skipped, first.lines)
    assert os.stat(bin_path(name)).st_mtime_ns == mtime  # untouched
    os.remove(idx_path(name))  # a lost output: rebuilt
    assert not preprocess(cfg).already_built and IndexedDataset(name).num_documents == first.documents.total()
    other = config(tmp_path, corpus, num_shards=3, shard_index=1, append_eod=True)  # other settings
    assert not preprocess(other).already_built
    assert not preprocess(cfg).already_built  # and back
    with open(corpus[1], "a") as f:  # an input that changed
        f.write(json.dumps({"text": "新加的一行文字，内容足够长，能通过清洗规则的检查。"}, ensure_ascii=False) + "\n")
    assert not preprocess(cfg).already_built


def test_an_impossible_shard_is_one_error(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"--shard-index must be in \[0, --num-shards 3\), got 3"):
        preprocess(config(tmp_path, corpus, num_shards=3, shard_index=3))


def test_the_sharding_script_builds_shards_then_merges_them(tmp_path, corpus):
    """examples/preprocess_slurm.sh without SLURM (LOCAL=1): 3 shards, 2 at a time, then the
    merge; the result equals one process, and a second run skips the built shards."""
    whole = config(tmp_path / "one", corpus)  # no dedup: it is per shard, and this corpus has near duplicates
    preprocess(whole)
    (want,) = whole.output_names().values()
    env = {**os.environ, "LOCAL": "1", "JOBS": "2", "NUM_SHARDS": "3", "WORKERS": "1", "PYTHON": sys.executable,
           "INPUT": " ".join(map(str, corpus)), "OUTPUT_PREFIX": str(tmp_path / "sharded" / "zh")}
    cmd = ["bash", "examples/preprocess_slurm.sh", "--no-dedup", "--no-near-dedup"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert dataset_bytes(str(tmp_path / "sharded" / "zh_text_document")) == dataset_bytes(want)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("is already built") == 3, again.stderr
    os.remove(str(tmp_path / "sharded" / "zh.shard-00001-of-00003.manifest.json"))
    merge = subprocess.run([sys.executable, "tools/merge_datasets.py", "--shards", str(tmp_path / "sharded" / "zh"),
                            "--num-shards", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert merge.returncode == 1 and "1 of 3 shards are not built (no manifest): 1" in merge.stderr
