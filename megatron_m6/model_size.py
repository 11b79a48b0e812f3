"""Parameters and training FLOPs per token of a preset, counted on the meta device.

`python -m megatron_m6.model_size --preset m6-100b` builds the model with no memory, counts
parameters from the real modules, and counts FLOPs with PyTorch's FlopCounterMode over one
forward and backward. Routing is data-dependent, so FLOPs of an MoE model are counted on its
"active" twin: each MoE MLP replaced by a dense MLP doing the work of top-k experts (exact for
balanced routing) plus the router.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_m6.config import PRESETS, ConfigError, ModelConfig, RunConfig, config_from_args, build_parser
from megatron_m6.model import M6
from megatron_m6.model.moe import MoEMLP


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
        counter = FlopCounterMode(display=False)
        with counter:
            logits, aux = model(tokens, prefix, valid)
            (logits.float().sum() + aux).backward()
    return counter.get_total_flops() / seq_length


def model_size(cfg: RunConfig) -> ModelSize:
    total, active = count_params(cfg.model)
    return ModelSize(total, active, train_flops_per_token(cfg.model, cfg.seq_length))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.description = "Parameters and FLOPs per token of an M6 configuration (meta device)."
    try:
        ns = parser.parse_args(argv)
        ns.mock_data = True
        cfg = config_from_args(ns)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = model_size(cfg)
    name = cfg.preset or "custom"
    print(f"{name}: total parameters {s.total_params / 1e9:.3f}B ({s.total_params:,})")
    print(f"{name}: active parameters per token {s.active_params / 1e9:.3f}B ({s.active_params:,})")
    print(f"{name}: training FLOPs per token {s.train_flops_per_token / 1e9:.2f} GFLOP "
          f"(forward + backward, sequence {cfg.seq_length}; "
          f"{s.train_flops_per_token / (6 * s.active_params):.2f}x the 6N rule)")


if __name__ == "__main__":
    main()
