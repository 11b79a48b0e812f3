"""The pretraining demo's held-out caption accuracy over seeds and intra-op thread counts.

    python tools/bench/demo_captions.py                       # seeds 1 2 3, 1 and 2 threads
    python tools/bench/demo_captions.py --seeds 1 --threads 2 --min-accuracy 95

Runs `examples/pretrain_m6_tiny.sh` once per (seed, threads), each into a checkpoint folder of its
own under --out, reads the "caption accuracy: N/100" line it prints, and prints one row per run
with its wall time. Exits 1 when any run is below --min-accuracy percent: the demo's checkpoint is
what the fine-tuning demo starts from, so a run that misses is a regression, not noise. One run
takes about 6 minutes on 2 cores; run nothing else beside it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCURACY_RE = re.compile(r"caption accuracy: (\d+)/(\d+)")


def run_demo(seed: int, threads: int, save: str, log_path: str) -> tuple[int, int, float]:
    """(right, total, seconds) of one demo run; its whole output goes to log_path."""
    env = {**os.environ, "SEED": str(seed), "OMP_NUM_THREADS": str(threads), "SAVE": save}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(["bash", "examples/pretrain_m6_tiny.sh"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    found = ACCURACY_RE.findall(open(log_path).read())
    if done.returncode or not found:
        sys.exit(f"error: the demo (seed {seed}, {threads} threads) failed with exit code {done.returncode}; "
                 f"see {log_path}")
    right, total = map(int, found[-1])
    return right, total, seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--min-accuracy", type=float, default=95.0, help="percent every run must reach")
    p.add_argument("--out", default="build/bench_demo_captions", help="checkpoints and logs of the runs")
    args = p.parse_args(argv)
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    print("| seed | threads | caption accuracy | wall |")
    print("|---|---|---|---|")
    misses = []
    for seed in args.seeds:
        for threads in args.threads:
            name = f"seed{seed}_threads{threads}"
            save, log = (os.path.join(ROOT, args.out, name + suffix) for suffix in ("", ".log"))
            right, total, seconds = run_demo(seed, threads, save, log)
            percent = 100 * right / total
            print(f"| {seed} | {threads} | {right}/{total} | {seconds:.0f} s |", flush=True)
            if percent < args.min_accuracy:
                misses.append(name)
    if misses:
        sys.exit(f"below {args.min_accuracy:g}%: {', '.join(misses)}")


if __name__ == "__main__":
    main()
