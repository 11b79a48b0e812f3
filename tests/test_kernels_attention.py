"""The fused prefix-LM attention kernel against a float64 reference, and its use in the model."""

import importlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from m6_kernels import reference
from m6_kernels.attention import prefix_lm_attention
from megatron_m6.model import M6, target_loss
from tests.conftest import random_batch, tiny_config
from tests.kernels_common import DEVICE, MATMUL_DTYPES, ON_GPU, TOL, fresh_generator, rel_err

attn_module = importlib.import_module("megatron_m6.model.attention")


def packed_qkv(B, H, S, D, dtype, g):
    """q, k, v as the model makes them: strided views of one [B, S, H, 3, D] projection, values
    already rounded to `dtype`, plus their float64 copies for the reference."""
    qkv = torch.randn(B, S, H, 3, D, generator=g).to(dtype).to(DEVICE)
    views = [t.requires_grad_() for t in qkv.permute(3, 0, 2, 1, 4)]
    return views, [t.detach().double().requires_grad_() for t in views]


def lengths(B, S, g):
    """Per-sample (prefix, valid): tiles fully masked by a short valid_len with no prefix, a
    random split, all prefix, pure causal; more random ones past four samples."""
    cases = [(0, 5), None, (S, S), (0, S)]
    prefix, valid = [], []
    for b in range(B):
        case = cases[b] if b < len(cases) else None
        if case is None:
            v = int(torch.randint(2, S + 1, (1,), generator=g))
            case = (int(torch.randint(0, v + 1, (1,), generator=g)), v)
        prefix.append(case[0])
        valid.append(case[1])
    return torch.tensor(prefix, device=DEVICE), torch.tensor(valid, device=DEVICE)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", MATMUL_DTYPES, ids=str)
