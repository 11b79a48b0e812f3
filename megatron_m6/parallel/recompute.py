"""Activation recomputation (`--recompute-granularity`): blocks, or only their attention core,
wrapped so that their activations are recomputed in the backward pass instead of kept.

"selective" is Megatron's: the attention core (scores, softmax, dropout, the product with V) is
recomputed, the qkv and output GEMMs are not; the core's inputs Q, K, V are kept. Where sdpa
runs its math path (with attention dropout, or a mask no fused kernel takes) that drops the
B*H*S^2 probabilities and dropout mask, the largest activations at long sequences. The fused
kernel, FlexAttention and sdpa's flash kernels keep no S x S tensor anyway, only the core's
output and log-sum-exp: there selective saves just those, a few percent of a layer's
activations, for one more attention forward (docs/PERFORMANCE.md), and "full" is the option
that saves memory.

The wrapper adds a level to the names of what it wraps; `plain_parameter_name` takes it out
again, for everything that names parameters as M6 does (initialisation, checkpoints, the dry run).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

WRAPPED_PREFIX = "_checkpoint_wrapped_module."  # the name checkpoint_wrapper gives what it wraps


def apply_recomputation(model: nn.Module, granularity: str) -> None:
    """"full": recompute whole blocks; "selective": recompute the attention cores only."""
    for name, block in list(model.layers.items()):
        if granularity == "full":
            model.layers[name] = checkpoint_wrapper(block)
        else:
            block.attn.core = checkpoint_wrapper(block.attn.core)


def plain_parameter_name(name: str) -> str:
    """`name` (of a parameter or module) as in M6, without recomputation wrappers."""
    return name.replace(WRAPPED_PREFIX, "")
