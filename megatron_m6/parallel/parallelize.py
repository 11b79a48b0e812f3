"""Apply a layout to a built model, and the few collective steps the trainer needs.

`parallelize()` composes the plans in Megatron's order on each pipeline stage (or the whole
model): tensor/sequence parallel, expert parallel, activation recomputation, compilation
(`--compile`), then data parallel. Compiling after the others and before FSDP is torchtitan's
order: a block is traced with its TP and recomputation wrappers in place, and FSDP then shards
the compiled blocks (its hooks run eagerly: FSDP2 keeps them out of Dynamo's reach).
The returned `ParallelState` is all the trainer knows about
parallelism; for one process every method is a no-op, so single-process and parallel training
run the same code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megatron_m6.config import RunConfig
from megatron_m6.parallel.data_parallel import GradAllReduce, apply_fsdp
from megatron_m6.parallel.dtensor import local_tensor
from megatron_m6.parallel.expert_parallel import apply_expert_parallel, is_expert_param
from megatron_m6.parallel.initialisation import materialize
from megatron_m6.parallel.mesh import ParallelDims
from megatron_m6.parallel.pipeline_parallel import PipelineRunner, tied_embedding_group
from megatron_m6.parallel.recompute import apply_recomputation
from megatron_m6.parallel.tensor_parallel import apply_tensor_parallel
from megatron_m6.precision import reduce_dtype


@dataclass
class ParallelState:
    dims: ParallelDims
    mesh: DeviceMesh | None = None
    grad_all_reduce: GradAllReduce | None = None
    fsdp: bool = False
    pipeline: PipelineRunner | None = None
    # Tied embedding under PP: this rank's copy, and the group of the first and last stage.
    tied_weight: nn.Parameter | None = None
    tied_group: dist.ProcessGroup | None = None

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

    def finish_grad_sync(self, model: nn.Module) -> None:
        for p in model.parameters():
            # DTensor may return a gradient laid out unlike its parameter (the vocabulary-split
            # embedding's comes back replicated): give every gradient its parameter's layout.
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        if self.grad_all_reduce is not None:
            self.grad_all_reduce.finish()
        if self.fsdp and self.dims.ep > 1:  # FSDP averaged expert gradients over edp, not dp
            for p in model.parameters():
                if p.grad is not None and is_expert_param(p):
                    p.grad.div_(self.dims.ep)
        if self.tied_group is not None:  # the tied weight's gradient: embedding + head parts
            dist.all_reduce(local_tensor(self.tied_weight.grad), group=self.tied_group)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Global gradient norm over every rank's shards, then clip. Each rank sums the squares
        of its local pieces, grouped by how they are split (mesh and sharded mesh dimensions);
        each group's sum is all-reduced once per sharded dimension (a replicated dimension holds
        copies, so it is not summed), and pipeline stages add theirs up."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            # The head's copy of a tied embedding is counted once, on the first stage.
            if p.grad is None or (p is self.tied_weight and self.pipeline and not self.pipeline.is_first):
                continue
            grad, split = p.grad, ()
            if isinstance(grad, DTensor):
                if any(pl.is_partial() for pl in grad.placements):
                    raise RuntimeError("clip_grad_norm_ runs after finish_grad_sync: no partial gradients")
                split = (grad.device_mesh, tuple(i for i, pl in enumerate(grad.placements) if not pl.is_replicate()))
                grad = grad.to_local()
            groups.setdefault(split, []).append(torch.linalg.vector_norm(grad, dtype=reduce_dtype(grad.dtype)) ** 2)
        subtotals = []
        for split, squares in groups.items():
            subtotal = torch.stack(squares).sum()
            if split:
                mesh, dims = split
                for dim in dims:
                    dist.all_reduce(subtotal, group=mesh.get_group(dim))
            subtotals.append(subtotal)
        total = torch.stack(subtotals).sum() if subtotals else torch.zeros((), device=params[0].device)
        if self.pipeline is not None:
            dist.all_reduce(total, group=self.pipeline.pp_group)
        total = total.sqrt()
        if math.isfinite(max_norm):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total


def apply_compile(model: nn.Module) -> None:
    """torch.compile each transformer block in place (`Module.compile`): the module tree, and so
    every parameter and state-dict name, stays as it was. Blocks, not the whole model: alike
    blocks share compiled code, and a pipeline stage or an FSDP unit holds whole blocks. Where a
    block still runs eagerly (the fused attention kernel, the MoE dispatch) is said in
    model/attention.py and model/moe.py."""
    for block in model.layers.values():
        block.compile()


def parallelize(parts: list[nn.Module], cfg: RunConfig, dims: ParallelDims, mesh: DeviceMesh | None,
                device: torch.device) -> ParallelState:
    """Apply the layout to `parts` (the whole model, or this rank's pipeline stages) while they
    are still on the meta device, then allocate and initialise only this rank's shards: a large
    model is never materialised whole on one rank."""
    state = ParallelState(dims, mesh)
    for part in parts:
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], cfg.sequence_parallel)
        if dims.ep > 1:
            apply_expert_parallel(part, mesh["ep"])
        if cfg.recompute_granularity:
            apply_recomputation(part, cfg.recompute_granularity)
        if cfg.compile:
            apply_compile(part)
    if dims.dp > 1 and cfg.data_parallel_sharding != "replicate":
        for part in parts:
            apply_fsdp(part, mesh["dp"], mesh["edp"], cfg.data_parallel_sharding == "full", cfg.bf16)
        state.fsdp = True
    for part in parts:
        # With --load every weight and buffer comes from the checkpoint (a model-only one holds
        # all model weights too; a missing one is an error): allocate, but draw nothing.
        materialize(part, cfg.model, device, cfg.seed, init=cfg.load is None)
    # What follows holds references to the (now real) parameters.
    if dims.dp > 1 and cfg.data_parallel_sharding == "replicate":
        state.grad_all_reduce = GradAllReduce(nn.ModuleList(parts), state.dp_group,
                                              mesh["edp"].get_group(), cfg.overlap_grad_reduce)
    if dims.pp > 1 and not cfg.model.untie_embeddings_and_output_weights:
        state.tied_group = tied_embedding_group(mesh, timedelta(minutes=cfg.distributed_timeout_minutes))
        for part in parts:
            if part.embedding is not None:
                state.tied_weight = part.embedding.word_emb.weight
            elif part.lm_head is not None:
                state.tied_weight = part.lm_head.weight
    return state
