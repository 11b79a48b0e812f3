"""How far each layout of tests/test_parallel.py lands from one process, in a precision: the
measurement the tests' tolerances are derived from (docs/PERFORMANCE.md, "Layout equality").

    python tools/bench/layout_noise.py float64        # or fp32, bf16; add -k TP2 to filter

Prints, per layout, the largest relative error over the 3 steps of the loss, the full gradient
and the worst single parameter, then the largest of each over all layouts (in units of the
precision's epsilon too)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.parallel_harness import MOE, run_parallel  # noqa: E402
from tests.test_parallel import (  # noqa: E402
    FOUR_LAYERS,
    LAYOUTS,
    MOE_LAYOUTS,
    PIPELINE_LAYOUTS,
    PIPELINE_MOE_LAYOUTS,
    PRECISION_FLAGS,
    reference,
    relative_errors,
)

EPS = {"float64": torch.finfo(torch.float64).eps, "fp32": torch.finfo(torch.float32).eps,
       "bf16": torch.finfo(torch.bfloat16).eps}


def cases() -> list[tuple[str, int, str, tuple, list[str]]]:
    """(name, world, model, extra, argv) for every layout the tests check."""
    out = []
    for name, (world, argv) in sorted(LAYOUTS.items()):
        out += [(f"{name} {m}", world, m, (), argv) for m in ("dense", "moe")]
    for name, (world, argv) in sorted(MOE_LAYOUTS.items()):
        capacity = ("--moe-capacity-factor", "1.0") if "--moe-capacity-factor" in argv else ()
        out.append((name, world, "moe", capacity, argv))
    for name, (world, argv) in sorted(PIPELINE_LAYOUTS.items()):
        untie = tuple(a for a in argv if a == "--untie-embeddings-and-output-weights")
        out += [(f"{name} {m}", world, m, tuple(FOUR_LAYERS) + untie, argv) for m in ("dense", "moe")]
    for name, (world, argv) in sorted(PIPELINE_MOE_LAYOUTS.items()):
        out.append((name, world, "moe", tuple(FOUR_LAYERS), argv))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("precision", choices=sorted(PRECISION_FLAGS))
    p.add_argument("-k", default="", help="only layouts whose name contains this")
    args = p.parse_args()
    worst = {"loss": (0.0, ""), "full gradient": (0.0, ""), "parameter": (0.0, "")}
    for name, world, model, extra, argv in cases():
        if args.k not in name:
            continue
        flags = PRECISION_FLAGS[args.precision] + argv + list(extra) + (MOE if model == "moe" else [])
        loss, full, param = relative_errors(run_parallel(world, flags), reference(model, extra, args.precision))
        row = {"loss": max(loss), "full gradient": max(full), "parameter": max(max(p.values()) for p in param)}
        print(f"{name:40s} " + "  ".join(f"{k} {v:.2e}" for k, v in row.items()), flush=True)
        worst = {k: max(worst[k], (row[k], name)) for k in worst}
    eps = EPS[args.precision]
    for kind, (value, name) in worst.items():
        print(f"largest {kind} error: {value:.2e} ({value / eps:.1f} eps), {name}")


if __name__ == "__main__":
    main()
