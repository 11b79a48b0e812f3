"""Every layout must train exactly like one process: same losses for 3 steps and the same full
gradients (gathered from the shards) within 1e-5 relative, for a dense and an MoE model.

"Full gradient" is the whole gathered gradient vector, checked at every step. Each parameter is
checked on its own as well: within 1e-5 at step 1, and within 1e-3 after optimizer steps, where
Adam, top-k routing and BatchNorm over the one or two images of a micro-batch turn
summation-order rounding into larger differences in the most sensitive weight (the ResNet's
first convolution); a real mistake (a missing reduction, a wrong scale) is off by O(1)."""

import pytest
import torch

from megatron_m6.config import ConfigError, parse_args
from megatron_m6.parallel import parallel_dims
from tests.parallel_harness import MOE, TINY, history, run_parallel, stop_and_resume, train_steps

LAYOUTS = {
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "TP2-SP": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "DP2-replicate": (2, ["--data-parallel-sharding", "replicate"]),
    "DP2-replicate-overlap": (2, ["--data-parallel-sharding", "replicate", "--overlap-grad-reduce"]),
    "DP2-optimizer": (2, ["--data-parallel-sharding", "optimizer"]),
    "DP2-full": (2, ["--data-parallel-sharding", "full", "--recompute-granularity", "full"]),
    "TP2xDP2-SP-full": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--data-parallel-sharding", "full", "--recompute-granularity", "selective"]),
}
# Expert parallel layouts exist for the MoE model only.
MOE_LAYOUTS = {
    "EP2-dropless": (2, ["--expert-model-parallel-size", "2"]),
    "EP2-capacity-overlap": (2, ["--expert-model-parallel-size", "2", "--moe-capacity-factor", "1.0",
                                 "--overlap-grad-reduce"]),
    "EP2xDP2-optimizer": (4, ["--expert-model-parallel-size", "2", "--data-parallel-sharding", "optimizer"]),
    "TP2xEP2-SP-full": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--expert-model-parallel-size", "2", "--data-parallel-sharding", "full"]),
}
# Pipeline layouts: 4 layers, so that PP2 can interleave two stages per rank.
FOUR_LAYERS = ["--num-layers", "4"]
PIPELINE_LAYOUTS = {
    "PP2-1F1B": (2, ["--pipeline-model-parallel-size", "2"]),
    "PP2-interleaved": (2, ["--pipeline-model-parallel-size", "2",
                            "--num-layers-per-virtual-pipeline-stage", "1"]),
    "PP2-zero-bubble-untied": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                                   "--pipeline-schedule", "zero_bubble", "--untie-embeddings-and-output-weights"]),
    "TP2xPP2xDP2": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--data-parallel-sharding", "optimizer"]),
}
PIPELINE_MOE_LAYOUTS = {
    "TP2xPP2xEP2": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--expert-model-parallel-size", "2", "--sequence-parallel"]),
}
_reference: dict[tuple, tuple] = {}


def reference(model: str, extra: tuple = ()):
    """The single-process run (computed once per model and extra arguments)."""
    key = (model, extra)
    if key not in _reference:
        _reference[key] = train_steps((MOE if model == "moe" else []) + list(extra))
    return _reference[key]


def assert_close(got, want, what):
    losses, grads = got
    ref_losses, ref_grads = want
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}: loss at step {step + 1}: {a} vs {b}"
    for step, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.keys() == r.keys(), f"{what}: parameters differ: {set(g) ^ set(r)}"
        full = torch.cat([g[n].flatten() for n in sorted(r)])
        full_ref = torch.cat([r[n].flatten() for n in sorted(r)])
        err = (full - full_ref).norm() / full_ref.norm()
        assert err <= 1e-5, f"{what}: full gradient at step {step + 1}: relative error {err:.2e}"
        tolerance = 1e-5 if step == 0 else 1e-3
        for name in r:
            err = (g[name] - r[name]).norm()
            assert err <= tolerance * r[name].norm() + 1e-9, (
                f"{what}: gradient of {name} at step {step + 1}: relative error {err / r[name].norm():.2e}")


@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, model):
    world, argv = LAYOUTS[layout]
    got = run_parallel(world, argv + (MOE if model == "moe" else []))
    assert_close(got, reference(model), f"{layout} {model}")


