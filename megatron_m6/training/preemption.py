"""Stopping a run early and cleanly: on SIGTERM or SIGUSR1 (`--exit-signal-handler`: SLURM's
warning before a time limit or a preemption) or once training has run `--exit-duration-in-mins`.
The trainer then saves a checkpoint at the current iteration and returns, so the process exits 0
and a requeued job resumes from there.

Every rank must stop after the same iteration, or the ones that go on wait forever in their next
collective: a signal may reach only some ranks, and their clocks pass a deadline at different
steps. So after every step the ranks agree with one tiny all-reduce (the maximum of "signal
received" and "time is up" over all ranks), of CPU integers over a gloo group of its own: it
never waits for the GPU, so the step stays free of host synchronisation."""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from megatron_m6.config import RunConfig

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopAgreement:
    """Catches the stop signals (while active) and decides, with every rank, when to stop.

    Used as a context manager around the training loop: the clock of `--exit-duration-in-mins`
    starts on entry, and the handlers are restored on exit. Under SLURM a signal reaches every
    process of a job step, data loader workers included: they ignore both signals
    (megatron_m6/data/dataset.py), so only the rank decides. The SLURM scripts send USR1, which
    torchrun passes on to the ranks (TORCHELASTIC_SIGNALS_TO_HANDLE)."""

    def __init__(self, cfg: RunConfig):
        self.enabled = cfg.exit_signal_handler or cfg.exit_duration_in_mins is not None  # --save: validate()
        self.duration_s = None if cfg.exit_duration_in_mins is None else cfg.exit_duration_in_mins * 60
        self.minutes = cfg.exit_duration_in_mins
        self.group = dist.new_group(backend="gloo") if self.enabled and dist.is_initialized() else None
        self.received = 0  # number of the stop signal caught on this rank, 0 if none
        self.start = time.monotonic()
        self._previous = {}
        if cfg.exit_signal_handler:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum  # acted on after the current step, by should_stop

    def __enter__(self) -> StopAgreement:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _all_ranks_max(self, values: list[int]) -> list[int]:
        flags = torch.tensor(values, dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags.tolist()

    def should_stop(self) -> str | None:
        """Called by every rank after every step: why all ranks stop now (for the log line), or
        None to go on. Costs one all-reduce of two integers, and nothing when disabled."""
        if not self.enabled:
            return None
        time_up = self.duration_s is not None and time.monotonic() - self.start >= self.duration_s
        signum, time_up = self._all_ranks_max([self.received, int(time_up)])
        if signum:
            return f"received {signal.Signals(signum).name}"
        if time_up:
            return f"trained for {self.minutes:g} minutes (--exit-duration-in-mins)"
        return None

    def wait_for_all_ranks(self) -> None:
        """A barrier before exiting: rank 0 publishes a background save after its own wait, and
        no rank may leave before that (under `srun --kill-on-bad-exit` the node whose launcher
        ends first can get the others killed)."""
        self._all_ranks_max([0])
