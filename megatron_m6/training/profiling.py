"""torch.profiler traces and CUDA memory snapshots of chosen steps, on chosen ranks.

`--profile` records steps `--profile-step-start` .. `--profile-step-end - 1` on each of
`--profile-ranks` into `{profile dir}/rank{R}.{timestamp}.pt.trace.json` (the step before the
first, when there is one, is the profiler's warm-up and is not kept). Open a trace at
https://ui.perfetto.dev, or in TensorBoard with its PyTorch profiler plugin. Besides every
operator and kernel, a trace holds these ranges: forward, backward, optimizer, communication
and data_wait (from the trainer and the pipeline stages), attention, moe_dispatch and moe_experts (from the
model).

`--record-memory-history` records the CUDA caching allocator's history on the same ranks and
writes `{profile dir}/memory_snapshot_rank{R}_{step or "oom"}.pickle` after
`--memory-snapshot-step` and when a step runs out of memory; drag it onto
https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import os

import torch

from megatron_m6.config import ConfigError, RunConfig

MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept: enough for a few steps of m6-10b


class StepProfiler:
    """Drives torch.profiler and the memory history around the trainer's steps (1-based)."""

    def __init__(self, cfg: RunConfig, device: torch.device, rank: int, log=print):
        self.cfg, self.device, self.rank, self.log = cfg, device, rank, log
        on_rank = rank in cfg.profile_ranks
        self.profiling = cfg.profile and on_rank
        self.recording = cfg.record_memory_history and on_rank
        self.dir = cfg.profile_dir or cfg.tensorboard_dir or "profiles"
        self._profiler: torch.profiler.profile | None = None
        if cfg.record_memory_history and device.type != "cuda":
            raise ConfigError("--record-memory-history needs a CUDA device: it records the CUDA "
                              "caching allocator (use --profile for CPU memory)")
        if self.recording:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES, device=device)

    def before_step(self, step: int) -> None:
        start = self.cfg.profile_step_start
        if self.profiling and self._profiler is None and step in (start - 1, start):
            warmup = int(step == start - 1)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            os.makedirs(self.dir, exist_ok=True)
            self._profiler = torch.profiler.profile(
                activities=activities, record_shapes=True, profile_memory=True,
                schedule=torch.profiler.schedule(wait=0, warmup=warmup,
                                                 active=self.cfg.profile_step_end - start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.dir, worker_name=f"rank{self.rank}"))
            self._profiler.start()

    def after_step(self, step: int) -> None:
        if self._profiler is not None:
            self._profiler.step()
            if step == self.cfg.profile_step_end - 1:
                self._stop()
        if self.recording and step == self.cfg.memory_snapshot_step:
            self.log(f"memory snapshot of step {step} written to {self.dump_memory_snapshot(str(step))}")

    def dump_memory_snapshot(self, tag: str) -> str | None:
        """Write the allocator's history so far; returns the file, or None when not recording."""
        if not self.recording:
            return None
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"memory_snapshot_rank{self.rank}_{tag}.pickle")
        torch.cuda.memory._dump_snapshot(path)
        return path

    def _stop(self) -> None:
        self._profiler.stop()  # writes the trace
        self._profiler = None
        self.log(f"profiler trace of steps {self.cfg.profile_step_start}-{self.cfg.profile_step_end - 1} "
                 f"of rank {self.rank} written to {self.dir}")

    def close(self) -> None:
        """Training ended (or failed) inside the profiled steps: keep what was recorded."""
        if self._profiler is not None:
            self._stop()
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
