"""Training step time, tokens/s, MFU, memory and where the time goes, for any configuration the
trainer takes (its flags), on synthetic batches, in one process.

    python tools/bench/train_step.py --preset m6-tiny                       # CPU
    python tools/bench/train_step.py --preset m6-base --bf16 --attention-backend fused --compile
    python tools/bench/train_step.py --preset m6-tiny --sweep-recompute     # none/selective/full
    python tools/bench/train_step.py --preset m6-base --bf16 --breakdown --json out.json

The model is built as `pretrain` builds it (the layout's plans, recomputation, --compile), so
what is measured is what trains. MFU divides the model FLOPs the log line counts (transformer
and image encoder, no recomputation) by the peak the log line uses (--peak-tflops, the device
table, else a matmul timed here). Memory: the CUDA allocator's peak on a GPU; on any device the
activations one micro-batch leaves for the backward (every saved tensor's storage once, and the
inputs a recomputed module keeps; parameters not counted), which is what recomputation trades.
--breakdown profiles one more step and reports the time inside the model's named ranges
(attention, moe_dispatch, moe_experts: kernels launched inside them, device time on a GPU) and the step's
timers (data wait, forward-backward, grad sync, optimizer).

--json PATH writes a list of results, one per configuration run (tools/bench/gpu_check.py reads it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper  # noqa: E402

from megatron_m6.config import RunConfig, build_parser, config_from_args, validate  # noqa: E402
from megatron_m6.pretrain import kernel_backends, setup  # noqa: E402
from megatron_m6.training.loss_sums import LossSums  # noqa: E402
from megatron_m6.training.trainer import StepStats, Trainer  # noqa: E402

RECOMPUTE_OPTIONS = (None, "selective", "full")
RANGES = ("attention", "moe_dispatch", "moe_experts")  # the model's profiler ranges (model/attention.py, moe.py)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(trainer: Trainer, batch: dict) -> int:
    """Bytes one micro-batch's forward keeps for its backward: every saved tensor's storage once,
    plus the inputs that recomputed (checkpoint-wrapped) modules keep to run again; parameters
    are not counted. The backward then runs, so nothing stays behind."""
    model = trainer.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
        return t

    def keep_inputs(module, args, kwargs):
        for t in itertools.chain(args, kwargs.values()):
            keep(t)

    hooks = [m.register_forward_pre_hook(keep_inputs, with_kwargs=True)
             for m in model.modules() if isinstance(m, CheckpointWrapper)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss, aux = trainer.forward_loss(trainer._to_device(batch), LossSums.zeros(trainer.device))
    finally:
        for hook in hooks:
            hook.remove()
    (loss + aux).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(kept.values())


def profiled_ranges(trainer: Trainer, micro: list[dict], stats: StepStats) -> dict[str, float]:
    """Milliseconds inside each of RANGES during one step (device time on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = trainer.device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.train_step(micro, stats)
        sync(trainer.device)
    totals = {e.key: (e.device_time_total if cuda else e.cpu_time_total) for e in prof.key_averages()}
    return {name: totals.get(name, 0.0) / 1e3 for name in RANGES}


def measure(cfg: RunConfig, warmup: int, iters: int, breakdown: bool) -> dict:
    """One configuration: build it, train warmup + iters steps on mock batches, report."""
    cfg.train_iters = warmup + iters + 2  # + the activation count and the profiled step
    validate(cfg)
    build_start = time.perf_counter()
    trainer, loader = setup(cfg, log=lambda line: None)
    device, n = trainer.device, trainer.num_micro_batches
    batches = iter(loader)
    steps = [list(itertools.islice(batches, n)) for _ in range(cfg.train_iters)]
    stats = StepStats(device)
    first_start = time.perf_counter()
    trainer.train_step(steps[0], stats)  # compiles, under --compile
    sync(device)
    first_step_s = time.perf_counter() - first_start
    for micro in steps[1:warmup]:
        trainer.train_step(micro, stats)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.timers.pop_seconds()
    timed = steps[warmup:warmup + iters]
    tokens = sum(int(b["valid_len"].sum()) for micro in timed for b in micro)
    samples = sum(b["tokens"].shape[0] for micro in timed for b in micro)
    images = sum(int(b["has_image"].sum()) for micro in timed for b in micro)
    start = time.perf_counter()
    for micro in timed:
        trainer.train_step(micro, stats)
    sync(device)
    elapsed = time.perf_counter() - start
    timers = trainer.timers.pop_seconds()
    tflops = trainer._model_flops(samples, images) / elapsed / 1e12
    peak = trainer._peak
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "dtype": "bf16" if cfg.bf16 else cfg.params_dtype,
        "preset": cfg.preset, "seq_length": cfg.seq_length, "micro_batch_size": cfg.micro_batch_size,
        "global_batch_size": cfg.global_batch_size, "num_layers": cfg.model.num_layers,
        "hidden_size": cfg.model.hidden_size, "num_experts": cfg.model.num_experts,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "attention_backend": kernel_backends(cfg, device), "compile": cfg.compile,
        "recompute": cfg.recompute_granularity or "none",
        "build_s": first_start - build_start, "first_step_s": first_step_s,
        "step_time_s": elapsed / iters, "tokens_per_s": tokens / elapsed, "tflops_per_gpu": tflops,
        "mfu": tflops / peak.tflops, "peak_tflops": peak.tflops, "peak_source": peak.source,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "timers_ms": {name: 1e3 * s / iters for name, s in timers.items()},
    }
    result["activation_gib"] = saved_activation_bytes(trainer, steps[warmup + iters][0]) / 2**30
    if breakdown:
        result["range_ms"] = profiled_ranges(trainer, steps[-1], stats)
        result["step_ms"] = 1e3 * elapsed / iters
    return result


