"""The M6 model: `M6`, its config, the attention dispatch point and the MoE layer."""

from megatron_m6.model.attention import attention, prefix_lm_mask
from megatron_m6.model.m6 import M6, KVCache, init_weights, target_loss, token_losses

__all__ = ["M6", "KVCache", "attention", "prefix_lm_mask", "init_weights", "target_loss", "token_losses"]
