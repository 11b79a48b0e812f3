"""`--compile` trains like eager: the same losses and gradients, on one process and under TP,
FSDP, PP and EP, with either attention backend and with MoE layers; graph breaks only where the
model marks them (the fused attention kernel, the MoE dispatch); the same parameter names.

The eager reference is an independent run: its own model, built from the same seed and data.
"""

import math

import pytest
import torch

from megatron_m6.config import parse_args
from megatron_m6.model import M6
from megatron_m6.model.m6 import Block
from megatron_m6.parallel.parallelize import apply_compile
from megatron_m6.pretrain import setup
from megatron_m6.training.trainer import StepStats
from tests.conftest import tiny_config
from tests.parallel_harness import MOE, full_grads, history, run_parallel, train_steps
from tests.test_parallel import F64, NOISE_FACTOR, assert_close

# m6-tiny (4 layers, hidden 128, head dim 32: the fused kernel takes it) on a smaller batch.
M6_TINY = ["--preset", "m6-tiny", "--mock-data", "--micro-batch-size", "4", "--global-batch-size", "8",
           "--train-iters", "3", "--log-interval", "100", "--lr", "1e-3"]
TINY_MOE = MOE + ["--moe-capacity-factor", "1.0"]  # with token dropping
# Compiled and eager float64 differ only in float64 rounding: Inductor fuses and reorders the
# elementwise work and reductions (LayerNorm, GELU, softmax, Adam) and uses its own vectorised
# erf/exp. Each op rounds to within a few eps (2.2e-16) either way; summed over the ~1e3 ops on a
# path through 4 layers, forward and backward, and carried through 3 Adam steps, that is 1e-13
# at most; 1e-10 leaves 1000x of room. A real mistake (a stale weight, a lost gradient, a wrong
# graph reused) is off by 1e-4 to 1.
FLOAT64_RTOL = 1e-10
_runs: dict[tuple, tuple] = {}


def run(argv: list[str], steps: int = 3) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Per step, the loss and the full gradients of a single-process m6-tiny run (cached)."""
    key = (tuple(argv), steps)
    if key not in _runs:
        torch.manual_seed(0)
        cfg = parse_args(M6_TINY + argv)
        trainer, loader = setup(cfg, log=lambda line: None)
        assert all(b._compiled_call_impl is not None for b in trainer.model.layers.values()) == cfg.compile
        batches = iter(loader)
        losses, grads = [], []
        for _ in range(steps):
            micro = [next(batches) for _ in range(trainer.num_micro_batches)]
            losses.append(trainer.forward_backward(micro, StepStats()))
            grads.append(full_grads(trainer.model, tied=True))
            trainer.optimizer_step()
        _runs[key] = losses, grads
    return _runs[key]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def gradient_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Relative error of the full gradient (every parameter's, concatenated by name)."""
    assert got.keys() == want.keys(), f"parameters differ: {set(got) ^ set(want)}"
    g = torch.cat([got[n].flatten().double() for n in sorted(want)])
    w = torch.cat([want[n].flatten().double() for n in sorted(want)])
    return float((g - w).norm() / w.norm())


@pytest.mark.parametrize("model", [[], TINY_MOE], ids=["dense", "moe"])
def test_compiled_float64_trains_like_eager(model):
    eager = run(F64 + model)
    compiled = run(F64 + model + ["--compile"])
    for step, (c, e, gc, ge) in enumerate(zip(compiled[0], eager[0], compiled[1], eager[1])):
        assert relative(c, e) <= FLOAT64_RTOL, f"step {step + 1}: loss {c} vs eager {e}"
        assert gradient_error(gc, ge) <= FLOAT64_RTOL, f"step {step + 1}: gradient"


FUSED = ["--attention-backend", "fused"]
# The fused kernel runs in Triton's interpreter on CPU, slowly: a quarter of the batch. (The fused
# MoE dispatch, slower still there, runs eagerly under compile: test_graph_breaks_only_where_marked.)
SMALL = ["--micro-batch-size", "2", "--global-batch-size", "2"]


@pytest.mark.parametrize("precision, backend, size", [([], FUSED, SMALL), (["--bf16"], [], [])],
                         ids=["fp32-fused", "bf16-sdpa"])
def test_compiled_stays_within_eager_noise(precision, backend, size):
    """Compiled rounds differently but no worse: within NOISE_FACTOR times eager's own distance
    from float64 (the largest over the steps), of eager in the same precision and of float64
    (as tests/test_parallel.py). float64 runs on sdpa: the fused kernel has no float64."""
    compiled = run(precision + backend + size + ["--compile"])[0]
    eager, float64 = run(precision + backend + size)[0], run(F64 + size)[0]
    assert all(math.isfinite(loss) for loss in compiled)
    tolerance = NOISE_FACTOR["bf16" if precision else "fp32"] * max(map(relative, eager, float64))
    for reference in (eager, float64):
        for step, (c, r) in enumerate(zip(compiled, reference)):
            assert relative(c, r) <= tolerance, f"step {step + 1}: loss {c} vs {r} (tolerance {tolerance:.1e})"