def describe(r: dict) -> str:
    memory = (f" | peak {r['peak_allocated_gib']:.2f} GiB allocated, {r['peak_reserved_gib']:.2f} reserved"
              if r["peak_allocated_gib"] is not None else "")
    text = (f"recompute {r['recompute']:9s} | compile {'on ' if r['compile'] else 'off'} | "
            f"step {r['step_time_s'] * 1e3:8.1f} ms | tokens/s {r['tokens_per_s']:9.0f} | "
            f"TFLOP/s {r['tflops_per_gpu']:.4g} | MFU {100 * r['mfu']:.3g}% | "
            f"activations {r['activation_gib'] * 1024:.1f} MiB/micro-batch{memory} | "
            f"first step {r['first_step_s']:.1f} s")
    if "range_ms" in r:
        text += " | " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["range_ms"].items())
    return text


def main() -> None:
    parser = build_parser()
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    bench.add_argument("--iters", type=int, default=10, help="timed steps")
    bench.add_argument("--sweep-recompute", action="store_true",
                       help="run without recomputation, selective and full, in this process")
    bench.add_argument("--breakdown", action="store_true", help="profile one more step: time per range")
    bench.add_argument("--json", metavar="PATH", help="write the results here")
    ns = parser.parse_args()
    options = {k: getattr(ns, k) for k in ("warmup", "iters", "sweep_recompute", "breakdown", "json")}
    for k in options:
        delattr(ns, k)
    if options["warmup"] < 1 or options["iters"] < 1:
        parser.error("--warmup and --iters must be at least 1")
    ns.mock_data = True
    ns.preset = ns.preset or ("m6-tiny" if ns.hidden_size is None else None)
    base = config_from_args(ns)
    runs = ([dataclasses.replace(base, model=dataclasses.replace(base.model), recompute_granularity=g)
             for g in RECOMPUTE_OPTIONS] if options["sweep_recompute"] else [base])
    results = []
    for i, cfg in enumerate(runs):
        r = measure(cfg, options["warmup"], options["iters"], options["breakdown"])
        if i == 0:
            print(f"device: {r['device']}; torch {r['torch']}; {r['dtype']}; {r['attention_backend']}")
            print(f"preset {cfg.preset}: {r['num_layers']} layers, hidden {r['hidden_size']}, seq "
                  f"{r['seq_length']}, micro batch {r['micro_batch_size']}, global batch "
                  f"{r['global_batch_size']}, {r['params'] / 1e6:.1f}M parameters; MFU against "
                  f"{r['peak_tflops']:.4g} TFLOP/s ({r['peak_source']})")
        print(describe(r), flush=True)
        results.append(r)
    if len(results) > 1:
        base_r = results[0]
        for r in results[1:]:
            print(f"{r['recompute']} vs none: step time x{r['step_time_s'] / base_r['step_time_s']:.2f}, "
                  f"activations x{r['activation_gib'] / base_r['activation_gib']:.2f}")
    if options["json"]:
        with open(options["json"], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
