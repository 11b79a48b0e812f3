"""Fused MoE dispatch (gating, permute, unpermute-and-combine) against float64 references, and
the MoE layer on the fused path against its PyTorch path."""

import pytest
import torch

from m6_kernels import reference
from m6_kernels.moe import permute, topk_gating, unpermute
from megatron_m6.model.moe import MoEMLP, resolve_moe_dispatch_backend, use_fused_dispatch
from tests.conftest import tiny_config
from tests.kernels_common import DEVICE, ON_GPU, TOL, fresh_generator, rel_err

# (tokens, experts, k, groups, capacity): plain top-k, prototypes, top-1 and top-3 with drops,
# prototypes with drops. Every capacity case has more picks than slots (tokens * k > experts *
# capacity), so it drops whatever the random logits.
GATING_CASES = [(37, 5, 2, 1, None), (41, 6, 2, 2, None), (43, 7, 1, 1, 5), (29, 5, 3, 1, 12),
                (53, 9, 3, 3, 17)]


@pytest.mark.parametrize("T,E,k,groups,capacity", GATING_CASES)
def test_gating_matches_float64(T, E, k, groups, capacity):
    g, seed = fresh_generator()
    logits64 = (torch.randn(T, E, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    logits = logits64.float().requires_grad_()
    ref_logits = logits.detach().double().requires_grad_()
    d = topk_gating(logits, k, groups, capacity)
    ref = reference.topk_gating(ref_logits, k, groups, capacity)
    assert torch.equal(d.expert.long(), ref["expert"]), f"seed {seed}"
    assert torch.equal(d.dest.long(), ref["dest"]), f"seed {seed}"
    assert torch.equal(d.tokens_per_expert.long(), ref["tokens_per_expert"])
    assert torch.equal(d.picks_per_expert.long(), ref["picks_per_expert"])
    assert d.num_rows >= int(ref["tokens_per_expert"].sum())  # sized without reading the device
    if capacity is not None:
        assert (d.dest < 0).any(), "the case must drop something"
    weights = {name: torch.randn(ref[name].shape, generator=g, dtype=torch.float64).to(DEVICE)
               for name in ("probs", "lse", "gate")}
    loss = sum((getattr(d, name) * w).sum() for name, w in weights.items())
    loss.backward()
    sum((ref[name] * w).sum() for name, w in weights.items()).backward()
    for name in weights:
        assert rel_err(getattr(d, name), ref[name]) < 1e-5, (name, f"seed {seed}")
    assert rel_err(logits.grad, ref_logits.grad) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_permute_and_unpermute_match_float64(dtype):
    g, seed = fresh_generator()
    T, E, k, H = 39, 5, 2, 45  # H past one interpreter block of 32: the hidden loop runs twice
    d = topk_gating(torch.randn(T, E, generator=g).to(DEVICE), k, capacity=14)
    x = torch.randn(T, H, generator=g).to(dtype).to(DEVICE).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    rows = permute(x, d.dest, d.num_rows)
    rows64 = reference.permute(x64, d.dest.long(), d.num_rows)
    assert torch.equal(rows.double(), rows64.detach())  # a copy: exact
    y = torch.randn(d.num_rows, H, generator=g).to(dtype).to(DEVICE).requires_grad_()
    y64 = y.detach().double().requires_grad_()
    gate = d.gate.detach().clone().requires_grad_()
    gate64 = gate.detach().double().requires_grad_()
    out = unpermute(y, d.dest, gate)
    out64 = reference.unpermute(y64, d.dest.long(), gate64)
    d_rows = torch.randn(rows.shape, generator=g, dtype=torch.float64).to(DEVICE)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    rows.backward(d_rows.to(dtype))
    rows64.backward(d_rows)
    out.backward(d_out.to(dtype))
    out64.backward(d_out)
    assert out.dtype == dtype
    for name, got, want in [("out", out, out64), ("dx", x.grad, x64.grad), ("dy", y.grad, y64.grad),
                            ("dgate", gate.grad, gate64.grad)]:
        assert rel_err(got, want) < TOL[dtype], (name, rel_err(got, want), f"seed {seed}")


@pytest.mark.parametrize("overrides", [
    dict(num_experts=5, moe_router_topk=2),
    dict(num_experts=4, moe_router_topk=1, moe_capacity_factor=0.75),
    dict(num_experts=6, moe_router_topk=2, moe_expert_prototypes=2, moe_z_loss_coeff=1e-2),
], ids=["top2-dropless", "top1-capacity", "prototypes-zloss"])
def test_moe_layer_fused_matches_torch(overrides):
    g, seed = fresh_generator()
    x = torch.randn(2, 19, 32, generator=g).to(DEVICE)
    results = {}
    for backend in ("torch", "fused"):
        torch.manual_seed(0)
        moe = MoEMLP(tiny_config(**overrides, moe_dispatch_backend=backend)).to(DEVICE)
        for p in moe.parameters():
            torch.nn.init.normal_(p, 0, 0.3)
        xi = x.clone().requires_grad_()
        y, aux = moe(xi)
        (y.square().sum() + aux).backward()
        results[backend] = [y, aux, xi.grad] + [p.grad for p in moe.parameters()]
    for got, want in zip(results["fused"], results["torch"]):
        assert rel_err(got, want) < 1e-5, f"seed {seed}"


def test_dispatch_backend_choice():
    cfg = tiny_config(num_experts=4)
    cpu = torch.device("cpu")
    assert not use_fused_dispatch("auto", cpu)
    assert not use_fused_dispatch("torch", DEVICE)
    assert use_fused_dispatch("fused", DEVICE)
    assert use_fused_dispatch("auto", DEVICE) == ON_GPU
    assert resolve_moe_dispatch_backend(cfg, cpu) == "torch"
    cfg.moe_dispatch_backend = "fused"
    assert resolve_moe_dispatch_backend(cfg, DEVICE).startswith("fused (Triton")
    with pytest.raises(ValueError, match="not one of"):
        use_fused_dispatch("deepep", DEVICE)


@pytest.mark.skipif(not ON_GPU, reason="torch._grouped_mm runs bf16 on CUDA")
def test_grouped_gemm_matches_per_expert_loop():
    torch.manual_seed(0)
    moe = MoEMLP(tiny_config(num_experts=4, hidden_size=64, ffn_hidden_size=128)).to(DEVICE).bfloat16()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    counts = torch.tensor([7, 0, 12, 5], device=DEVICE)
    x = torch.randn(24, 64, device=DEVICE, dtype=torch.bfloat16)
    assert moe.experts._grouped_mm_dtype(x) == torch.bfloat16
    grouped = moe.experts(x, counts)
    loop = torch.cat([torch.nn.functional.gelu(c.float() @ moe.experts.w1[e].float() + moe.experts.b1[e].float())
                      @ moe.experts.w2[e].float() + moe.experts.b2[e].float()
                      for e, c in enumerate(torch.split(x, counts.tolist())) if c.shape[0]])
    assert rel_err(grouped, loop) < 2e-2
