"""Fused LayerNorm and cross entropy against float64 references."""

import pytest
import torch

from m6_kernels import reference
from m6_kernels.cross_entropy import cross_entropy
from m6_kernels.norm import layer_norm
from tests.kernels_common import DEVICE, TOL, fresh_generator, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("features", [47, 129])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_matches_float64(dtype, features):
    g, seed = fresh_generator()
    x = (torch.randn(3, 13, features, generator=g) * 3 + 1).to(dtype).to(DEVICE).requires_grad_()
    w = torch.randn(features, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(features, generator=g).to(DEVICE).requires_grad_()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = layer_norm(x, w, b, 1e-5)
    ref = reference.layer_norm(x64, w64, b64, 1e-5)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    assert y.dtype == dtype
    for name, got, want in [("y", y, ref), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad),
                            ("db", b.grad, b64.grad)]:
        assert rel_err(got, want) < TOL[dtype], (name, rel_err(got, want), f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_matches_float64(dtype):
    g, seed = fresh_generator()
    N, V = 29, 301  # V spans several interpreter blocks of 64, the last one partial
    logits = (torch.randn(N, V, generator=g) * 8).to(dtype).to(DEVICE).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[[3, 17]] = -100
    logits64 = logits.detach().double().requires_grad_()
    loss = cross_entropy(logits, labels)
    ref = reference.cross_entropy(logits64, labels)
    dloss = torch.rand(N, generator=g, dtype=torch.float64).to(DEVICE)
    loss.backward(dloss.float())
    ref.backward(dloss)
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert torch.all(loss[[3, 17]] == 0) and torch.all(logits.grad[[3, 17]] == 0)
    assert rel_err(loss, ref) < 1e-5, f"seed {seed}"  # fp32 sums of exactly represented inputs
    assert rel_err(logits.grad, logits64.grad) < TOL[dtype], f"seed {seed}"


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 3e4]], device=DEVICE, requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([0, 2], device=DEVICE))
    loss.sum().backward()
    # Exact answers (0 and ln 2) up to fp32 rounding of ln 2 (6e-8 relative).
    assert torch.allclose(loss, torch.tensor([0.0, 0.6931472], device=DEVICE), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(logits.grad).all()