def block_inputs(cfg, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, dict]:
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    return x, dict(positions=torch.arange(seq).expand(batch, seq), prefix_len=torch.tensor([5, 9]),
                   valid_len=torch.tensor([seq, 12]))


@pytest.mark.parametrize("backend, experts, dispatch, breaks_at", [
    ("sdpa", 0, "torch", None), ("fused", 0, "torch", "_fused"), ("sdpa", 4, "torch", "_forward_torch"),
    ("sdpa", 4, "fused", "_forward_fused")])
def test_graph_breaks_only_where_marked(backend, experts, dispatch, breaks_at):
    """A dense sdpa block is one graph (the profiler range does not break it); the fused kernel
    and the MoE dispatch are the only breaks, and they are the model's explicit ones."""
    cfg = tiny_config(hidden_size=64, num_attention_heads=2, attention_backend=backend,
                      num_experts=experts, moe_layer_freq=1, moe_dispatch_backend=dispatch)
    x, kwargs = block_inputs(cfg)
    explained = torch._dynamo.explain(Block(cfg, 1))(x, **kwargs)
    if breaks_at is None:
        assert explained.graph_count == 1 and explained.graph_break_count == 0
    else:
        reasons = {str(b.reason) for b in explained.break_reasons}
        assert reasons and all("torch.compiler.disable" in r and breaks_at in r for r in reasons), reasons


def test_layers_share_compiled_graphs():
    """Alike layers share one compiled graph: a block's forward reads nothing that differs from
    layer to layer (the KV cache is handed in per layer), or a deep model would pass Dynamo's
    recompile limit (8) and its remaining layers would silently run eagerly."""
    cfg = tiny_config(num_layers=5)
    model = M6(cfg)
    apply_compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    torch._dynamo.reset()  # earlier tests' graphs of Block.forward count against the limit
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        model(tokens, torch.tensor([4, 6]), torch.tensor([16, 10]))


def test_compile_keeps_parameter_and_state_dict_names():
    """Checkpoints, initialisation and the dry run name parameters as M6 does."""
    eager, compiled = M6(tiny_config()), M6(tiny_config())
    apply_compile(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_compiled_run_checkpoint_resumes_eagerly(tmp_path):
    """2 compiled steps saved, then 1 eager step from the checkpoint: the losses of an eager run
    that never stopped (the checkpoint's names are M6's, whatever ran)."""
    same = F64 + ["--lr-decay-style", "constant"]  # runs of different lengths, one schedule
    straight = history(same + ["--train-iters", "3"])
    losses = history(same + ["--compile", "--train-iters", "2", "--save", str(tmp_path)])
    losses += history(same + ["--train-iters", "3", "--load", str(tmp_path)])
    assert len(losses) == 3
    for step, (a, b) in enumerate(zip(losses, straight)):
        assert relative(a, b) <= FLOAT64_RTOL, f"step {step + 1}: {a} vs {b}"


def test_profiler_ranges_name_attention_and_moe_dispatch():
    cfg = tiny_config(num_experts=4, moe_layer_freq=1)
    model = M6(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.profiler.profile() as prof:
        model(tokens, torch.tensor([4, 6]), torch.tensor([16, 10]))
    names = [e.name for e in prof.events()]
    # Per layer: one attention call, and the dispatch's two halves around the expert GEMMs.
    assert names.count("attention") == cfg.num_layers
    assert names.count("moe_dispatch") == 2 * cfg.num_layers
    assert names.count("moe_experts") == cfg.num_layers


def two_steps(argv: list[str]):
    return train_steps(argv, steps=2)


# 2 layers, sequence 24 (tests/parallel_harness.py's TINY), 2 steps: enough to see a wrong
# gradient move the second loss, short enough to compile on every rank of a 2-core CI machine.
# Expert parallelism's all-to-all runs inside the MoE dispatch, eagerly.
COMPILED_LAYOUTS = {  # name: (flags, the model's flags)
    "TP2-SP": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], []),
    "DP2-full-recompute": (["--data-parallel-sharding", "full", "--recompute-granularity", "full"], []),
    "PP2": (["--pipeline-model-parallel-size", "2"], []),
    "EP2-moe": (["--expert-model-parallel-size", "2"], MOE),
}


@pytest.mark.parametrize("layout", sorted(COMPILED_LAYOUTS))
def test_compiled_layout_matches_eager_single_process(layout):
    """Compiled on 2 ranks against eager on one, in float64: layout and compilation rounding
    together stay within test_parallel's float64 tolerances (units of float64 eps)."""
    argv, model = COMPILED_LAYOUTS[layout]
    got = run_parallel(2, F64 + model + argv + ["--compile"], fn=two_steps)
    assert_close(got, two_steps(F64 + model), f"{layout} compiled")
