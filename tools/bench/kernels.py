"""Kernel benchmark: m6_kernels against PyTorch's fastest paths, on one CUDA GPU.

    python tools/bench/kernels.py                 # everything, defaults below
    python tools/bench/kernels.py --only attention --seqs 2048

- Attention, prefix-LM masks (per sample: prefix in [S/8, S/2], valid in [3S/4, S]), head dim
  128, bf16: forward and backward TFLOP/s of the fused kernel, SDPA with the explicit boolean
  mask, FlexAttention (compiled) with the same block mask, and SDPA's flash path with
  is_causal=True as the ceiling. FLOPs count only the (query, key) pairs the mask allows
  (4 * pairs * head_dim per head forward, 2.5x that backward), the same for every backend.
- MoE dispatch, bf16: permute and unpermute-and-combine GB/s (bytes that must move) of the fused
  kernels against argsort + index_select / index_add, and against the device's copy bandwidth
  measured here; gating time against the PyTorch router.
- Fused LayerNorm and cross entropy (forward + backward) against PyTorch.

Prints Markdown tables headed by the device and versions, for docs/PERFORMANCE.md, then the
issue's targets (H100): attention >= 1.3x FlexAttention and >= 400 TFLOP/s forward at sequence
2048; permute/unpermute >= 70% of copy bandwidth. `--json PATH` also writes the rows as a list of
dicts, each with a "part" (attention, moe, norm-ce), rewritten after each part (tools/bench/gpu_check.py reads it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [REPO, os.path.join(REPO, "kernels")]  # run from a checkout, installed or not
DEVICE = torch.device("cuda")


def bench_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn() on the GPU (Triton's do_bench: warm-up, L2 flush, CUDA events)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def fwd_bwd_ms(fn, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """(forward, backward) milliseconds of out = fn(*inputs)."""
    fwd = bench_ms(lambda: fn(*inputs))
    out = fn(*inputs)
    grad = torch.randn_like(out)
    bwd = bench_ms(lambda: out.backward(grad, retain_graph=True), grad_to_none=inputs)
    return fwd, bwd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------- attention
def attention_rows(seq: int, tokens: int, heads: int, head_dim: int) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from m6_kernels import reference
    from m6_kernels.attention import prefix_lm_attention

    dev = DEVICE
    B = max(1, tokens // seq)
    g = torch.Generator().manual_seed(seq)
    prefix = torch.randint(seq // 8, seq // 2 + 1, (B,), generator=g).to(dev)
    valid = torch.randint(3 * seq // 4, seq + 1, (B,), generator=g).to(dev)
    q, k, v = (torch.randn(B, heads, seq, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = reference.prefix_lm_allowed(prefix, valid, seq)
    pairs = int(mask.sum()) * heads
    causal_pairs = B * heads * seq * (seq + 1) // 2

    def mask_mod(b, h, i, j):
        return (j < valid[b]) & ((j < prefix[b]) | (j <= i))

    block_mask = create_block_mask(mask_mod, B, None, seq, seq, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)

    def flash_causal(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls = [
        ("fused (m6_kernels)", lambda q, k, v: prefix_lm_attention(q, k, v, prefix, valid), pairs),
        ("FlexAttention", lambda q, k, v: flex(q, k, v, block_mask=block_mask), pairs),
        ("SDPA, explicit mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), pairs),
        ("SDPA flash, is_causal (ceiling)", flash_causal, causal_pairs),
    ]
    check = rel_err(impls[0][1](q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    rows = []
    for name, fn, n_pairs in impls:
        fwd, bwd = fwd_bwd_ms(fn, [q, k, v])
        flops = 4 * n_pairs * head_dim
        rows.append(dict(seq=seq, batch=B, name=name, fwd_ms=fwd, bwd_ms=bwd,
                         fwd_tflops=flops / fwd / 1e9, bwd_tflops=2.5 * flops / bwd / 1e9))
    rows[0]["err"] = check
    return rows


def print_attention(rows: list[dict], heads: int, head_dim: int) -> None:
    print(f"\n### Attention, prefix-LM mask, {heads} heads, head dim {head_dim}, bf16\n")
    print("| seq | batch | backend | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['seq']} | {r['batch']} | {r['name']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
              f"{r['bwd_ms']:.3f} | {r['bwd_tflops']:.0f} |")
    for r in rows:
        if "err" in r:
            print(f"\nseq {r['seq']}: fused vs SDPA output, relative error {r['err']:.1e}", end="")
    print()


# ----------------------------------------------------------------------------------- MoE dispatch
def moe_rows(tokens: int, hidden: int, experts: int, topk: int) -> list[tuple[str, float, float]]:
    """(name, milliseconds, GB/s) rows; GB/s is None for the gating (compute, not bytes)."""
    from m6_kernels.moe import permute, topk_gating, unpermute
    from megatron_m6.config import ModelConfig
    from megatron_m6.model.moe import route

    dev = DEVICE
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(tokens, experts, device=dev)
    d = topk_gating(logits, topk)
    cfg = ModelConfig(num_experts=experts, moe_router_topk=topk, moe_capacity_factor=None)
    r = route(logits, cfg)
    n = d.num_rows
    y = torch.randn(n, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gate = d.gate.detach().clone().requires_grad_()
    row_bytes = hidden * 2
    # Bytes that must move: every token row read once and written k times (or the reverse).
    permute_bytes = tokens * row_bytes + n * row_bytes
    combine_bytes = n * row_bytes + tokens * row_bytes

    src = torch.empty(n * hidden, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    rows = [("copy (torch, device bandwidth)", copy_ms, 2 * src.numel() * 2 / copy_ms / 1e6)]

    def torch_permute(x):
        order = torch.argsort(r.expert_idx, stable=True)
        return x.index_select(0, r.token_idx[order])

    order = torch.argsort(r.expert_idx, stable=True)
    token_sorted = r.token_idx[order]
    gate_sorted = r.gate[order].detach().clone().requires_grad_()

    def torch_combine(y, gate):
        return torch.zeros(tokens, hidden, device=dev, dtype=y.dtype).index_add_(
            0, token_sorted, (y * gate[:, None]).to(y.dtype))

    for name, fn, inputs, nbytes in [
        ("permute, fused", lambda x: permute(x, d.dest, n), [x], permute_bytes),
        ("permute, argsort + index_select", torch_permute, [x], permute_bytes),
        ("unpermute + combine, fused", lambda y, gate: unpermute(y, d.dest, gate), [y, gate], combine_bytes),
        ("unpermute + combine, index_add", torch_combine, [y, gate_sorted], combine_bytes),
    ]:
        fwd, bwd = fwd_bwd_ms(fn, inputs)
        rows.append((name, fwd, nbytes / fwd / 1e6))
        rows.append((name + " (backward)", bwd, nbytes / bwd / 1e6))
    rows.append(("gating, fused", bench_ms(lambda: topk_gating(logits, topk)), None))
    rows.append(("gating, torch route()", bench_ms(lambda: route(logits, cfg)), None))
    return rows


def print_moe(rows, tokens: int, hidden: int, experts: int, topk: int) -> None:
    print(f"\n### MoE dispatch, {tokens} tokens, hidden {hidden}, {experts} experts, top-{topk}, bf16\n")
    print("| operation | ms | GB/s | of copy bandwidth |")
    print("| --- | ---: | ---: | ---: |")
    copy = rows[0][2]
    for name, ms, gbs in rows:
        shown = f"{gbs:.0f} | {100 * gbs / copy:.0f}%" if gbs else "- | -"
        print(f"| {name} | {ms:.3f} | {shown} |")


# ---------------------------------------------------------------------------- LayerNorm and CE
def norm_ce_rows(tokens: int, hidden: int, vocab: int) -> list[tuple[str, float, float]]:
    import torch.nn.functional as F

    from m6_kernels.cross_entropy import cross_entropy
    from m6_kernels.norm import layer_norm

    dev = DEVICE
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device=dev, requires_grad=True)
    b = torch.randn(hidden, device=dev, requires_grad=True)
    logits = torch.randn(tokens, vocab, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=dev)
    rows = []
    for name, fn, inputs in [
        ("LayerNorm, fused", lambda x, w, b: layer_norm(x, w, b), [x, w, b]),
        ("LayerNorm, torch", lambda x, w, b: F.layer_norm(x, (hidden,), w.to(x.dtype), b.to(x.dtype)), [x, w, b]),
        ("cross entropy, fused", lambda z: cross_entropy(z, labels), [logits]),
        ("cross entropy, torch", lambda z: F.cross_entropy(z.float(), labels, reduction="none"), [logits]),
    ]:
        fwd, bwd = fwd_bwd_ms(fn, inputs)
        rows.append((name, fwd, bwd))
    return rows


def print_norm_ce(rows, tokens: int, hidden: int, vocab: int) -> None:
    print(f"\n### LayerNorm ({tokens} x {hidden}) and cross entropy ({tokens} x {vocab}), bf16\n")
    print("| operation | fwd ms | bwd ms |")
    print("| --- | ---: | ---: |")
    for name, fwd, bwd in rows:
        print(f"| {name} | {fwd:.3f} | {bwd:.3f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["attention", "moe", "norm-ce"])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (attention: batch = tokens / seq)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=21128)
    p.add_argument("--json", metavar="PATH", help="also write the rows here, as a JSON list of dicts")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tools/bench/kernels.py needs a CUDA device; none is available here")
    if importlib.util.find_spec("triton") is None:
        sys.exit("tools/bench/kernels.py needs Triton (pip install triton)")
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB); torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, Triton {triton.__version__}")
    written: list[dict] = []

    def save(part: str, rows: list[dict]) -> None:
        if args.json:
            written.extend({"part": part, **r} for r in rows)
            with open(args.json, "w") as f:
                json.dump(written, f, indent=1)

    if args.only in (None, "attention"):
        rows = [r for s in args.seqs for r in attention_rows(s, args.tokens, args.heads, args.head_dim)]
        print_attention(rows, args.heads, args.head_dim)
        save("attention", rows)
        at = {r["name"]: r for r in rows if r["seq"] == 2048}
        if at:
            fused, flex = at["fused (m6_kernels)"], at["FlexAttention"]
            print(f"\ntarget, seq 2048: fused forward {fused['fwd_tflops']:.0f} TFLOP/s (>= 400), "
                  f"{flex['fwd_ms'] / fused['fwd_ms']:.2f}x FlexAttention forward, "
                  f"{flex['bwd_ms'] / fused['bwd_ms']:.2f}x backward (>= 1.3)")
    if args.only in (None, "moe"):
        rows = moe_rows(args.tokens, args.hidden, args.experts, args.topk)
        print_moe(rows, args.tokens, args.hidden, args.experts, args.topk)
        save("moe", [dict(name=name, ms=ms, gb_s=gbs) for name, ms, gbs in rows])
        copy = rows[0][2]
        shares = {name: gbs / copy for name, _, gbs in rows if name in ("permute, fused", "unpermute + combine, fused")}
        print("\ntarget: " + ", ".join(f"{n} {100 * s:.0f}% of copy bandwidth" for n, s in shares.items())
              + " (>= 70%)")
    if args.only in (None, "norm-ce"):
        rows = norm_ce_rows(args.tokens, args.hidden, args.vocab)
        print_norm_ce(rows, args.tokens, args.hidden, args.vocab)
        save("norm-ce", [dict(name=name, fwd_ms=fwd, bwd_ms=bwd) for name, fwd, bwd in rows])


if __name__ == "__main__":
    main()
