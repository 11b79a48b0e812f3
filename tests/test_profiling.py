"""--profile traces, the step timers in the log line and TensorBoard, --record-memory-history's
CPU refusal, and one clear error for a step that runs out of memory."""

import glob
import json
import os
import time

import pytest
import torch

from megatron_m6.config import ConfigError, parse_args
from megatron_m6.pretrain import run
from megatron_m6.training.profiling import StepProfiler
from megatron_m6.training.timers import IntervalTimer, StepTimers
from megatron_m6.training.trainer import TrainingError
from tests.parallel_harness import MOE, TINY, run_parallel

TRAINER_RANGES = {"forward", "backward", "optimizer", "communication", "data_wait"}
TIMER_FIELDS = ("data-wait", "forward-backward", "grad-sync", "optimizer")


def annotations(trace_file: str) -> list[str]:
    """The record_function ranges in a Chrome/Perfetto trace, in order."""
    with open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    return [e["name"] for e in events if e.get("cat") == "user_annotation"]


def logged_run(argv: list[str]) -> list[str]:
    lines = []
    run(parse_args(TINY + argv), log=lines.append)
    return lines


def timer_values(line: str) -> dict[str, float]:
    """{"forward-backward": ms, ...} from the log's timer line."""
    _, _, fields = line.partition("(ms): ")
    return {name: float(value) for name, value in (f.rsplit(" ", 1) for f in fields.split(" | "))}


def test_trace_of_the_chosen_steps_has_the_named_ranges(tmp_path):
    lines = logged_run(MOE + ["--train-iters", "4", "--profile", "--profile-step-start", "2",
                              "--profile-step-end", "4", "--profile-dir", str(tmp_path)])
    traces = glob.glob(str(tmp_path / "rank0.*.pt.trace.json"))
    assert len(traces) == 1, os.listdir(tmp_path)
    names = annotations(traces[0])
    assert TRAINER_RANGES | {"attention", "moe_dispatch", "moe_experts"} <= set(names)
    # Steps 2 and 3 only: the warm-up step 1 and step 4 are not kept. 8 samples per step are
    # 4 micro-batches of 2; each has a forward, a backward and 2 layers of attention.
    assert [n for n in names if n.startswith("ProfilerStep#")] == ["ProfilerStep#1", "ProfilerStep#2"]
    assert names.count("optimizer") == 2 and names.count("forward") == 2 * 4
    assert names.count("attention") == 2 * 4 * 2
    assert any(f"written to {tmp_path}" in line for line in lines)


def test_only_the_profiled_ranks_write(tmp_path):
    cfg = parse_args(TINY + ["--profile", "--profile-step-start", "1", "--profile-step-end", "2",
                             "--profile-ranks", "1", "--profile-dir", str(tmp_path)])
    profiler = StepProfiler(cfg, torch.device("cpu"), rank=0, log=lambda line: None)
    profiler.before_step(1)
    torch.ones(4).sum()
    profiler.after_step(1)
    profiler.close()
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)


def test_timers_in_the_log_and_tensorboard(tmp_path):
    lines = logged_run(["--train-iters", "4", "--log-interval", "2", "--tensorboard-dir", str(tmp_path),
                        "--log-timers-to-tensorboard"])
    timer_lines = [line for line in lines if line.startswith("time per step")]
    assert len(timer_lines) == 2
    for line in timer_lines:
        ms = timer_values(line)
        assert set(ms) == set(TIMER_FIELDS)  # no bubble without a pipeline
        assert ms["forward-backward"] > 0 and ms["optimizer"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    for name in TIMER_FIELDS:
        assert [e.step for e in acc.Scalars(f"timers/{name}_ms")] == [2, 4]


def pipeline_run(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """Log lines of rank 0, and the trace ranges of every rank's file, of a run under `argv`."""
    lines = logged_run(argv)
    out = argv[argv.index("--profile-dir") + 1]
    return lines, [annotations(f) for f in sorted(glob.glob(os.path.join(out, "rank*.pt.trace.json")))]


def test_pipeline_bubble_is_timed_and_every_profiled_rank_writes(tmp_path):
    lines, traces = run_parallel(2, ["--pipeline-model-parallel-size", "2", "--train-iters", "3",
                                     "--log-interval", "3", "--profile", "--profile-step-start", "2",
                                     "--profile-step-end", "3", "--profile-ranks", "0", "1",
                                     "--profile-dir", str(tmp_path)], fn=pipeline_run)
    ms = timer_values(next(line for line in lines if line.startswith("time per step")))
    assert set(ms) == set(TIMER_FIELDS) | {"pipeline-bubble"}
    # 1F1B with 2 stages and 4 micro-batches: each stage waits for the other at least once.
    assert 0 < ms["pipeline-bubble"] < ms["forward-backward"]
    assert len(traces) == 2
    for names in traces:  # the stages' own forward and backward ranges, 4 micro-batches each
        assert names.count("forward") >= 4 and names.count("backward") >= 4


def test_interval_timer_counts_what_it_times_and_nothing_paused():
    timer = IntervalTimer(torch.device("cpu"))
    with timer():
        time.sleep(0.02)
    with timer.paused(), timer():
        time.sleep(0.02)
    assert timer.pop_seconds() >= 0.02  # sleep sleeps at least that long
    with timer.paused(), timer():
        time.sleep(0.01)
    assert timer.pop_seconds() == 0.0
    seconds = StepTimers(torch.device("cpu")).pop_seconds(stage_compute=0.0)
    assert seconds["pipeline-bubble"] == 0.0


def test_memory_history_needs_cuda():
    cfg = parse_args(TINY + ["--record-memory-history", "--memory-snapshot-step", "2", "--device", "cpu"])
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        run(cfg, log=lambda line: None)


@pytest.mark.parametrize("argv, message", [
    (["--profile", "--profile-step-start", "3", "--profile-step-end", "3"], "need 1 <= start < end"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "6"], "after the last step"),
    (["--memory-snapshot-step", "2"], "needs --record-memory-history"),
    (["--log-timers-to-tensorboard"], "needs --tensorboard-dir"),
])
def test_impossible_profiling_flags(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY + ["--train-iters", "4"] + argv)


def test_profile_ranks_outside_the_job():
    from megatron_m6.config import validate_layout
    cfg = parse_args(TINY + ["--profile", "--profile-step-start", "1", "--profile-step-end", "2",
                             "--profile-ranks", "0", "2"])
    with pytest.raises(ConfigError, match="the job has ranks 0 .. 1"):
        validate_layout(cfg, 2)


def test_out_of_memory_is_one_clear_error(monkeypatch):
    from megatron_m6.training.trainer import Trainer

    def out_of_memory(self, micro_batches, stats):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore details")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    with pytest.raises(TrainingError, match=r"out of memory at iteration 1: CUDA out of memory. Tried "
                                            r"to allocate 2.00 GiB.; --record-memory-history shows"):
        run(parse_args(TINY), log=lambda line: None)
