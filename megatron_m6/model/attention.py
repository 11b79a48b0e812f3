"""The one attention function of the model, and the M6 prefix-LM mask it applies.

Query i may attend key j iff j < valid_len and (j < prefix_len or j <= i): the prefix (image and
source text) is bidirectional, the target is causal, padding is invisible. Every attention call in
the model goes through `attention()`, so a fused kernel plugs in here and nowhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefix_lm_mask(prefix_len: torch.Tensor, valid_len: torch.Tensor, q_len: int, k_len: int,
                   q_start: int = 0) -> torch.Tensor:
    """Boolean mask [B, 1, q_len, k_len], True where attention is allowed.

    `q_start` is the global position of the first query (non-zero when decoding with a KV cache).
    """
    device = prefix_len.device
    i = torch.arange(q_start, q_start + q_len, device=device)[None, :, None]
    j = torch.arange(k_len, device=device)[None, None, :]
    prefix = prefix_len[:, None, None]
    valid = valid_len[:, None, None]
    return ((j < valid) & ((j < prefix) | (j <= i)))[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
              valid_len: torch.Tensor, q_start: int = 0, dropout_p: float = 0.0) -> torch.Tensor:
    """Masked scaled dot-product attention. q: [B, H, Sq, D]; k, v: [B, H, Sk, D]."""
    mask = prefix_lm_mask(prefix_len, valid_len, q.shape[2], k.shape[2], q_start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
