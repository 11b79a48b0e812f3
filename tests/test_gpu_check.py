"""tools/bench/gpu_check.py on CPU: arguments, the plan under an old torch, the runner's time
limits and report, the target and correctness verdicts, exit codes; and generation.py's smoke run.

The runner is driven with small `python -c` sections in place of the GPU benchmarks; their rows
have the shapes the real scripts write (train_step.py's JSON spec, kernels.py --json)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import megatron_m6

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "tools", "bench", "gpu_check.py"))
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpu_check)
Section, Command = gpu_check.Section, gpu_check.Command

ENV = {"device": "NVIDIA H200", "driver": "580.159.04", "cuda": "13.0", "torch": "2.13.0+cu130",
       "triton": "3.6.0", "python": "3.12.3", "cuda_available": True}


def writes_rows(rows: list[dict], path: str) -> list[str]:
    """A command that writes `rows` to `path`, as the benchmarks write their --json."""
    return [sys.executable, "-c", f"import json; json.dump({rows!r}, open({path!r}, 'w'))"]


def step_row(backend: str, mfu: float) -> dict:
    """A row of train_step.py's JSON (the keys its spec lists)."""
    return dict(device="NVIDIA H200", torch="2.13.0", dtype="bfloat16", preset="m6-base", seq_length=512,
                micro_batch_size=8, global_batch_size=8, params=3.5e8, attention_backend=backend, compile=False,
                recompute=None, step_time_s=0.1, tokens_per_s=4e4, tflops_per_gpu=mfu * 790, mfu=mfu,
                peak_tflops=790.0, peak_source="matmul", peak_allocated_gib=10.0, peak_reserved_gib=12.0,
                activation_gib=5.0, range_ms={"attention": 20.0, "moe_dispatch": 5.0}, step_ms=100.0)


@pytest.mark.parametrize("argv", [["--only", "a,z"], ["--only", "a,a"], ["--only", ","], ["--budget-s", "0"],
                                  ["--budget-s", "-3"]])
def test_bad_arguments_are_one_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_arguments_and_out_default(monkeypatch):
    monkeypatch.setenv("OUT", "/tmp/from_device")
    args = gpu_check.parse_args(["--only", "c, a", "--budget-s", "60"])
    assert args.only == ["a", "c"] and args.budget_s == 60 and args.out == "/tmp/from_device"
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args([]).out == "gpu_check" and gpu_check.parse_args([]).only == list("abcdefgh")


def test_min_torch_is_read_from_megatron_m6():
    assert gpu_check.min_torch() == megatron_m6.MIN_TORCH
    assert gpu_check.torch_too_old("2.13.0+cu130") is None and gpu_check.torch_too_old("2.14.1") is None
    assert gpu_check.torch_too_old("2.11.0+cu130") == "needs torch >= 2.13 (found 2.11.0+cu130)"


def test_old_torch_runs_only_what_needs_no_megatron_m6(tmp_path):
    sections = gpu_check.build_sections(sys.executable, str(tmp_path), "2.11.0+cu130")
    assert [s.key for s in sections] == list("abcdefgh")
    runs = {c.name for s in sections for c in s.commands if c.skip is None}
    assert runs == {"kernel tests, norm and cross entropy", "autotune probe", "attention", "norm-ce"}
    skipped = [c for s in sections for c in s.commands if c.skip]
    assert all(c.skip == "needs torch >= 2.13 (found 2.11.0+cu130)" for c in skipped)
    assert gpu_check.time_weights(sections) == [s.weight for s in sections[:2]] + [0.0] * 6  # a, b share it all
    norm_tests = next(c for c in sections[0].commands if c.skip is None and "pytest" in c.argv)
    assert "--noconftest" in norm_tests.argv and norm_tests.argv[-1] == "tests/test_kernels_norm_ce.py"
    # megatron_m6's own torch: nothing skipped, the three kernel test files in one pytest run.
    new = gpu_check.build_sections(sys.executable, str(tmp_path), "2.13.0")
    assert all(c.skip is None for s in new for c in s.commands)
    assert sum(a.startswith("tests/test_kernels_") for a in new[0].commands[0].argv) == 3
    paths = [c.json_path for s in new for c in s.commands if c.json_path]
    assert len(paths) == len(set(paths))  # no two commands share a rows file


def test_no_cuda_is_one_line_and_its_own_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "environment", lambda: {**ENV, "device": "none", "cuda": "none",
                                                    "cuda_available": False})
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == gpu_check.EXIT_NO_CUDA
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out
    assert not (tmp_path / "out").exists()
    # The plan still prints without CUDA, old torch's skips included.
    monkeypatch.setattr(gpu_check, "environment", lambda: {**ENV, "torch": "2.11.0+cu130", "cuda_available": False})
    assert gpu_check.main(["--dry-run", "--only", "b,h"]) == gpu_check.EXIT_OK
    plan = capsys.readouterr().out
    assert plan.startswith("b. ") and "\nh. " in plan and "\nc. " not in plan
    assert "skipped, needs torch >= 2.13 (found 2.11.0+cu130): " in plan and "kernels.py --only moe" in plan


