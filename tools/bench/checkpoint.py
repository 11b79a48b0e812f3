"""Checkpoint throughput for an m6-base-shaped model (350M parameters, fp32, with AdamW state):
save and load GB/s through megatron_m6's distributed checkpoints, beside a plain torch.save /
torch.load of the same state in the same process; the training stall of --async-save; and the
streaming conversion to a safetensors release with its peak memory.

    python tools/bench/checkpoint.py            # make bench-checkpoint
    python tools/bench/checkpoint.py --preset m6-tiny --dir /tmp/x   # a quick smoke run
    python tools/bench/checkpoint.py --device cuda --json /tmp/ckpt.json   # state saved from GPU memory

`--device cuda` builds the model and its AdamW state on the GPU, so saves include the copy out of
GPU memory; `--json PATH` also writes the rows, rewritten after each (a run cut off keeps them).

Loads right after saves read from the page cache unless it can be dropped (root only): the
output says which. Needs about 4x the checkpoint size in free memory and 3x on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [REPO, os.path.join(REPO, "kernels")]

import torch  # noqa: E402

from megatron_m6.config import parse_args  # noqa: E402
from megatron_m6.model import M6  # noqa: E402
from megatron_m6.training.checkpoint import Checkpointer, checkpoint_dir, load_checkpoint  # noqa: E402


def drop_page_cache() -> bool:
    """Make the next read come from disk, where the system lets us (root, not in a container
    that forbids it)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def model_and_optimizer(preset: str, device: str):
    cfg = parse_args(["--preset", preset, "--mock-data"])
    model = M6(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # one step with zero gradients creates the full Adam state
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cfg, model, optimizer


# Runs convert.py and reports its peak memory from VmHWM: unlike ru_maxrss, it does not count the
# pages a child shares with this (large) parent between fork and exec.
PEAK_WRAPPER = "\n".join([
    "import runpy, sys",
    "sys.argv = sys.argv[1:]",
    "try:",
    "    runpy.run_path(sys.argv[0], run_name='__main__')",
    "finally:",
    "    print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"])


def run_converter(*args: str) -> tuple[float, int]:
    """(seconds, peak resident bytes) of one tools/checkpoint/convert.py run."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_WRAPPER,
                          os.path.join(REPO, "tools", "checkpoint", "convert.py"), *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"conversion failed: {out.stderr[-500:]}")
    return time.perf_counter() - start, int(out.stdout.split()[-1]) * 1024


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="m6-base")
    p.add_argument("--dir", help="where to write (default: a temporary folder, removed after)")
    p.add_argument("--repeat", type=int, default=1,
                   help="also time this many more saves back to back, sync and async")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and its state live")
    p.add_argument("--json", metavar="PATH", help="also write the rows here, as a JSON list of dicts")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    root = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    os.makedirs(root, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, model, optimizer = model_and_optimizer(args.preset, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters on {args.device}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, writing to {root}")
    rows: list[dict] = []

    def report(what: str, seconds: float, nbytes: int, note: str = "") -> None:
        print(f"{what:<44} {nbytes / 2**30:6.2f} GiB {seconds:7.2f} s {nbytes / 2**30 / seconds:6.2f} GiB/s  {note}")
        if args.json:
            rows.append(dict(what=what, device=args.device, gib=nbytes / 2**30, seconds=seconds,
                             gib_per_s=nbytes / 2**30 / seconds, note=note))
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    # Baseline: the same state through one torch.save file, fsynced.
    plain = os.path.join(root, "plain.pt")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def plain_save() -> None:
        with open(plain, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    report("baseline torch.save (one file, fsync)", timed(plain_save), os.path.getsize(plain))
    cold = drop_page_cache()
    cache = "cold page cache" if cold else "warm page cache"
    report("baseline torch.load", timed(lambda: torch.load(plain, weights_only=False)), os.path.getsize(plain), cache)
    os.remove(plain)

    # megatron_m6 distributed checkpoints (one process here; each rank writes its own shards).
    meta = {"iteration": 1, "consumed_samples": 0, "model_config": dataclasses.asdict(cfg.model)}
    sync_dir = os.path.join(root, "sync")
    saver = Checkpointer(sync_dir)
    seconds = timed(lambda: saver.save(1, model, optimizer, meta))
    size = folder_bytes(checkpoint_dir(sync_dir, 1))
    report("DCP save (sync, fsync, published)", seconds, size)
    cold = drop_page_cache()
    cache = "cold page cache" if cold else "warm page cache"
    report("DCP load (model + optimizer + RNG)", timed(lambda: load_checkpoint(sync_dir, model, optimizer, cfg.model)),
           size, cache)

    async_dir = os.path.join(root, "async")
    saver = Checkpointer(async_dir, async_save=True, keep_last=1)
    first = timed(lambda: saver.save(1, model, optimizer, meta))
    saver.wait()
    stall = timed(lambda: saver.save(2, model, optimizer, meta))
    total = stall + timed(saver.close)
    report("DCP async save, first: training stalled for", first, size, "allocates the CPU copy")
    report("DCP async save, next: training stalled for", stall, size, "refills the CPU copy")
    report("DCP async save, next: published after", total, size)
    for i in range(args.repeat):  # back to back: the disk still writes back the previous save
        sync_s = timed(lambda i=i: Checkpointer(sync_dir, keep_last=1).save(10 + i, model, optimizer, meta))
        saver = Checkpointer(async_dir, async_save=True, keep_last=1)
        stall = timed(lambda i=i, saver=saver: saver.save(10 + i, model, optimizer, meta))
        total = stall + timed(saver.close)
        report(f"back to back #{i + 1}: DCP sync save", sync_s, size)
        report(f"back to back #{i + 1}: DCP async save published", total, size, f"stalled {stall:.2f} s")

    # Conversions, each in its own process (its peak memory is its own).
    release, back = os.path.join(root, "release"), os.path.join(root, "from_release")
    seconds, peak = run_converter("to-release", "--load", sync_dir, "--output", release, "--max-shard-size", "256MB")
    report("convert checkpoint to release (256 MB shards)", seconds, folder_bytes(release),
           f"peak memory {peak / 2**30:.2f} GiB, Python and torch included")
    seconds, peak = run_converter("from-release", "--input", release, "--output", back)
    report("convert release to checkpoint", seconds, folder_bytes(release),
           f"peak memory {peak / 2**30:.2f} GiB, Python and torch included")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
