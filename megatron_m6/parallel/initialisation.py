"""Materialising a model laid out over ranks: each rank allocates its own shards and draws only
the slices of M6's global tensors it holds.

The model states how each tensor starts (`init_rules`) and computes any slice of it
(`init_values`); this module says which slice a rank holds, from a DTensor's placements. So
every layout starts from the weights of one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from megatron_m6.config import ModelConfig
from megatron_m6.model.m6 import init_rules, init_values
from megatron_m6.parallel.dtensor import local_tensor
from megatron_m6.parallel.recompute import plain_parameter_name


def local_indices(p: torch.Tensor) -> list[slice | torch.Tensor]:
    """For each dimension of `p`, the global indices this rank holds: a slice where they are
    contiguous (all of them for a plain tensor, and every placement this repository makes), else
    an index tensor. For a DTensor, they are what its placements give this rank's mesh
    coordinates (Shard, Replicate, and the _StridedShard FSDP puts over a dimension that tensor
    or expert parallelism already split). Sharding one dimension does not depend on the others,
    so each is worked out on its own, by laying out a 1-D index vector like that dimension."""
    if not isinstance(p, DTensor):
        return [slice(0, n) for n in p.shape]
    indices = []
    for dim, n in enumerate(p.shape):
        placements = [_on_first_dim(pl) if getattr(pl, "dim", None) == dim else Replicate()
                      for pl in p.placements]
        index = torch.arange(n, device=p.device_mesh.device_type)
        index = distribute_tensor(index, p.device_mesh, placements, src_data_rank=None).to_local().cpu()
        first = int(index[0]) if len(index) else 0
        contiguous = torch.equal(index, torch.arange(first, first + len(index)))
        indices.append(slice(first, first + len(index)) if contiguous else index)
    return indices


def _on_first_dim(pl):
    """The same sharding of dimension 0 (for the 1-D index vectors of `local_indices`)."""
    return _StridedShard(0, split_factor=pl.split_factor) if isinstance(pl, _StridedShard) else Shard(0)


def init_shards(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise `model` (M6 or a pipeline stage, with any plans applied) as one process would:
    every parameter and buffer, or this rank's slice of it, from its name in M6 and `seed`.

    What a rank draws: of a weight drawn by rows (linear, embedding, stacked experts) exactly
    the rows it holds, one at a time, and of each row only the columns it keeps reach its shard:
    a transient of one row. Where a weight is split along its columns (tensor parallel's
    row-parallel proj and fc2), the rank draws whole rows, tp times its shard. Convolutions are
    drawn whole."""
    named = ((plain_parameter_name(name), module) for name, module in model.named_modules())
    with torch.no_grad():
        for key, t, rule in init_rules(named, cfg):
            init_values(local_tensor(t), key, t.shape, rule, seed, local_indices(t))


def materialize(model: nn.Module, cfg: ModelConfig, device: torch.device, seed: int,
                init: bool = True) -> None:
    """Allocate a meta-device M6 (or pipeline stage) on `device` and initialise it; init=False
    only allocates, for weights a checkpoint is about to overwrite. to_empty() gives the two
    ends of the tied embedding separate storage, so the tie is made again. A meta-device target
    (a dry run's layout, see megatron_m6/dry_run.py) is left as it is: nothing to allocate."""
    if device.type == "meta":
        return
    model.to_empty(device=device)
    if not cfg.untie_embeddings_and_output_weights and model.embedding is not None and model.lm_head is not None:
        model.lm_head.weight = model.embedding.word_emb.weight
    if init:
        init_shards(model, cfg, seed)
