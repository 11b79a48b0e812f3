"""Parameters, training FLOPs per token and per-GPU memory of a preset, counted on the meta device.

`python -m megatron_m6.model_size --preset m6-100b` builds the model with no memory, counts
parameters from the real modules, and counts FLOPs with PyTorch's FlopCounterMode over one
forward and backward. Routing is data-dependent, so FLOPs of an MoE model are counted on its
"active" twin: each MoE MLP replaced by a dense MLP doing the work of top-k experts (exact for
balanced routing) plus the router. The parallel-layout flags (and --world-size) select the layout
whose per-GPU memory is printed (megatron_m6/parallel/memory.py).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_m6.config import ConfigError, ModelConfig, RunConfig, build_parser, config_from_args
from megatron_m6.model import M6
from megatron_m6.model.m6 import Embedding
from megatron_m6.model.moe import MoEMLP
from megatron_m6.parallel.memory import Layout, estimate_rank_memory


@dataclasses.dataclass
class ModelSize:
    total_params: int
    active_params: int  # parameters one token passes through (top-k experts, not all)
    train_flops_per_token: float  # forward + backward, at the configured sequence length


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameter counts of the model built on the meta device."""
    with torch.device("meta"):
        model = M6(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.layers.values():
        if isinstance(layer.mlp, MoEMLP):
            per_expert = sum(p[0].numel() for p in layer.mlp.experts.parameters())
            inactive += per_expert * (cfg.num_experts - cfg.moe_router_topk)
    return total, total - inactive


class _ActiveMoE(torch.nn.Module):
    """Dense stand-in with the compute of top-k experts plus the router (for FLOP counting)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f = cfg.expert_ffn_hidden_size * cfg.moe_router_topk
        self.router = torch.nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.fc1 = torch.nn.Linear(cfg.hidden_size, f)
        self.fc2 = torch.nn.Linear(f, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) + 0 * self.router(x).sum(), x.new_zeros(())


def _count_flops(forward_backward) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    return counter.get_total_flops()


def train_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Forward + backward FLOPs for one text-only sequence, divided by its length."""
    with torch.device("meta"):
        model = M6(cfg)
        for layer in model.layers.values():
            if isinstance(layer.mlp, MoEMLP):
                layer.mlp = _ActiveMoE(cfg)
        tokens = torch.zeros(1, seq_length, dtype=torch.long)
        prefix = torch.tensor([seq_length // 2])
        valid = torch.tensor([seq_length])

        def step():
            logits, aux = model(tokens, prefix, valid)
            (logits.float().sum() + aux).backward()
        return _count_flops(step) / seq_length


def image_train_flops(cfg: ModelConfig) -> float:
    """What one image adds to its sequence's forward + backward FLOPs: the image encoder and the
    patch projection (its patch tokens take positions the per-token count already has)."""
    with torch.device("meta"):
        embedding = Embedding(cfg)
        images = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
        return _count_flops(lambda: embedding.image_tokens(images).float().sum().backward())


def model_size(cfg: RunConfig) -> ModelSize:
    total, active = count_params(cfg.model)
    return ModelSize(total, active, train_flops_per_token(cfg.model, cfg.seq_length))


def layout_from_config(cfg: RunConfig, world_size: int | None) -> Layout:
    """The run's parallel layout; data parallel is what remains of the world size. Flags read
    with getattr so this works whether or not config.py defines them yet."""
    tp = getattr(cfg, "tensor_model_parallel_size", 1)
    pp = getattr(cfg, "pipeline_model_parallel_size", 1)
    ep = getattr(cfg, "expert_model_parallel_size", 1)
    world_size = world_size or tp * pp * ep
    if world_size % (tp * pp):
        raise ValueError(f"--world-size {world_size} is not a multiple of TP x PP = {tp * pp}")
    layout = Layout(tp=tp, pp=pp, ep=ep, dp=world_size // (tp * pp),
                    sequence_parallel=bool(getattr(cfg, "sequence_parallel", False)),
                    data_parallel_sharding=getattr(cfg, "data_parallel_sharding", "replicate"),
                    recompute_granularity=getattr(cfg, "recompute_granularity", None),
                    micro_batch_size=cfg.micro_batch_size, seq_length=cfg.seq_length, bf16=cfg.bf16,
                    num_layers_per_virtual_pipeline_stage=getattr(
                        cfg, "num_layers_per_virtual_pipeline_stage", None))
    layout.check(cfg.model)
    return layout


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.description = ("Parameters, FLOPs per token and per-GPU memory of an M6 configuration "
                          "and parallel layout (meta device).")
    # --world-size is pretrain's dry-run flag: here, the GPUs in the job (default: the fewest
    # the layout needs).
    try:
        ns = parser.parse_args(argv)
        ns.mock_data = True
        cfg = config_from_args(ns)
        layout = layout_from_config(cfg, cfg.world_size)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = model_size(cfg)
    name = cfg.preset or "custom"
    print(f"{name}: total parameters {s.total_params / 1e9:.3f}B ({s.total_params:,})")
    print(f"{name}: active parameters per token {s.active_params / 1e9:.3f}B ({s.active_params:,})")
    print(f"{name}: training FLOPs per token {s.train_flops_per_token / 1e9:.2f} GFLOP "
          f"(forward + backward, sequence {cfg.seq_length}; "
          f"{s.train_flops_per_token / (6 * s.active_params):.2f}x the 6N rule)")
    mem = estimate_rank_memory(cfg.model, layout)
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    print(f"{name}: per-GPU memory, TP{layout.tp} PP{layout.pp} EP{layout.ep} DP{layout.dp}, "
          f"sharding {layout.data_parallel_sharding}, sequence parallel "
          f"{'on' if layout.sequence_parallel else 'off'}, recompute "
          f"{layout.recompute_granularity or 'none'}, micro-batch {layout.micro_batch_size} x "
          f"{layout.seq_length}, {'bf16' if layout.bf16 else 'fp32'} (busiest pipeline stage):")
    print(f"{name}:   params {gib(mem.params)}, grads {gib(mem.grads)}, optimizer "
          f"{gib(mem.optimizer)}, activations {gib(mem.activations)} (estimate), "
          f"total {gib(mem.total)}")


if __name__ == "__main__":
    main()
