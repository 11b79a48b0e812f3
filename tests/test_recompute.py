"""Recomputation recomputes what its granularity says, and tools/bench/train_step.py measures
what each option keeps. (That every option trains exactly like no recomputation is checked
under several layouts in test_parallel.py.)"""

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from megatron_m6.config import parse_args
from megatron_m6.model import M6
from megatron_m6.model.m6 import AttentionCore
from megatron_m6.parallel import ParallelDims, parallelize
from megatron_m6.parallel.recompute import plain_parameter_name
from tests.parallel_harness import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("granularity, recomputed", [
    (None, set()),
    ("selective", {"core"}),  # Megatron's: the attention core, not the qkv and output GEMMs
    ("full", {"core", "qkv", "proj", "fc1", "fc2"}),
])
def test_what_each_granularity_runs_again_in_the_backward(monkeypatch, granularity, recomputed):
    cfg = parse_args(TINY + (["--recompute-granularity", granularity] if granularity else []))
    with torch.device("meta"):
        model = M6(cfg.model)
    parallelize([model], cfg, ParallelDims(world_size=1), None, torch.device("cpu"))
    # Counted in forward() itself: recomputation calls it without the module hooks.
    names = {id(m): plain_parameter_name(name + ".").rstrip(".").rpartition(".")[2]
             for name, m in model.layers["0"].named_modules()}
    calls = collections.Counter()
    for cls in (AttentionCore, nn.Linear):
        def counted(self, *args, real=cls.forward, **kwargs):
            if names.get(id(self)) in {"core", "qkv", "proj", "fc1", "fc2"}:
                calls.update([names[id(self)]])
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", counted)
    B, S = 2, cfg.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S))
    logits, aux = model(tokens, torch.full((B,), S // 2), torch.full((B,), S))
    forward_calls = dict(calls)
    (logits.sum() + aux).backward()
    assert forward_calls == {"core": 1, "qkv": 1, "proj": 1, "fc1": 1, "fc2": 1}
    assert {leaf for leaf, n in calls.items() if n == 2} == recomputed
    assert all(n <= 2 for n in calls.values())


def test_train_step_bench_measures_each_option(tmp_path):
    """With attention dropout, sdpa runs its math path, which keeps the S x S probabilities and
    dropout mask: selective drops them, full keeps only the blocks' inputs, so each option
    keeps strictly less."""
    out = tmp_path / "steps.json"
    argv = [a for a in TINY if a not in ("--mock-data",)]
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "train_step.py"), *argv,
                    "--seq-length", "64", "--max-position-embeddings", "64", "--attention-backend", "sdpa",
                    "--attention-dropout", "0.1",
                    "--sweep-recompute", "--breakdown", "--warmup", "1", "--iters", "1", "--json", str(out)],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads(out.read_text())
    assert [r["recompute"] for r in results] == ["none", "selective", "full"]
    none, selective, full = (r["activation_gib"] * 2**30 for r in results)
    # The fp32 probabilities and the (1-byte) dropout mask of 2 layers x 2 samples x 4 heads
    # x 64 x 64, at least.
    assert none - selective >= 2 * 2 * 4 * 64 * 64 * (4 + 1)
    assert full < selective
    for r in results:
        assert r["step_time_s"] > 0 and 0 < r["mfu"] and r["range_ms"]["attention"] > 0
        assert set(r["timers_ms"]) == {"data-wait", "forward-backward", "grad-sync", "optimizer"}
