"""The one GPU check (issue #11 item 6): kernels, train steps, checkpoint and generation on one
H100/H200 in at most 8 minutes, the most important numbers first.

    bash tools/bench/gpu_check.sh                        # everything, into $OUT or gpu_check/
    python tools/bench/gpu_check.py --dry-run            # the plan: sections, commands, time limits
    python tools/bench/gpu_check.py --only a,b --budget-s 200 --out /tmp/gc

Sections, in order, so that a run cut off still leaves the most important numbers:
  a. the kernel tests, natively (bf16 included), and an autotune probe: every GPU autotune
     configuration of the attention kernels compiled and timed, and each dtype's error against a
     float64 reference;
  b. tools/bench/kernels.py: attention (fused, SDPA, FlexAttention, causal flash ceiling), MoE
     permute/unpermute against copy bandwidth and the argsort baseline, LayerNorm and cross entropy;
  c. the m6-base train step in bf16 with each attention backend; d. the same with --compile;
  e. a 10B-wide model (hidden 4096, 2 layers); f. an MoE model of m6-100b's expert width;
  g. tools/bench/checkpoint.py from GPU memory (sync and async save, load, the training stall);
  h. tools/bench/generation.py: KV-cache generation tokens/s at batch 1 and 32.

Each command is a subprocess with a time limit: the budget left, shared among the sections left
in proportion to their weights (build_sections), so time one section does not use goes to later
ones. A command past its limit is killed and reported "cut off"; later sections still run. After every
section `gpu_check.md` (Markdown tables under a header of device, driver, CUDA, torch and Triton
versions), `gpu_check.json` (the same numbers) and `gpu_check.log` (every command's output) are
rewritten under --out (default $OUT when set, else gpu_check/). Each target is printed beside its
measurement.

Exit codes: 0 every correctness check that ran passed (a missed speed target is reported as
"missed": a slow kernel is a finding, not a broken build); 1 a correctness check failed (a test
failed, a kernel's error above tolerance, no autotune configuration compiled, a command crashed);
2 bad arguments; 3 no CUDA device. Cut-off and skipped commands are listed in the report.

A GPU session runs `bash tools/bench/gpu_check.sh` from the repo root (through the device tool:
that command, timeout_s 540, nothing to carry unless wheels are; the three report files come back
from $OUT).

torch: megatron_m6 needs torch >= 2.13 (MIN_TORCH in megatron_m6/__init__.py). The GPU image's
python3 (Python 3.12) has torch 2.11.0+cu130 and Triton 3.6. With an older torch every command
that imports megatron_m6 is skipped as "needs torch >= 2.13 (found X)" and gives its time to the
others; what needs only torch, Triton and m6_kernels still runs: tests/test_kernels_norm_ce.py
(with --noconftest: tests/conftest.py imports megatron_m6), the autotune probe (attention in
bf16, fp16 and fp32, natively) and kernels.py's attention and LayerNorm/cross-entropy parts. The
attention and MoE kernel test files (they build M6 models), kernels.py's MoE part (its baseline is
megatron_m6's router) and sections c-h need torch >= 2.13 there.

Wheels: only a CUDA build of torch >= 2.13 for CPython 3.12 is missing, and none can be carried:
a CUDA torch wheel is hundreds of MB, the device tool carries 64 MiB. None is on the developer
machine either (/opt/wheels/torch-2.13.0+cpu-cp311-...whl is CPU-only; /opt/pypi-more/files/
torch-2.14.1-cp311-...whl, 529 MiB, is for CPython 3.11). Everything else these sections import
is in the image (pytest, numpy, Pillow, tokenizers, safetensors, tensorboard, tqdm, regex,
Triton); of requirements*.txt the image lacks nltk and opencc (imported only by corpus cleaning)
and megatron-core (only tests/test_indexed.py), so none is needed here. gpu_check.sh installs
every wheel in .whl/ (or $M6_WHEELS) with pip --no-index first, should a later image need one.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path[:0] = [REPO, os.path.join(REPO, "kernels")]

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
DEFAULT_BUDGET_S = 450.0  # the 8 minutes, less the wheel install and start-up
TAIL_CHARS = 3000  # of a failed command's output, kept in the JSON
# DESIGN.md's bounds on ||out - ref|| / ||ref|| (as tests/kernels_common.py): fp32 1e-5, bf16/fp16 2e-2.
TOL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}
# Section f: m6-100b's experts (hidden 1024, FFN 4096) in 2 MoE layers. 256 experts hold 4.3B
# parameters, ~69 GB with fp32 weights, gradients and Adam state: the most (a power of two) that
# fits one 80-141 GB GPU beside the activations; m6-100b's 512 would need ~137 GB for the state alone.
MOE_EXPERTS = 256


def min_torch() -> tuple[int, int]:
    """MIN_TORCH, read from megatron_m6/__init__.py rather than imported: importing megatron_m6
    with an older torch exits."""
    with open(os.path.join(REPO, "megatron_m6", "__init__.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MIN_TORCH":
                return tuple(ast.literal_eval(node.value))
    raise RuntimeError("MIN_TORCH not found in megatron_m6/__init__.py")


def torch_too_old(version: str) -> str | None:
    """None when megatron_m6 runs on this torch version; else the reason, for the report."""
    need = min_torch()
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) >= need:
        return None
    return f"needs torch >= {'.'.join(map(str, need))} (found {version})"


# -------------------------------------------------------------------------------- the plan
@dataclass
class Command:
    name: str
    argv: list[str]
    json_path: str | None = None  # where the command writes its rows (a JSON list of dicts)
    skip: str | None = None  # why it cannot run here; None: it runs


@dataclass
class Check:
    """A correctness check (fails the run) or a speed target (reported as missed)."""

    what: str
    measured: str
    goal: str
    passed: bool | None  # None: a measurement with no goal
    correctness: bool = False


@dataclass
class Section:
    key: str
    title: str
    weight: float  # its share of the time budget, relative to the other sections' weights
    commands: list[Command]
    evaluate: Callable[[dict[str, list[dict]]], list[Check]] = lambda rows: []


def ratio_check(what: str, value: float | None, goal: float, fmt: str = "{:.2f}") -> Check:
    shown = "none" if value is None else fmt.format(value)
    return Check(what, shown, ">= " + fmt.format(goal), None if value is None else value >= goal)


def evaluate_kernel_tests(rows: dict[str, list[dict]]) -> list[Check]:
    checks = []
    for r in rows.get("autotune probe", []):
        label = f"attention {r['kernel']} {r['dtype']}"
        checks.append(Check(f"{label}: autotune configurations compiled", f"{r['compiled']} of {r['configs']}",
                            ">= 1", r["compiled"] >= 1, correctness=True))
        if r.get("err") is not None:
            checks.append(Check(f"{label}: relative error vs float64", f"{r['err']:.1e}",
                                f"< {TOL[r['dtype']]:.0e}", r["err"] < TOL[r["dtype"]], correctness=True))
    return checks


def evaluate_kernels(rows: dict[str, list[dict]]) -> list[Check]:
    checks = []
    attention = rows.get("attention", [])
    for r in attention:
        if "err" in r:
            checks.append(Check(f"fused attention seq {r['seq']}: relative error vs SDPA", f"{r['err']:.1e}",
                                f"< {TOL['bfloat16']:.0e}", r["err"] < TOL["bfloat16"], correctness=True))
    at = {r["name"]: r for r in attention if r["seq"] == 2048}
    if "fused (m6_kernels)" in at and "FlexAttention" in at:
        fused, flex = at["fused (m6_kernels)"], at["FlexAttention"]
        checks.append(ratio_check("fused attention forward TFLOP/s, seq 2048", fused["fwd_tflops"], 400, "{:.0f}"))
        speedup = (flex["fwd_ms"] + flex["bwd_ms"]) / (fused["fwd_ms"] + fused["bwd_ms"])
        checks.append(ratio_check("fused vs FlexAttention, forward + backward, seq 2048", speedup, 1.3))
    moe = {r["name"]: r for r in rows.get("moe", [])}
    if moe:
        copy = moe["copy (torch, device bandwidth)"]["gb_s"]
        for fused, baseline in [("permute, fused", "permute, argsort + index_select"),
                                ("unpermute + combine, fused", "unpermute + combine, index_add")]:
            checks.append(ratio_check(f"{fused}: share of copy bandwidth", moe[fused]["gb_s"] / copy, 0.7,
                                      "{:.0%}"))
            checks.append(ratio_check(f"{fused}: speed-up over {baseline}", moe[baseline]["ms"] / moe[fused]["ms"], 3))
    return checks


def evaluate_train_step(rows: dict[str, list[dict]]) -> list[Check]:
    """The m6-base target (>= 45% MFU, bf16) on the best command's step; each one's MFU beside it.
    Commands are named by what they ask for ("m6-base flex compiled"); the rows' attention_backend
    says what the model resolved it to."""
    steps = [(name, r) for name, rs in rows.items() for r in rs]
    if not steps:
        return []
    checks = [Check(f"MFU, {name}", f"{r['mfu']:.1%}", "-", None) for name, r in steps]
    best_name, best = max(steps, key=lambda step: step[1]["mfu"])
    checks.append(ratio_check(f"m6-base train step MFU, best ({best_name})", best["mfu"], 0.45, "{:.0%}"))
    return checks


def evaluate_wide(rows: dict[str, list[dict]]) -> list[Check]:
    return [Check("MFU at the 10B width (hidden 4096)", f"{r['mfu']:.1%}", "-", None)
            for rs in rows.values() for r in rs]


def evaluate_moe_step(rows: dict[str, list[dict]]) -> list[Check]:
    checks = []
    for r in (r for rs in rows.values() for r in rs):
        moe = {name: ms for name, ms in (r.get("range_ms") or {}).items() if name.startswith("moe")}
        if moe and r.get("step_ms"):
            checks.append(Check(f"share of the step in {', '.join(moe)}", f"{sum(moe.values()) / r['step_ms']:.0%}",
                                "-", None))
        checks.append(Check("MoE model MFU", f"{r['mfu']:.1%}", "-", None))
    return checks


def evaluate_generation(rows: dict[str, list[dict]]) -> list[Check]:
    return [Check(f"generation tokens/s, batch {r['batch']}{'' if r['use_cache'] else ', no KV cache'}",
                  f"{r['tokens_per_s']:.0f}", "-", None) for rs in rows.values() for r in rs]


def build_sections(python: str, work: str, torch_version: str) -> list[Section]:
    """Sections a-h with their commands; JSON rows go to `work`. Commands that import megatron_m6
    are marked skipped when this torch is older than MIN_TORCH."""
    old = torch_too_old(torch_version)
    bench = os.path.join(REPO, "tools", "bench")
    numbers = itertools.count()

    def cmd(name: str, argv: list[str], needs_megatron: bool = True, json_flag: bool = True) -> Command:
        path = os.path.join(work, f"{next(numbers)}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}.json")
        return Command(name, argv + (["--json", path] if json_flag else []), path if json_flag else None,
                       old if needs_megatron else None)

    kernel_tests = ["tests/test_kernels_attention.py", "tests/test_kernels_moe.py", "tests/test_kernels_norm_ce.py"]
    if old:  # conftest.py and two of the files import megatron_m6; the norm/CE tests need neither
        tests = [cmd("kernel tests, norm and cross entropy",
                     [python, "-m", "pytest", "-q", "--noconftest", kernel_tests[2]], False, False),
                 Command("kernel tests, attention and MoE", [python, "-m", "pytest", "-q", *kernel_tests[:2]],
                         skip=old)]
    else:
        tests = [cmd("kernel tests", [python, "-m", "pytest", "-q", *kernel_tests], False, False)]
    probe_json = os.path.join(work, "autotune_probe.json")
    probe = Command("autotune probe", [python, os.path.join(bench, "gpu_check.py"), "--probe-autotune", probe_json],
                    probe_json)

    kernels = [cmd(part, [python, os.path.join(bench, "kernels.py"), "--only", part], part == "moe")
               for part in ("attention", "moe", "norm-ce")]

    def train(name: str, *flags: str) -> Command:
        return cmd(name, [python, os.path.join(bench, "train_step.py"), "--bf16", *flags, "--breakdown"])

    base = ["--preset", "m6-base", "--warmup", "3", "--iters", "10"]
    backends = ("fused", "sdpa", "flex")
    return [
        Section("a", "kernel tests and autotune probe", 75, tests + [probe], evaluate_kernel_tests),
        Section("b", "kernel benchmark (tools/bench/kernels.py)", 110, kernels, evaluate_kernels),
        Section("c", "m6-base train step, bf16, per attention backend", 65,
                [train(f"m6-base {b}", *base, "--attention-backend", b) for b in backends], evaluate_train_step),
        Section("d", "m6-base train step, bf16, --compile", 85,
                [train(f"m6-base {b} compiled", *base, "--attention-backend", b, "--compile") for b in backends],
                evaluate_train_step),
        Section("e", "10B width: hidden 4096, 2 layers", 30,
                [train("hidden 4096", "--hidden-size", "4096", "--num-attention-heads", "32",
                       "--ffn-hidden-size", "16384", "--num-layers", "2", "--seq-length", "512",
                       "--micro-batch-size", "8", "--global-batch-size", "8", "--attention-backend", "fused",
                       "--warmup", "2", "--iters", "5")], evaluate_wide),
        Section("f", f"MoE at m6-100b's expert width: {MOE_EXPERTS} experts, fused dispatch, grouped GEMM", 45,
                [train("moe step", "--hidden-size", "1024", "--num-attention-heads", "16", "--ffn-hidden-size", "4096",
                       "--num-layers", "2", "--num-experts", str(MOE_EXPERTS), "--moe-router-topk", "2",
                       "--moe-dispatch-backend", "fused", "--seq-length", "512", "--micro-batch-size", "8",
                       "--global-batch-size", "8", "--warmup", "2", "--iters", "5")], evaluate_moe_step),
        Section("g", "m6-base checkpoint from GPU memory", 40,
                [cmd("checkpoint", [python, os.path.join(bench, "checkpoint.py"), "--preset", "m6-base",
                                    "--device", "cuda"])]),
        Section("h", "KV-cache generation, m6-base", 25,
                [cmd("generation", [python, os.path.join(bench, "generation.py"), "--preset", "m6-base",
                                    "--batch-sizes", "1", "32"])], evaluate_generation),
    ]


SECTION_KEYS = "abcdefgh"


# ------------------------------------------------------------------------------ running it
@dataclass
class CommandResult:
    name: str
    argv: list[str]
    status: str  # ok, failed, cut off, skipped, not run
    seconds: float = 0.0
    rc: int | None = None
    note: str = ""
    rows: list[dict] = field(default_factory=list)
    output_tail: str = ""


@dataclass
class SectionResult:
    key: str
    title: str
    time_limit_s: float
    commands: list[CommandResult]
    checks: list[Check]


def pytest_counts(output: str) -> dict:
    """The counts of pytest's closing line ('3 failed, 40 passed in 9.1s')."""
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|errors?)\b", ln)]
    found = re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1]) if lines else []
    return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}


