"""The mixed-precision policy of megatron_m6/precision.py, observed on a real bf16 step under the
layouts that cast: what each kind of module computes with and hands on, and what stays fp32.

Tolerances cannot see a wrong cast that costs little accuracy on a tiny model (a LayerNorm
weight rounded to bf16, BatchNorm statistics kept in bf16); these dtypes can."""

from collections import defaultdict

import pytest
import torch.distributed as dist
from torch import nn

from megatron_m6.config import parse_args
from megatron_m6.model.m6 import M6, SelfAttention
from megatron_m6.model.moe import GroupedExperts
from megatron_m6.precision import LayerNorm
from megatron_m6.pretrain import setup
from megatron_m6.training.trainer import StepStats
from tests.parallel_harness import MOE, TINY, run_parallel


def _dtype(t) -> str:
    return str(getattr(t, "dtype", type(t).__name__)).removeprefix("torch.")


def observed_dtypes(argv: list[str]) -> dict[str, set[str]]:
    """What one bf16 training step computes and hands on, by kind, over every rank."""
    cfg = parse_args(TINY + ["--bf16", "--no-resnet-bottleneck"] + argv)
    trainer, loader = setup(cfg, log=lambda line: None)
    seen = defaultdict(set)

    def record(module, args, output):
        kind = type(module).__name__
        if isinstance(module, (LayerNorm, nn.BatchNorm2d)):
            seen[f"{kind} weight"].add(_dtype(module.weight))
            seen[f"{kind} output"].add(_dtype(output))
        if isinstance(module, nn.BatchNorm2d):
            seen["BatchNorm2d running_mean"].add(_dtype(module.running_mean))
        if isinstance(module, SelfAttention):  # after sequence parallelism's all-gather
            seen["attention input"].add(_dtype(args[0]))
            seen["qkv weight"].add(_dtype(module.qkv.weight))
        if isinstance(module, GroupedExperts):  # after expert parallelism's all-to-all
            seen["expert rows"].add(_dtype(args[0]))
        if isinstance(module, nn.Linear) and module.out_features == cfg.model.num_experts:
            seen["router logits"].add(_dtype(output))
        if isinstance(module, M6) and module.lm_head is None:  # a pipeline stage before the last
            seen["stage output"].add(_dtype(output[0]))

    for module in trainer.model.modules():
        module.register_forward_hook(record)
    batches = iter(loader)
    stats = StepStats()
    trainer.forward_backward([next(batches) for _ in range(trainer.num_micro_batches)], stats)
    seen["gradient"] |= {_dtype(p.grad) for p in trainer.model.parameters() if p.grad is not None}
    seen["master weight"] |= {_dtype(p) for p in trainer.model.parameters()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, dict(seen))
    return {k: set().union(*(r.get(k, set()) for r in everyone)) for k in set().union(*everyone)}


LAYOUTS = {
    # FSDP with images in the batch: block matmul weights gathered in bf16, everything else fp32.
    "DP2-optimizer-moe": (2, ["--data-parallel-sharding", "optimizer"] + MOE),
    "DP2-full": (2, ["--data-parallel-sharding", "full"]),
    # Sequence parallel all-gathers and the expert all-to-all.
    "TP2-SP-EP2-moe": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                           "--expert-model-parallel-size", "2"] + MOE),
    # Hidden states between pipeline stages.
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bf16_step_follows_the_precision_policy(layout):
    world, argv = LAYOUTS[layout]
    seen = run_parallel(world, argv, fn=observed_dtypes)
    fp32, bf16 = {"float32"}, {"bfloat16"}
    assert seen["master weight"] == fp32 and seen["gradient"] == fp32
    assert seen["LayerNorm weight"] == fp32 and seen["LayerNorm output"] == bf16
    assert seen["qkv weight"] <= {"float32", "bfloat16"} and seen["attention input"] == bf16
    assert seen["BatchNorm2d weight"] == fp32 and seen["BatchNorm2d running_mean"] == fp32
    assert seen["BatchNorm2d output"] == bf16  # normalising bf16 convolution outputs
    if "--pipeline-model-parallel-size" in argv:
        assert seen["stage output"] == bf16
    if "--data-parallel-sharding" in argv:  # FSDP hands the block's matmuls bf16 weights
        assert seen["qkv weight"] == bf16
    if MOE[0] in argv:
        assert seen["router logits"] == fp32 and seen["expert rows"] == bf16
