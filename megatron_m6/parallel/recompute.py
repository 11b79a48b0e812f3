"""Activation recomputation (`--recompute-granularity`): blocks, or only their attention, wrapped
so that their activations are recomputed in the backward pass instead of kept.

The wrapper adds a level to the names of what it wraps; `plain_parameter_name` takes it out
again, for everything that names parameters as M6 does (initialisation, checkpoints, the dry run).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

WRAPPED_PREFIX = "_checkpoint_wrapped_module."  # the name checkpoint_wrapper gives what it wraps


def apply_recomputation(model: nn.Module, granularity: str) -> None:
    """"full": recompute whole blocks; "selective": recompute attention, keep the MLP's activations."""
    for name, block in list(model.layers.items()):
        if granularity == "full":
            model.layers[name] = checkpoint_wrapper(block)
        else:
            block.attn = checkpoint_wrapper(block.attn)


def plain_parameter_name(name: str) -> str:
    """`name` (of a parameter or module) as in M6, without recomputation wrappers."""
    return name.replace(WRAPPED_PREFIX, "")
