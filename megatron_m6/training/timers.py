"""Where a step's time goes, once per log interval: waiting for data, forward-backward, gradient
synchronisation and clipping, the optimizer, and in pipeline runs the bubble.

On a GPU the device-side intervals are timed with CUDA events recorded on the stream: recording
adds no synchronisation, and the events are read when the log line is written, after the step's
own read of the device has waited for them anyway. Waiting for data is host time (the loader
blocks the host, not the GPU). The bubble is the forward-backward time minus the time the
pipeline stages spent computing: what is left is waiting for other stages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist


class IntervalTimer:
    """The summed duration of intervals, on the device's clock: CUDA events on a GPU (or when
    asked, the host clock)."""

    def __init__(self, device: torch.device, host: bool = False):
        self.cuda = device.type == "cuda" and not host
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._paused = False

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self._paused:
            yield
            return
        start = self._mark()
        try:
            yield
        finally:
            end = self._mark()
            if self.cuda:
                self._pending.append((start, end))
            else:
                self._seconds += end - start

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Intervals inside this are not counted (e.g. evaluation between training steps)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def pop_seconds(self) -> float:
        """The total since the last call, and start again from zero."""
        for start, end in self._pending:
            end.synchronize()  # already done when the step has read the device
            self._seconds += start.elapsed_time(end) / 1e3
        total, self._seconds, self._pending = self._seconds, 0.0, []
        return total


class StepTimers:
    """The trainer's timers of one rank (the pipeline stages time their own compute)."""

    def __init__(self, device: torch.device):
        self.data_wait = IntervalTimer(device, host=True)
        self.forward_backward = IntervalTimer(device)
        self.grad_sync = IntervalTimer(device)
        self.optimizer = IntervalTimer(device)

    def pop_seconds(self, stage_compute: float | None = None) -> dict[str, float]:
        """Seconds of each timer since the last call; with `stage_compute` (seconds the pipeline
        stages computed in that time), also the bubble."""
        seconds = {"data-wait": self.data_wait.pop_seconds(),
                   "forward-backward": self.forward_backward.pop_seconds(),
                   "grad-sync": self.grad_sync.pop_seconds(),
                   "optimizer": self.optimizer.pop_seconds()}
        if stage_compute is not None:
            seconds["pipeline-bubble"] = max(seconds["forward-backward"] - stage_compute, 0.0)
        return seconds


def slowest_rank(seconds: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each timer's largest value over all ranks (every rank must call this): the slowest rank
    sets the pace, and the log is written by rank 0 only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds
    values = torch.tensor(list(seconds.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(seconds, values.tolist()))
