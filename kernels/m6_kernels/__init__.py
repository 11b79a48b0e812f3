"""m6_kernels: Triton kernels for M6 and their PyTorch references.

- `m6_kernels.attention.prefix_lm_attention`: fused prefix-LM flash attention, forward and backward.
- `m6_kernels.moe`: `topk_gating`, `permute`, `unpermute` for MoE dispatch.
- `m6_kernels.norm.layer_norm`, `m6_kernels.cross_entropy.cross_entropy`.
- `m6_kernels.reference`: the plain PyTorch definitions they are tested against (any dtype).

The kernel modules import Triton; this package and `runtime` and `reference` do not, so the
model can ask `runtime.unavailable_reason(device)` and take its PyTorch path where Triton is
missing. Imported as `m6_kernels`, not `kernels`, which is an unrelated package on PyPI.
"""
