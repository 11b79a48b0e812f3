"""--exit-signal-handler and --exit-duration-in-mins on 2 gloo ranks under torchrun: a run told
to stop saves a checkpoint at the iteration it reached, exits 0 with one line saying so, and the
run resumed from it has the losses of a run that never stopped, bit for bit (fp32 on CPU)."""

import os
import re
import signal
import subprocess
import sys

import pytest

from megatron_m6.config import parse_args
from megatron_m6.pretrain import run
from megatron_m6.training.checkpoint import latest_checkpoint
from tests.parallel_harness import TINY, run_parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A signal sent once iteration 2 is logged stops the run after the step in progress (the
# handler only sets a flag): 60 iterations leave a wide margin even on a busy machine.
TRAIN_ITERS = 60
RANK_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # log lines arrive as they happen


def cli_history(argv: list[str]) -> list[float]:
    """Losses of `python -m megatron_m6.pretrain TINY argv` (the same model as the command line
    builds), run on the harness's ranks."""
    return run(parse_args(TINY + argv), log=lambda line: None).history


@pytest.fixture(scope="module")
def straight() -> list[float]:
    return run_parallel(2, ["--train-iters", str(TRAIN_ITERS)], cli_history)


def torchrun(argv: list[str]) -> subprocess.Popen:
    """pretrain on 2 gloo ranks under torchrun, stdout and stderr merged into one pipe."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_m6.pretrain", *TINY, "--log-interval", "1", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **RANK_ENV}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(proc: subprocess.Popen, pattern: str) -> list[str]:
    """Lines up to the first that matches `pattern`; fails if the process ends first."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
    pytest.fail(f"the run ended before a line matched {pattern!r}:\n{''.join(lines)}")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children, RANK from their environment)."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != launcher_pid:  # the parent's pid
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (FileNotFoundError, ProcessLookupError):  # a process that has just ended
            continue
        if b"RANK" in env:
            pids[int(env[b"RANK"])] = int(entry)
    assert sorted(pids) == [0, 1], f"torchrun's workers not found: {pids}"
    return pids


def finish(proc: subprocess.Popen, lines: list[str]) -> str:
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    out = "".join(lines)
    assert proc.returncode == 0, out
    return out


def stopped_iteration(out: str, reason: str, save) -> int:
    """The iteration the run says it saved at; the checkpoint the tracker names is that one."""
    match = re.search(rf"^{re.escape(reason)}: saved checkpoint at iteration (\d+), exiting$", out, re.M)
    assert match, out
    iteration = int(match.group(1))
    assert latest_checkpoint(str(save))[1]["iteration"] == iteration
    assert 2 <= iteration < TRAIN_ITERS, out  # stopped where it was told to, not at the end
    return iteration


@pytest.mark.parametrize("signum, ranks, saving", [
    # SLURM may signal only some ranks: rank 1 alone is told, both stop at the same iteration.
    (signal.SIGUSR1, [1], []),
    # Every rank told while background saves (one per step) overlap training.
    (signal.SIGTERM, [0, 1], ["--save-interval", "1", "--async-save"]),
], ids=["sync-save-one-rank-signalled", "async-save-all-ranks-signalled"])
def test_a_signal_saves_exits_0_and_the_resumed_run_continues_bit_for_bit(
        tmp_path, straight, signum, ranks, saving):
    save = tmp_path / "ckpt"
    proc = torchrun(["--train-iters", str(TRAIN_ITERS), "--save", str(save), "--exit-signal-handler",
                     *saving])
    lines = read_until(proc, r"^iteration\s+2/")
    pids = worker_pids(proc.pid)
    for rank in ranks:
        os.kill(pids[rank], signum)
    out = finish(proc, lines)
    iteration = stopped_iteration(out, f"received {signal.Signals(signum).name}", save)
    if "--async-save" in saving:  # the last background save was published before exiting
        assert f"checkpoint at iteration {iteration} is complete" in out, out
    resumed = run_parallel(2, ["--train-iters", str(TRAIN_ITERS), "--load", str(save)], cli_history)
    assert len(resumed) == TRAIN_ITERS - iteration
    assert resumed == straight[iteration:]  # bit for bit


def test_exit_duration_saves_and_exits_0(tmp_path):
    save = tmp_path / "ckpt"
    proc = torchrun(["--train-iters", "1000", "--save", str(save), "--exit-duration-in-mins", "0.001"])
    out = finish(proc, [])
    iteration = int(re.search(r"saved checkpoint at iteration (\d+), exiting", out).group(1))
    assert (f"trained for 0.001 minutes (--exit-duration-in-mins): saved checkpoint at iteration {iteration}, "
            "exiting") in out
    assert latest_checkpoint(str(save))[1]["iteration"] == iteration >= 1


def test_stopping_early_needs_save():
    proc = subprocess.run([sys.executable, "-m", "megatron_m6.pretrain", *TINY, "--exit-signal-handler"],
                          cwd=REPO, env={**os.environ, **RANK_ENV}, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --exit-signal-handler and --exit-duration-in-mins save a checkpoint before "
        "exiting: give --save DIR")
