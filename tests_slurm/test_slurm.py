"""The SLURM launch scripts under a real one-node SLURM on this machine (`make test-slurm` starts
it with tools/slurm/local_cluster.sh): examples/pretrain_m6_base.sh trains m6-tiny on 2 CPU
ranks and saves; a job whose batch shell gets USR1 (what `#SBATCH --signal=B:USR1@...` sends
before the time limit) saves, requeues itself, and the requeued run resumes from that checkpoint
and finishes; examples/preprocess_slurm.sh builds a corpus as a job array of shards and merges
it. Not part of `make test`."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_m6.data.cleaning import CleaningConfig
from megatron_m6.data.indexed import bin_path, idx_path
from megatron_m6.data.preprocess import PreprocessConfig, preprocess
from megatron_m6.data.sample_data import make_text_corpus
from megatron_m6.training.checkpoint import latest_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = "examples/pretrain_m6_base.sh"
# m6-tiny on mock data, 2 gloo ranks with one thread each and a data loader worker each (so a
# signal reaches workers too, as it does on a cluster).
TINY_JOB = dict(PRESET="m6-tiny", MOCK_DATA="1", DEVICE="cpu", BF16="0", GPUS_PER_NODE="2",
                OMP_NUM_THREADS="1", MICRO_BATCH="4", GLOBAL_BATCH="8", WARMUP_ITERS="2",
                NUM_WORKERS="1", PYTHON=sys.executable)
DEADLINE_S = 300  # for any one event below; each takes seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(tmp_path, **overrides) -> dict:
    return {**os.environ, **TINY_JOB, "SAVE": str(tmp_path / "ckpt"),
            "TENSORBOARD_DIR": str(tmp_path / "tb"), "MASTER_PORT": str(free_port()), **overrides}


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The local cluster must be up (make test-slurm starts it); say so rather than fail later."""
    if not shutil.which("sbatch") or "SLURM_CONF" not in os.environ:
        pytest.fail("no SLURM here: run `make test-slurm` (tools/slurm/local_cluster.sh run ...)")
    assert node_idle(), "the local SLURM node is not idle: " + subprocess.run(
        ["sinfo", "-N"], capture_output=True, text=True).stdout


def node_idle() -> bool:
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return state.stdout.strip() == "idle"


def daemon_logs() -> str:
    """The ends of slurmctld's and slurmd's logs (local_cluster.sh keeps them beside SLURM_CONF)."""
    logs = os.path.join(os.path.dirname(os.environ["SLURM_CONF"]), "log")
    return "".join(f"\n== {name}\n" + "".join(open(os.path.join(logs, name)).readlines()[-30:])
                   for name in ("slurmctld.log", "slurmd.log") if os.path.exists(os.path.join(logs, name)))


def wait_for(condition, what: str, log=None):
    """Poll `condition` until it returns something true; fail after DEADLINE_S with `log`."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"no {what} after {DEADLINE_S} s\n{log.read_text() if log and log.exists() else ''}")


def job_info(job: str) -> dict[str, str]:
    """JobState, Restarts, ExitCode, ... of a job, from scontrol."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_for_state(job: str, log, state: str, restarts: int) -> dict[str, str]:
    """The job's info once it is in `state` after `restarts` requeues, or once it has ended."""
    def reached():
        info = job_info(job)
        here = info.get("JobState") == state and info.get("Restarts") == str(restarts)
        return info if here or info.get("JobState") in ENDED else None
    return wait_for(reached, f"job {job} {state} after {restarts} requeues", log)


def test_the_base_script_trains_m6_tiny_on_two_cpu_ranks_and_saves(tmp_path):
    log = tmp_path / "job.out"
    done = subprocess.run(["sbatch", "--wait", "--gpus-per-node=0", f"--output={log}", SCRIPT,
                           "--log-interval", "1"],
                          cwd=REPO, env=job_env(tmp_path, TRAIN_ITERS="4"), capture_output=True,
                          text=True, timeout=DEADLINE_S)
    text = log.read_text()
    assert done.returncode == 0, done.stderr + text  # sbatch --wait: the job's exit status
    assert "layout: TP1 PP1 EP1 DP2" in text, text
    assert re.findall(r"^iteration\s+(\d+)/4 ", text, re.M) == ["1", "2", "3", "4"], text
    assert latest_checkpoint(str(tmp_path / "ckpt"))[1]["iteration"] == 4


