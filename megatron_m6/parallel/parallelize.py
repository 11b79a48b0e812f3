"""Apply a layout to a built model, and the few collective steps the trainer needs.

`parallelize()` composes the plans in Megatron's order: tensor/sequence parallel, activation
recomputation, then data parallel. The returned `ParallelState` is all the trainer knows about
parallelism; for one process every method is a no-op, so single-process and parallel training
run the same code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megatron_m6.config import RunConfig
from megatron_m6.model import M6
from megatron_m6.parallel.data_parallel import GradAllReduce, apply_fsdp
from megatron_m6.parallel.mesh import ParallelDims
from megatron_m6.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelState:
    dims: ParallelDims
    mesh: DeviceMesh | None = None
    grad_all_reduce: GradAllReduce | None = None
    fsdp: bool = False

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["dp"].get_group() if self.mesh is not None and self.dims.dp > 1 else None

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.dp_group is not None else 0

    @property
    def is_logging_rank(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (in place; returns t)."""
        if self.dp_group is not None:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def loss_context(self):
        """Vocabulary-parallel cross entropy under tensor parallelism (forward and backward)."""
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def before_backward(self, model: nn.Module, last_micro_batch: bool) -> None:
        """Reduce gradients only with the last micro-batch of a step."""
        if self.grad_all_reduce is not None:
            self.grad_all_reduce.before_backward(last_micro_batch)
        if self.fsdp:
            model.set_requires_gradient_sync(last_micro_batch)

    def finish_grad_sync(self) -> None:
        if self.grad_all_reduce is not None:
            self.grad_all_reduce.finish()

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Global gradient norm over every rank's shards, then clip. Gradients may be plain
        tensors or DTensors on different meshes, so each one's norm is reduced on its own mesh."""
        squares = []
        for p in params:
            if p.grad is None:
                continue
            norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
        total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
        if math.isfinite(max_norm):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total


def parallelize(model: M6, cfg: RunConfig, dims: ParallelDims, mesh: DeviceMesh | None) -> ParallelState:
    state = ParallelState(dims, mesh)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], cfg.sequence_parallel)
    if cfg.recompute_granularity:
        for name, block in list(model.layers.items()):
            if cfg.recompute_granularity == "full":
                model.layers[name] = checkpoint_wrapper(block)
            else:  # selective: recompute attention, keep the MLP's activations
                block.attn = checkpoint_wrapper(block.attn)
    if dims.dp > 1:
        if cfg.data_parallel_sharding == "replicate":
            state.grad_all_reduce = GradAllReduce(model, state.dp_group, cfg.overlap_grad_reduce)
        else:
            apply_fsdp(model, mesh["dp"], cfg.data_parallel_sharding == "full", cfg.bf16)
            state.fsdp = True
    return state