@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize("layout", sorted(PIPELINE_LAYOUTS))
def test_pipeline_layout_matches_single_process(layout, model):
    world, argv = PIPELINE_LAYOUTS[layout]
    untie = [a for a in argv if a == "--untie-embeddings-and-output-weights"]
    extra = tuple(FOUR_LAYERS + untie)
    got = run_parallel(world, argv + FOUR_LAYERS + (MOE if model == "moe" else []))
    assert_close(got, reference(model, extra), f"{layout} {model}")


@pytest.mark.parametrize("layout", sorted(PIPELINE_MOE_LAYOUTS))
def test_pipeline_expert_layout_matches_single_process(layout):
    world, argv = PIPELINE_MOE_LAYOUTS[layout]
    got = run_parallel(world, argv + FOUR_LAYERS + MOE)
    assert_close(got, reference("moe", tuple(FOUR_LAYERS)), layout)


@pytest.mark.parametrize("layout", sorted(MOE_LAYOUTS))
def test_expert_parallel_layout_matches_single_process(layout):
    world, argv = MOE_LAYOUTS[layout]
    capacity = [a for a in argv if a.startswith("--moe-capacity")]
    ref = train_steps(MOE + ["--moe-capacity-factor", "1.0"]) if capacity else reference("moe")
    assert_close(run_parallel(world, argv + MOE), ref, layout)


@pytest.mark.parametrize("saving", [[], ["--async-save", "--save-interval", "1", "--keep-last", "2"]],
                         ids=["sync", "async-every-step"])
def test_exact_resume_under_tp2_pp2_dp2(tmp_path, saving):
    """6 steps straight equal 3 steps, exit, resume, 3 steps: loss for loss, bit for bit; saved
    in the background too, while the next steps change the weights."""
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
              "--data-parallel-sharding", "optimizer", "--hidden-dropout", "0.1"]
    straight, resumed = run_parallel(8, layout + FOUR_LAYERS + saving + ["--save", str(tmp_path)],
                                     fn=stop_and_resume)
    assert len(straight) == 6 and resumed == straight[3:]
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_"))
    assert kept == (["iter_0000002", "iter_0000003"] if saving else ["iter_0000003"])


@pytest.mark.parametrize("chain", [
    [(4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
     (4, ["--pipeline-model-parallel-size", "4"]), (1, [])],
    [(2, ["--expert-model-parallel-size", "2"] + MOE), (1, MOE), (2, ["--expert-model-parallel-size", "2"] + MOE)],
], ids=["TP2xPP2-to-PP4-to-one", "EP2-to-EP1-to-EP2"])
def test_checkpoints_load_under_another_layout(tmp_path, chain):
    """Each layout continues the previous one's checkpoint for one step; the losses are those of
    one process that never stopped (summation order aside)."""
    model = MOE if MOE[0] in chain[0][1] else []
    same = FOUR_LAYERS + ["--lr-decay-style", "constant"]  # runs of different lengths, one schedule
    straight = history(model + same + ["--train-iters", str(len(chain) + 1)])
    losses = run_parallel(chain[0][0], chain[0][1] + same + ["--train-iters", "2", "--save",
                                                                    str(tmp_path / "0")], fn=history)
    for k, (world, argv) in enumerate(chain[1:], start=1):
        argv = argv + same + ["--train-iters", str(k + 2), "--load", str(tmp_path / str(k - 1)),
                                     "--save", str(tmp_path / str(k))]
        losses += history(argv) if world == 1 else run_parallel(world, argv, fn=history)
    assert len(losses) == len(straight)
    for step, (a, b) in enumerate(zip(losses, straight)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step + 1}: {a} vs {b}"


@pytest.mark.parametrize("argv, world, message", [
    (["--tensor-model-parallel-size", "2"], 3, "not divisible by tensor"),
    (["--tensor-model-parallel-size", "8"], 8, "num-attention-heads 4 is not divisible by TP 8"),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "63"], 2, "ffn-hidden-size 63"),
    (["--tensor-model-parallel-size", "2", "--vocab-size", "129"], 2, "vocabulary size 129"),
    (["--pipeline-model-parallel-size", "3"], 3, "num-layers 2 is not divisible by 3"),
    (["--expert-model-parallel-size", "2"], 2, "needs --num-experts"),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2, "num-experts 3 is not divisible"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4"], 2, "EP 4 does not divide"),
    (["--sequence-parallel"], 1, "needs --tensor-model-parallel-size"),
    ([], 3, "global-batch-size 8 is not a multiple"),
])
def test_impossible_layouts_fail_before_any_work(argv, world, message):
    cfg = parse_args(TINY + argv)
    with pytest.raises(ConfigError, match=message):
        parallel_dims(cfg, world)
