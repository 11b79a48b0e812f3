"""Resumable corpus runs (data/journal.py): a run killed with SIGKILL at random moments and then
resumed with --resume writes exactly what an uninterrupted run writes, byte for byte, with its
deduplication intact across the kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_m6.data.global_dedup import keys_path
from megatron_m6.data.indexed import IndexedDataset, merge_datasets
from megatron_m6.data.journal import _records
from megatron_m6.data.preprocess import PreprocessConfig, preprocess
from megatron_m6.data.sample_data import make_text_corpus
from tests.test_shards import dataset_bytes

REPO = Path(__file__).resolve().parents[1]
CHUNK_BYTES = 2048


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two jsonl files and a gzipped one, with exact and near duplicates planted far from their
    originals, so a resumed run must remember what it kept before the kill."""
    import gzip

    out = tmp_path_factory.mktemp("corpus")
    docs = make_text_corpus(900, np.random.default_rng(3))
    rng = random.Random(0)
    for i in range(0, 300, 10):
        docs.insert(rng.randrange(len(docs)), docs[i])  # exact
        docs.insert(rng.randrange(len(docs)), docs[i + 5] + "。")  # near
    rows = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs]
    (out / "a.jsonl").write_text("".join(rows[:400]))
    (out / "b.jsonl").write_text("".join(rows[400:800]))
    with gzip.open(out / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(rows[800:])
    return [out / "a.jsonl", out / "b.jsonl", out / "c.jsonl.gz"]


def command(inputs, prefix, *flags, resume: bool = True) -> list[str]:
    return [sys.executable, "tools/preprocess_data.py", "--input", *map(str, inputs), "--output-prefix", str(prefix),
            "--workers", "2", "--no-progress", "--chunk-bytes", str(CHUNK_BYTES), *flags] + ["--resume"] * resume


def journal_records(path: str) -> int:
    try:
        return len(_records(path)[0]) - 1  # the header is not a chunk
    except OSError:
        return -1


def run_and_kill(cmd: list[str], journal: str, target: int, rng: random.Random) -> bool:
    """Start cmd, and SIGKILL its process group once the journal holds `target` chunks, plus a
    random 0-30 ms (inside a chunk's processing or writing). True if it was killed mid-run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and journal_records(journal) < target and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.03))
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read().decode()
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def finish(cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_sharded_run_killed_ten_times_then_resumed_equals_an_uninterrupted_one(tmp_path, corpus):
    num_shards = 2
    want = []
    for i in range(num_shards):  # uninterrupted, in process
        cfg = PreprocessConfig(inputs=list(map(str, corpus)), output_prefix=str(tmp_path / "whole" / "zh"),
                               progress=False, chunk_bytes=CHUNK_BYTES, num_shards=num_shards, shard_index=i)
        stats = preprocess(cfg)
        assert stats.skipped["exact_duplicate"]  # near duplicates are the merge's (data/global_dedup.py)
        want += cfg.output_names().values()
    chunks = [len(_records_free(cfg, i)) for i in range(num_shards)]
    rng, killed, shard = random.Random(1), [], 0
    prefix = tmp_path / "killed" / "zh"
    while len(killed) < 10:
        cmd = command(corpus, prefix, "--num-shards", str(num_shards), "--shard-index", str(shard))
        journal = f"{prefix}.shard-{shard:05d}-of-{num_shards:05d}.journal"
        if run_and_kill(cmd, journal, rng.randrange(chunks[shard]), rng):
            killed.append(journal_records(journal))  # -1: killed after the journal's removal, before the exit
        else:
            shard = (shard + 1) % num_shards  # this shard finished: kill the next
    assert sum(n > 0 for n in killed) >= 5, killed  # most kills left chunks to resume after
    for i in range(num_shards):
        finish(command(corpus, prefix, "--num-shards", str(num_shards), "--shard-index", str(i)))
    for i in range(num_shards):  # the counts too: every row read once, every skip counted once
        manifests = [json.load(open(f"{tmp_path / run / 'zh'}.shard-{i:05d}-of-{num_shards:05d}.manifest.json"))
                     for run in ("whole", "killed")]
        stats = [json.dumps({k: v for k, v in m["stats"].items() if k != "seconds"}) for m in manifests]
        assert stats[0] == stats[1].replace(str(tmp_path / "killed"), str(tmp_path / "whole"))
    got = [name.replace(str(tmp_path / "whole"), str(tmp_path / "killed")) for name in want]
    for a, b in zip(want, got):  # the keys for the merge's global deduplication (data/global_dedup.py)
        assert open(keys_path(a), "rb").read() == open(keys_path(b), "rb").read()
    merge_datasets(want, str(tmp_path / "want"))
    merge_datasets(got, str(tmp_path / "got"))
    assert dataset_bytes(str(tmp_path / "got")) == dataset_bytes(str(tmp_path / "want"))
    assert IndexedDataset(str(tmp_path / "got")).num_documents == IndexedDataset(str(tmp_path / "want")).num_documents
    assert not list((tmp_path / "killed").glob("*.journal")) and not list((tmp_path / "killed").glob("*.tmp"))


def _records_free(cfg: PreprocessConfig, shard: int) -> list:
    """The chunks of a shard: the uninterrupted run leaves no journal, so count them directly."""
    from megatron_m6.data.preprocess import expand_inputs, make_chunks
    from megatron_m6.data.shards import shard_of

    chunks = make_chunks(expand_inputs(cfg.inputs), CHUNK_BYTES)
    return shard_of(chunks, shard, cfg.num_shards)


def test_an_image_text_run_killed_then_resumed_equals_an_uninterrupted_one(tmp_path):
    """The multimodal writer (items with modes, JPEG bytes) resumes too."""
    from megatron_m6.data.sample_data import make_sample_data

    make_sample_data(str(tmp_path / "data"), num_train_images=240, num_test_images=1, num_text_docs=5)
    inputs = [tmp_path / "data" / "captions_train.jsonl"]
    flags = ["--image-key", "image", "--image-size", "64", "--chunk-bytes", "512",
             "--vocab-file", str(tmp_path / "data" / "vocab.txt")]
    want = tmp_path / "whole" / "pairs"
    finish(command(inputs, want, *flags, resume=False))
    prefix, rng, kills = tmp_path / "killed" / "pairs", random.Random(2), 0
    while kills < 3:
        kills += run_and_kill(command(inputs, prefix, *flags), f"{prefix}.journal", rng.randrange(1, 10), rng)
    assert "resuming after" in finish(command(inputs, prefix, *flags))
    assert dataset_bytes(f"{prefix}_text_image") == dataset_bytes(f"{want}_text_image")


def test_resume_refuses_another_runs_journal_and_partitions(tmp_path, corpus):
    prefix = tmp_path / "out" / "zh"
    proc = subprocess.Popen(command(corpus, prefix), cwd=REPO, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    while journal_records(f"{prefix}.journal") < 2 and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    other = subprocess.run(command(corpus, prefix, "--min-chars", "3"), cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 1 and other.stderr.strip().splitlines()[-1] == (
        f"error: {prefix}.journal was written by a run with other settings or inputs; run without --resume to "
        "start over")
    parts = subprocess.run(command(corpus, prefix, "--partitions", "2"), cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert parts.returncode == 1 and "--resume continues one writer's journal" in parts.stderr
    fresh = subprocess.run(command(corpus, prefix, resume=False), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and "--resume would continue it" in fresh.stderr
    assert not os.path.exists(f"{prefix}.journal")