def run_command(command: Command, timeout_s: float, log_path: str) -> CommandResult:
    """Runs one command (its own process group, so a timeout kills its children too), its
    output appended to the log."""
    result = CommandResult(command.name, command.argv, "ok")
    if command.skip:
        result.status, result.note = "skipped", command.skip
        return result
    if timeout_s < 1:
        result.status, result.note = "not run", "no time left in the budget"
        return result
    with open(log_path, "a") as log:
        log.write(f"\n===== {command.name}: {' '.join(command.argv)} (limit {timeout_s:.0f} s)\n")
        start_offset = log.tell()
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(command.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            result.rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            result.status, result.note = "cut off", f"past its {timeout_s:.0f} s limit"
        result.seconds = time.perf_counter() - start
    with open(log_path) as log:
        log.seek(start_offset)
        output = log.read()
    if result.status == "ok" and result.rc != 0:
        result.status, result.note = "failed", f"exit code {result.rc}"
    if result.status != "ok":
        result.output_tail = output[-TAIL_CHARS:]
    if command.json_path and os.path.exists(command.json_path):
        try:  # a command cut off keeps the rows it wrote, unless it was killed mid-write
            with open(command.json_path) as f:
                result.rows = json.load(f)
        except json.JSONDecodeError:
            result.note += "; its rows file was left half-written"
    elif "pytest" in command.argv:
        counts = pytest_counts(output)
        if counts:
            result.rows = [counts]
    return result


def time_weights(sections: list[Section]) -> list[float]:
    """Each section's share of the budget: its weight, or 0 when all its commands are skipped
    (an older torch), so that its time goes to the sections that run."""
    return [s.weight if any(c.skip is None for c in s.commands) else 0.0 for s in sections]


def run_sections(sections: list[Section], budget_s: float, out_dir: str, env: dict) -> list[SectionResult]:
    """Runs the sections in order within the budget, rewriting the report after each."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "gpu_check.log")
    open(log_path, "w").close()
    deadline = time.perf_counter() + budget_s
    results: list[SectionResult] = []
    weights = time_weights(sections)
    for i, section in enumerate(sections):
        left = deadline - time.perf_counter()
        limit = max(0.0, left * weights[i] / sum(weights[i:])) if weights[i] else 0.0
        section_deadline = time.perf_counter() + limit
        print(f"\n== {section.key}. {section.title} (limit {limit:.0f} s)", flush=True)
        commands = []
        for command in section.commands:
            r = run_command(command, section_deadline - time.perf_counter(), log_path)
            commands.append(r)
            print(f"   [{r.status}{f' {r.seconds:.1f} s' if r.seconds else ''}] {r.name}"
                  f"{f': {r.note}' if r.note else ''}", flush=True)
        rows = {r.name: r.rows for r in commands if r.rows}
        try:
            checks = section.evaluate(rows)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # rows not in the expected shape
            checks = [Check("rows in the expected shape", f"{type(e).__name__}: {e}", "-", False, correctness=True)]
        checks += [Check(f"{r.name} ran", r.note, "exit code 0", False, correctness=True)
                   for r in commands if r.status == "failed"]
        for c in checks:
            print(f"   {c.what}: {c.measured} (goal {c.goal}) {verdict(c)}", flush=True)
        results.append(SectionResult(section.key, section.title, limit, commands, checks))
        write_report(out_dir, env, budget_s, results)
    return results


def exit_code(results: list[SectionResult]) -> int:
    failed = any(c.correctness and c.passed is False for s in results for c in s.checks)
    return EXIT_FAILED if failed else EXIT_OK


# ------------------------------------------------------------------------------ the report
def verdict(check: Check) -> str:
    if check.passed is None:
        return "-" if check.goal == "-" else "no measurement"
    if check.passed:
        return "pass"
    return "FAIL" if check.correctness else "missed"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    return "" if value is None else str(value).replace("|", "/")


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def markdown(env: dict, budget_s: float, results: list[SectionResult]) -> str:
    lines = ["# GPU check", ""]
    lines += table(["device", "driver", "CUDA", "torch", "Triton", "Python"],
                   [[env["device"], env["driver"], env["cuda"], env["torch"], env["triton"], env["python"]]])
    lines += ["", f"Budget {budget_s:.0f} s; megatron_m6: {torch_too_old(env['torch']) or 'runs on this torch'}.",
              f"Exit code {exit_code(results)} (0: every correctness check passed; 1: one failed).", "",
              "## Targets and checks", ""]
    lines += table(["section", "check", "measured", "goal", "result"],
                   [[s.key, c.what, c.measured, c.goal, verdict(c)] for s in results for c in s.checks])
    for s in results:
        lines += ["", f"## {s.key}. {s.title}", "", f"Time limit {s.time_limit_s:.0f} s.", ""]
        lines += table(["command", "status", "seconds", "note"],
                       [[c.name, c.status, c.seconds, c.note] for c in s.commands])
        for c in s.commands:
            if c.rows:
                keys = list(dict.fromkeys(k for row in c.rows for k in row))
                lines += ["", f"### {c.name}", ""] + table(keys, [[row.get(k) for k in keys] for row in c.rows])
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, env: dict, budget_s: float, results: list[SectionResult]) -> None:
    """gpu_check.md and gpu_check.json, each written whole to a temporary file then renamed, so a
    run killed mid-write leaves the previous section's report."""
    doc = {"environment": env, "budget_s": budget_s, "exit_code": exit_code(results),
           "sections": [asdict(s) for s in results]}
    for name, text in [("gpu_check.md", markdown(env, budget_s, results)),
                       ("gpu_check.json", json.dumps(doc, indent=1) + "\n")]:
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


# -------------------------------------------------------------------------- the environment
def environment() -> dict:
    """Device, driver, CUDA, torch, Triton and Python versions, as the report's header shows them."""
    import importlib.metadata

    import torch

    cuda = torch.cuda.is_available()
    driver = "none"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        driver = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return {"device": torch.cuda.get_device_name(0) if cuda else "none", "driver": driver,
            "cuda": torch.version.cuda or "none", "torch": torch.__version__, "triton": triton,
            "python": sys.version.split()[0], "cuda_available": cuda}


# ---------------------------------------------------------------------------- autotune probe
def probe_rows(dtype, device) -> list[dict]:
    """Runs the fused attention forward and backward once in `dtype` at head dim 128, then reads
    each autotuner's timings of the configurations it tried: one that failed to compile (out of
    shared memory, say) is timed as inf. The forward row also has the output's error against the
    float64 reference."""
    import torch

    from m6_kernels import attention, reference

    B, H, S, D = 2, 4, 257, 128  # S odd: never a multiple of a tile
    g = torch.Generator().manual_seed(0)
    prefix, valid = torch.tensor([40, 100], device=device), torch.tensor([257, 200], device=device)
    q64, k64, v64 = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = attention.prefix_lm_attention(q, k, v, prefix, valid)
    out.backward(torch.randn_like(out))
    ref = reference.attention(q64, k64, v64, prefix, valid)
    err = float((out.detach().double() - ref).norm() / ref.norm())
    rows = []
    for kernel, tuner in [("forward", attention._fwd), ("backward dK/dV", attention._dkdv),
                          ("backward dQ", attention._dq)]:
        timings = getattr(tuner, "configs_timings", None) or {}
        ok = [c for c, t in timings.items() if all(math.isfinite(x) for x in (t if isinstance(t, list) else [t]))]
        best = getattr(tuner, "best_config", None)
        rows.append({"kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "configs": len(tuner.configs),
                     "compiled": len(ok), "best": str(best.kwargs) if best else None,
                     "err": err if kernel == "forward" else None})
    return rows


def probe_autotune(json_path: str) -> None:
    """Section a's probe: probe_rows for each dtype on the GPU, written to `json_path`."""
    import torch

    rows: list[dict] = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rows += probe_rows(dtype, "cuda")
        print("\n".join(map(str, rows[-3:])), flush=True)
        with open(json_path, "w") as f:  # after each dtype: a probe cut off keeps what it measured
            json.dump(rows, f, indent=1)


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check",
                   help="report folder (default $OUT when set, else gpu_check/)")
    p.add_argument("--only", default=",".join(SECTION_KEYS), help="sections to run, e.g. a,b,c (default all)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="total seconds for all sections")
    p.add_argument("--dry-run", action="store_true", help="print the sections and commands, run nothing")
    p.add_argument("--probe-autotune", metavar="JSON", help="section a's autotune probe (run by section a)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = [k for k in keys if k not in SECTION_KEYS]
    if bad or not keys or len(set(keys)) != len(keys):
        p.error(f"--only takes distinct sections among {','.join(SECTION_KEYS)}, got {args.only!r}")
    args.only = sorted(keys)
    if not args.budget_s > 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def print_plan(sections: list[Section], budget_s: float) -> None:
    weights = time_weights(sections)
    for s, w in zip(sections, weights):
        print(f"{s.key}. {s.title} (about {budget_s * w / (sum(weights) or 1):.0f} s)")
        for c in s.commands:
            print(f"   {'skipped, ' + c.skip + ': ' if c.skip else ''}{' '.join(c.argv)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_autotune:
        probe_autotune(args.probe_autotune)
        return EXIT_OK
    env = environment()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        sections = [s for s in build_sections(sys.executable, work, env["torch"]) if s.key in args.only]
        if args.dry_run:
            print_plan(sections, args.budget_s)
            return EXIT_OK
        if not env["cuda_available"]:
            print(f"gpu_check: no CUDA device here (torch {env['torch']}, CUDA {env['cuda']}): nothing measured; "
                  "--dry-run prints the plan")
            return EXIT_NO_CUDA
        print(f"gpu_check: {env['device']}, driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, "
              f"Triton {env['triton']}; report in {args.out}", flush=True)
        results = run_sections(sections, args.budget_s, args.out, env)
    code = exit_code(results)
    print(f"\ngpu_check: exit code {code}; report in {os.path.join(args.out, 'gpu_check.md')}")
    return code


if __name__ == "__main__":
    sys.exit(main())