def test_runner_cuts_off_a_slow_section_and_rewrites_the_report_after_each(tmp_path):
    out, work = str(tmp_path / "out"), str(tmp_path)
    steps = os.path.join(work, "steps.json")
    seen = os.path.join(work, "seen.json")
    partial = os.path.join(work, "partial.json")
    half_written_then_sleep = f"import time; open({partial!r}, 'w').write('[{{\"mfu\"'); time.sleep(60)"
    read_report = (f"import json; d = json.load(open({os.path.join(out, 'gpu_check.json')!r})); "
                   f"json.dump([{{'sections_seen': len(d['sections'])}}], open({seen!r}, 'w'))")
    sections = [  # b is all skipped (an old torch): its weight must not take time from the others
        Section("b", "skipped", 100, [Command("moe", ["false"], skip="needs torch >= 2.13 (found 2.11.0)")]),
        Section("c", "train step", 5, [Command("m6-base", writes_rows(
            [step_row("fused", 0.5), step_row("sdpa", 0.3)], steps), steps)], gpu_check.evaluate_train_step),
        Section("d", "slow", 1, [Command("sleeper", [sys.executable, "-c", half_written_then_sleep], partial),
                                    Command("after the sleeper", [sys.executable, "-c", "pass"])]),
        Section("e", "reads the report", 5, [Command("reader", [sys.executable, "-c", read_report], seen)]),
    ]
    results = gpu_check.run_sections(sections, 11, out, ENV)  # d's limit: 1/11 of what is left, under 2 s
    b, c, d, e = results
    assert b.commands[0].status == "skipped" and b.time_limit_s == 0
    assert [r.status for r in c.commands] == ["ok"] and c.commands[0].rows[0]["mfu"] == 0.5
    assert d.commands[0].status == "cut off" and d.commands[0].seconds < 5
    assert d.commands[0].rows == [] and d.commands[0].note.endswith("its rows file was left half-written")
    assert d.commands[1].status == "not run"
    assert e.commands[0].rows == [{"sections_seen": 3}]  # written after b, c and d
    assert gpu_check.exit_code(results) == gpu_check.EXIT_OK  # a cut-off is reported, not a failure

    doc = json.load(open(os.path.join(out, "gpu_check.json")))
    assert doc["environment"] == ENV and len(doc["sections"]) == 4 and doc["exit_code"] == 0
    assert doc["sections"][1]["commands"][0]["rows"] == [step_row("fused", 0.5), step_row("sdpa", 0.3)]
    assert doc["sections"][1]["checks"] == [
        dict(what="MFU, m6-base", measured="50.0%", goal="-", passed=None, correctness=False),
        dict(what="MFU, m6-base", measured="30.0%", goal="-", passed=None, correctness=False),
        dict(what="m6-base train step MFU, best (m6-base)", measured="50%", goal=">= 45%", passed=True,
             correctness=False)]
    md = open(os.path.join(out, "gpu_check.md")).read()
    assert md.startswith("# GPU check\n\n| device | driver | CUDA | torch | Triton | Python |")
    assert "| NVIDIA H200 | 580.159.04 | 13.0 | 2.13.0+cu130 | 3.6.0 | 3.12.3 |" in md
    assert "| c | m6-base train step MFU, best (m6-base) | 50% | >= 45% | pass |" in md
    assert "| sleeper | cut off |" in md and "| after the sleeper | not run |" in md
    assert "| fused | False |" in md  # the rows' own table
    assert "===== sleeper" in open(os.path.join(out, "gpu_check.log")).read()


def test_a_crash_or_a_failed_correctness_check_fails_the_run(tmp_path):
    out = str(tmp_path / "out")
    crash = Section("a", "crash", 1, [Command("tests", [sys.executable, "-c", "raise SystemExit(4)"])])
    results = gpu_check.run_sections([crash], 30, out, ENV)
    assert results[0].commands[0].status == "failed" and results[0].commands[0].rc == 4
    assert gpu_check.exit_code(results) == gpu_check.EXIT_FAILED
    assert json.load(open(os.path.join(out, "gpu_check.json")))["exit_code"] == gpu_check.EXIT_FAILED
    # Rows that are not in the expected shape are a failure, not a traceback.
    path = str(tmp_path / "bad.json")
    bad = Section("c", "bad rows", 1, [Command("m6-base", writes_rows([{"step_time_s": 0.1}], path), path)],
                     gpu_check.evaluate_train_step)
    checks = gpu_check.run_sections([bad], 30, out, ENV)[0].checks
    assert [(c.passed, c.correctness) for c in checks] == [(False, True)]


def attention_rows(fused_fwd_ms: float, err: float) -> list[dict]:
    """kernels.py --json attention rows at seq 2048: FlexAttention takes 2 ms forward, 5 backward."""
    flops = 4.0e11  # the fused kernel's forward FLOPs in these rows
    fused = dict(part="attention", seq=2048, batch=8, name="fused (m6_kernels)", fwd_ms=fused_fwd_ms, bwd_ms=3.0,
                 fwd_tflops=flops / fused_fwd_ms / 1e9, bwd_tflops=1.0, err=err)
    flex = dict(part="attention", seq=2048, batch=8, name="FlexAttention", fwd_ms=2.0, bwd_ms=5.0,
                fwd_tflops=1.0, bwd_tflops=1.0)
    return [fused, flex]


