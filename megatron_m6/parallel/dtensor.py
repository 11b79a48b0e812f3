"""How the code outside the plans looks into a tensor that may be a DTensor (a parameter,
gradient or loss that a plan distributed), so that nothing else needs to ask."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of `t` as a plain tensor (gathered if a DTensor is sharded)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