def test_forward_and_gradients_match_float64(head_dim, dtype):
    g, seed = fresh_generator()
    B, H = 5, 3
    S = int(torch.randint(20, 40, (1,), generator=g)) * 2 + 1  # odd: never a multiple of a tile
    (q, k, v), (q64, k64, v64) = packed_qkv(B, H, S, head_dim, dtype, g)
    prefix, valid = lengths(B, S, g)
    out = prefix_lm_attention(q, k, v, prefix, valid)
    ref = reference.attention(q64, k64, v64, prefix, valid)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    out.backward(dout.to(dtype))
    ref.backward(dout)
    assert out.shape == (B, H, S, head_dim) and out.dtype == dtype
    for name, got, want in [("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                            ("dv", v.grad, v64.grad)]:
        assert rel_err(got, want) < TOL[dtype], (name, rel_err(got, want), f"seed {seed}, S {S}")


def test_empty_sample_gives_zeros_and_padding_is_never_read():
    """valid_len 0 gives zeros, not NaN; keys and values past valid_len may hold NaN without
    touching any output or any gradient of the valid keys."""
    g, seed = fresh_generator()
    B, H, S, D = 3, 2, 45, 64
    (q, k, v), (q64, k64, v64) = packed_qkv(B, H, S, D, torch.float32, g)
    prefix, valid = torch.tensor([0, 7, 3], device=DEVICE), torch.tensor([0, 30, 19], device=DEVICE)
    ref = reference.attention(q64, k64, v64, prefix, valid)
    pad = torch.arange(S, device=DEVICE)[None, None, :, None] >= valid[:, None, None, None]
    k_nan = torch.where(pad, float("nan"), k.detach()).requires_grad_()
    v_nan = torch.where(pad, float("nan"), v.detach()).requires_grad_()
    out = prefix_lm_attention(q, k_nan, v_nan, prefix, valid)
    out.sum().backward()
    ref.sum().backward()
    assert torch.all(out[0] == 0)
    assert rel_err(out, ref) < 1e-5, f"seed {seed}"
    for got, want in [(q.grad, q64.grad), (k_nan.grad, k64.grad), (v_nan.grad, v64.grad)]:
        assert rel_err(got, want) < 1e-5, f"seed {seed}"


def test_recomputation_gives_the_same_gradients():
    g, _ = fresh_generator()
    (q, k, v), _ = packed_qkv(2, 2, 33, 64, torch.float32, g)
    prefix, valid = torch.tensor([5, 0], device=DEVICE), torch.tensor([33, 21], device=DEVICE)

    def fn(q, k, v):
        return attn_module.attention(q, k, v, prefix, valid, backend="fused").square().sum()

    grads = torch.autograd.grad(fn(q, k, v), (q, k, v))
    again = torch.autograd.grad(checkpoint(fn, q, k, v, use_reentrant=False), (q, k, v))
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


def test_model_with_fused_attention_matches_sdpa(monkeypatch):
    """Loss and every gradient of a tiny M6 (head dim 64, two heads) with the fused kernel in fp32,
    against the same model on sdpa in float64. The loss and the whole gradient are held to the
    fp32 bound (1e-5); each parameter on its own to 8x the largest distance of the fp32 sdpa run
    from float64, the noise floor of fp32 (BatchNorm weights of the ResNet, normalising over three
    images, round to ~5e-6 on their own)."""
    import m6_kernels.attention

    calls = []
    kernel = m6_kernels.attention.prefix_lm_attention
    monkeypatch.setattr(m6_kernels.attention, "prefix_lm_attention", lambda *a: calls.append(1) or kernel(*a))
    results = {}
    for backend, dtype in (("sdpa", torch.float64), ("sdpa", torch.float32), ("fused", torch.float32)):
        cfg = tiny_config(hidden_size=128, num_attention_heads=2, ffn_hidden_size=64, attention_backend=backend)
        torch.manual_seed(0)
        model = M6(cfg).to(DEVICE, dtype)
        batch = {k: v.to(DEVICE) for k, v in random_batch(cfg, batch=3, seq=27).items()}
        logits, aux = model(batch["tokens"], batch["prefix_len"], batch["valid_len"],
                            batch["images"].to(dtype), batch["has_image"])
        loss = target_loss(logits, batch["labels"], batch["loss_mask"]) / batch["loss_mask"].sum() + aux
        loss.backward()
        results[backend, dtype] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == cfg.num_layers  # the fused run really ran the kernel, in every layer
    (loss64, grads64), (_, grads32) = results["sdpa", torch.float64], results["sdpa", torch.float32]
    loss_f, grads_f = results["fused", torch.float32]
    assert rel_err(loss_f, loss64) < TOL[torch.float32]
    assert grads64.keys() == grads_f.keys() and all(g is not None for g in grads_f.values())
    full = {name: torch.cat([g[n].flatten().double() for n in sorted(grads64)]) for name, g in
            (("fused", grads_f), ("float64", grads64))}
    assert rel_err(full["fused"], full["float64"]) < TOL[torch.float32]
    noise = max(rel_err(grads32[n], grads64[n]) for n in grads64 if grads64[n].norm() > 0)
    for name in grads64:
        if grads64[name].norm() > 0:
            assert rel_err(grads_f[name], grads64[name]) <= 8 * noise, (name, noise)


def test_backend_choice():
    g, _ = fresh_generator()
    (q, k, v), _ = packed_qkv(1, 2, 9, 64, torch.float32, g)
    pick = attn_module._pick
    assert pick("sdpa", q, k, v, 0, 0.0) == "sdpa"
    assert pick("fused", q, k, v, 0, 0.0) == "fused"
    assert pick("fused", q, k, v, 0, 0.1) == "sdpa"  # no dropout in the kernel
    assert pick("fused", q[:, :, :3], k, v, 6, 0.0) == "sdpa"  # KV-cache decoding
    assert pick("fused", q[..., :16], k[..., :16], v[..., :16], 0, 0.0) == "sdpa"  # head dim 16
    # auto takes the kernel only for bf16/fp16 on CUDA.
    assert pick("auto", q, k, v, 0, 0.0) == "sdpa"
    half = [t.detach().half() for t in (q, k, v)]
    assert pick("auto", *half, 0, 0.0) == ("fused" if ON_GPU else "sdpa")
    with pytest.raises(ValueError, match="not one of"):
        pick("flash", q, k, v, 0, 0.0)
    cfg = tiny_config(hidden_size=128, num_attention_heads=2)
    resolve = attn_module.resolve_attention_backend
    assert resolve(cfg, torch.device("cpu"), torch.float32) == "sdpa"
    cfg.attention_backend = "fused"
    expected = "fused (Triton)" if ON_GPU else "fused (Triton interpreter)"
    assert resolve(cfg, DEVICE, torch.float32) == expected
    cfg.attention_dropout = 0.1
    assert resolve(cfg, DEVICE, torch.float32).startswith("sdpa (no fused kernel")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_matches_sdpa():
    """Flex has no backward on CPU: there it is compared without gradients."""
    g, seed = fresh_generator()
    (q, k, v), (q64, k64, v64) = packed_qkv(2, 2, 21, 64, torch.float32, g)
    prefix, valid = torch.tensor([4, 0], device=DEVICE), torch.tensor([21, 13], device=DEVICE)
    if not ON_GPU:
        q, k, v = (t.detach() for t in (q, k, v))
    out = attn_module.attention(q, k, v, prefix, valid, backend="flex")
    assert attn_module._pick("flex", q, k, v, 0, 0.0) == "flex"
    ref = reference.attention(q64, k64, v64, prefix, valid)
    assert rel_err(out[1, :, :13], ref[1, :, :13]) < 1e-5, f"seed {seed}"  # rows past valid: any value
    assert rel_err(out[0], ref[0]) < 1e-5, f"seed {seed}"