def test_a_signalled_job_saves_requeues_itself_and_resumes(tmp_path):
    log, iters = tmp_path / "job.out", 40
    submitted = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--output={log}",
                                SCRIPT, "--log-interval", "1"],
                               cwd=REPO, env=job_env(tmp_path, TRAIN_ITERS=str(iters)),
                               capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: log.exists() and re.search(rf"^iteration\s+2/{iters} ", log.read_text(), re.M),
                 "iteration 2 in the job's output", log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        info = wait_for_state(job, log, "PENDING", restarts=1)
        assert info["JobState"] == "PENDING", log.read_text()  # requeued, not ended
        # SLURM holds a requeued job back for two minutes (its BeginTime); let it start sooner, but
        # not at once: slurmd refuses a run whose credential is from the same second as the first
        # run's revoked one ("Job credential revoked", and the job ends FAILED).
        wait_for(node_idle, "idle node after the requeue", log)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], check=True)
        info = wait_for_state(job, log, "COMPLETED", restarts=1)
    finally:
        subprocess.run(["scancel", job], capture_output=True)  # a no-op once it has finished
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text + daemon_logs()
    stopped = int(re.search(r"^received SIGUSR1: saved checkpoint at iteration (\d+), exiting$",
                            text, re.M).group(1))
    assert 2 <= stopped < iters, text
    assert f"requeueing job {job} to resume from iteration {stopped}" in text, text
    first, second = text.split(f"resumed from {tmp_path / 'ckpt'} at iteration {stopped} ", 1)
    assert re.findall(rf"^iteration\s+(\d+)/{iters} ", first, re.M)[-1] == str(stopped), text
    resumed = [int(i) for i in re.findall(rf"^iteration\s+(\d+)/{iters} ", second, re.M)]
    assert resumed == list(range(stopped + 1, iters + 1)), text
    assert latest_checkpoint(str(tmp_path / "ckpt"))[1]["iteration"] == iters


def launch_arguments(tmp_path, **env) -> list[str]:
    """The pretrain arguments the base script assembles (DRY_RUN=1 with PYTHON=echo prints them)."""
    env = {"PATH": os.environ["PATH"], "MOCK_DATA": "1", "DRY_RUN": "1", "PYTHON": "echo",
           "SAVE": str(tmp_path / "ckpt"), "TENSORBOARD_DIR": str(tmp_path / "tb"), **env}
    out = subprocess.run(["bash", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_script_defaults_and_empty_variables_turning_features_off(tmp_path):
    args = launch_arguments(tmp_path)
    assert args[:7] == ["-m", "megatron_m6.pretrain", "--dry-run", "--world-size", "8", "--rank", "0"]
    assert " ".join(args[7:11]) == "--preset m6-base --device cuda"
    for flag in ("--bf16", "--save", "--exit-signal-handler", "--async-save", "--keep-last",
                 "--tensorboard-dir", "--distributed-timeout-minutes"):
        assert flag in args, flag
    args = launch_arguments(tmp_path, SAVE="", TENSORBOARD_DIR="", KEEP_LAST="", RECOMPUTE="none",
                            BF16="0", PRESET="m6-tiny", DEVICE="cpu", GPUS_PER_NODE="2", DRY_RUN_RANK="1")
    assert args[:11] == ["-m", "megatron_m6.pretrain", "--dry-run", "--world-size", "2", "--rank", "1",
                         "--preset", "m6-tiny", "--device", "cpu"]
    for flag in ("--save", "--exit-signal-handler", "--async-save", "--keep-last", "--load",
                 "--tensorboard-dir", "--recompute-granularity", "--bf16"):
        assert flag not in args, flag


def test_the_corpus_is_built_as_a_job_array_of_shards_then_merged(tmp_path):
    """examples/preprocess_slurm.sh: an array of 3 shard tasks and a merge job after them; the
    merged dataset, deduplicated across the shards, equals one process's on the same input."""
    docs = make_text_corpus(300, np.random.default_rng(2))
    docs[250:260] = docs[:10]  # exact duplicates in the last shard of the first's documents
    inputs = []
    for k in range(3):
        path = tmp_path / f"part{k}.jsonl"
        rows = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[k * 100:(k + 1) * 100]]
        path.write_text("".join(rows), encoding="utf-8")
        inputs.append(str(path))
    flags = ["--min-chars", "5"]
    whole = PreprocessConfig(inputs=inputs, output_prefix=str(tmp_path / "one" / "zh"), progress=False,
                             cleaning=CleaningConfig(min_chars=5))
    assert preprocess(whole).skipped["exact_duplicate"] >= 10
    env = {**os.environ, "INPUT": " ".join(inputs), "OUTPUT_PREFIX": str(tmp_path / "out" / "zh"), "NUM_SHARDS": "3",
           "WORKERS": "1", "PYTHON": sys.executable, "SBATCH_ARGS": "--gpus-per-node=0", "LOGS": str(tmp_path / "logs")}
    submitted = subprocess.run(["bash", "examples/preprocess_slurm.sh", *flags], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    array, merge = re.search(r"job array (\d+) .* merge = job (\d+)", submitted.stdout).groups()
    try:
        info = wait_for(lambda: (i := job_info(merge)).get("JobState") in ENDED and i, f"merge job {merge}")
    finally:
        subprocess.run(["scancel", array, merge], capture_output=True)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert info["JobState"] == "COMPLETED", logs + daemon_logs()
    names = sorted(p.name for p in (tmp_path / "logs").glob("*.log"))
    assert names == ["merge.log", "shard_0.log", "shard_1.log", "shard_2.log"]
    (want,) = whole.output_names().values()
    got = str(tmp_path / "out" / "zh_text_document")
    for path in (bin_path, idx_path):
        assert open(path(got), "rb").read() == open(path(want), "rb").read(), logs
    assert "dropped across shards: " in logs