def verdicts(checks) -> dict[str, str]:
    return {c.what: gpu_check.verdict(c) for c in checks}


def test_attention_targets_and_tolerance():
    fast = verdicts(gpu_check.evaluate_kernels({"attention": attention_rows(fused_fwd_ms=0.5, err=3e-3)}))
    # 800 TFLOP/s forward; (2 + 5) / (0.5 + 3) = 2x FlexAttention; error within bf16's 2e-2.
    assert fast == {"fused attention seq 2048: relative error vs SDPA": "pass",
                    "fused attention forward TFLOP/s, seq 2048": "pass",
                    "fused vs FlexAttention, forward + backward, seq 2048": "pass"}
    slow = verdicts(gpu_check.evaluate_kernels({"attention": attention_rows(fused_fwd_ms=2.0, err=5e-2)}))
    # 200 TFLOP/s, 7 / 5 = 1.4x: one target missed, one met; the error is a correctness failure.
    assert slow == {"fused attention seq 2048: relative error vs SDPA": "FAIL",
                    "fused attention forward TFLOP/s, seq 2048": "missed",
                    "fused vs FlexAttention, forward + backward, seq 2048": "pass"}


def test_moe_dispatch_targets():
    rows = [dict(part="moe", name="copy (torch, device bandwidth)", ms=1.0, gb_s=1000.0),
            dict(part="moe", name="permute, fused", ms=0.2, gb_s=800.0),
            dict(part="moe", name="permute, argsort + index_select", ms=1.0, gb_s=160.0),
            dict(part="moe", name="unpermute + combine, fused", ms=0.5, gb_s=600.0),
            dict(part="moe", name="unpermute + combine, index_add", ms=1.0, gb_s=300.0)]
    got = {c.what: (c.measured, gpu_check.verdict(c)) for c in gpu_check.evaluate_kernels({"moe": rows})}
    assert got == {"permute, fused: share of copy bandwidth": ("80%", "pass"),
                   "permute, fused: speed-up over permute, argsort + index_select": ("5.00", "pass"),
                   "unpermute + combine, fused: share of copy bandwidth": ("60%", "missed"),
                   "unpermute + combine, fused: speed-up over unpermute + combine, index_add": ("2.00", "missed")}


def test_autotune_probe_verdicts():
    rows = [dict(kernel="forward", dtype="bfloat16", configs=4, compiled=3, best="{}", err=1e-2),
            dict(kernel="backward dQ", dtype="float32", configs=4, compiled=0, best=None, err=None)]
    checks = gpu_check.evaluate_kernel_tests({"autotune probe": rows})
    assert [(c.measured, gpu_check.verdict(c)) for c in checks] == [("3 of 4", "pass"), ("1.0e-02", "pass"),
                                                              ("0 of 4", "FAIL")]
    assert all(c.correctness for c in checks)


def test_moe_share_of_the_step():
    checks = gpu_check.evaluate_moe_step({"moe step": [step_row("fused", 0.2)]})
    assert [(c.what, c.measured) for c in checks] == [("share of the step in moe_dispatch", "5%"),
                                                      ("MoE model MFU", "20.0%")]


def test_pytest_closing_line_is_counted():
    out = "....F\nFAILED tests/x.py::t\n=== 1 failed, 40 passed, 2 skipped, 1 error in 9.10s ==="
    assert gpu_check.pytest_counts(out) == {"failed": 1, "passed": 40, "skipped": 2, "error": 1}
    assert gpu_check.pytest_counts("no summary") == {}


def test_generation_bench_runs_on_cpu(tmp_path):
    path = tmp_path / "gen.json"
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "generation.py"),
                          "--preset", "m6-tiny", "--device", "cpu", "--batch-sizes", "1", "3",
                          "--prompt-len", "8", "--new-tokens", "6", "--repeat", "1", "--json", str(path)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(path.read_text())
    assert [(r["batch"], r["use_cache"]) for r in rows] == [(1, True), (3, True), (1, False)]
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["new_tokens"] == 6
        # Every row writes all its tokens (no EOS can stop it): tokens/s times seconds counts them.
        assert r["tokens_per_s"] > 0 and r["tokens_per_s"] * r["seconds"] == pytest.approx(r["batch"] * 6)
    assert isinstance(rows[2]["same_tokens_as_cached"], bool)


def test_shell_wrapper_passes_flags_and_exit_codes(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "M6_WHEELS": str(tmp_path)}  # an empty wheel folder
    script = os.path.join(REPO, "tools", "bench", "gpu_check.sh")
    plan = subprocess.run(["bash", script, "--dry-run", "--only", "h"], capture_output=True, text=True, env=env)
    assert plan.returncode == 0 and plan.stdout.startswith("h. ") and "installing" not in plan.stdout
    bad = subprocess.run(["bash", script, "--only", "x"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--only takes distinct sections" in bad.stderr
