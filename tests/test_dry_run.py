"""The dry run builds one rank's real layout of a full-size job on the meta device, over the fake
process group, in seconds: the launch scripts' default layouts at their real world sizes and a
3-D layout of m6-10b, each at its first, last, a middle and a last-pipeline-stage rank, hold
exactly what the memory model's placement rules say, and nothing is allocated."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from megatron_m6.config import parse_args
from megatron_m6.dry_run import LayoutError, dry_run
from megatron_m6.model_size import layout_from_config
from megatron_m6.parallel import init_process_mesh, parallel_dims
from megatron_m6.parallel.memory import RankCoordinates, RankParams, count_params, rank_param_counts, rank_param_shapes
from tests.parallel_harness import TINY, run_parallel

ROOT = Path(__file__).resolve().parent.parent
# A 512-rank dry run takes about a second here; "seconds", with room for a loaded CI machine.
SECONDS = 30


def script_job(script: str) -> tuple[list[str], int]:
    """The pretrain flags that shape the layout of a launch script's defaults (its
    NAME=${NAME:-value} lines, assembled as examples/slurm_launch.sh does) and its world size."""
    text = (ROOT / "examples" / script).read_text()
    env = dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", text, re.M))
    nodes = int(re.search(r"^NODES=\$\{NODES:-\$\{SLURM_JOB_NUM_NODES:-(\d+)\}\}", text, re.M).group(1))
    preset = env.get("PRESET") or re.search(r"^PRESET=(\S+)", text, re.M).group(1)
    argv = ["--preset", preset, "--bf16", "--mock-data",
            "--tensor-model-parallel-size", env["TP"], "--pipeline-model-parallel-size", env["PP"],
            "--expert-model-parallel-size", env["EP"], "--data-parallel-sharding", env["DP_SHARDING"],
            "--micro-batch-size", env["MICRO_BATCH"], "--global-batch-size", env["GLOBAL_BATCH"]]
    if env["SEQUENCE_PARALLEL"] == "1":
        argv.append("--sequence-parallel")
    if env["RECOMPUTE"]:
        argv += ["--recompute-granularity", env["RECOMPUTE"]]
    return argv, nodes * int(env["GPUS_PER_NODE"])


# m6-10b in three dimensions: TP4 x PP4 (interleaved, 3 layers per virtual stage) x DP16, FSDP.
THREE_D = (["--preset", "m6-10b", "--bf16", "--mock-data", "--tensor-model-parallel-size", "4",
            "--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "3",
            "--sequence-parallel", "--data-parallel-sharding", "full", "--micro-batch-size", "1",
            "--global-batch-size", "256"], 256)
JOBS = {"base": script_job("pretrain_m6_base.sh"), "10b": script_job("pretrain_m6_10b.sh"),
        "100b": script_job("pretrain_m6_100b.sh"), "10b-3d": THREE_D}
# The 100b script's layout grown to 64 nodes (DP512: the global batch must grow with it).
JOBS["100b-512"] = (JOBS["100b"][0] + ["--global-batch-size", "4096"], 512)


def picked_ranks(world: int, tp: int, pp: int) -> list[int]:
    """First, last and a middle rank, and with pipelining one inside the last stage."""
    ranks = {0, world - 1, world // 2 + tp // 2}
    if pp > 1:
        ranks.add(world - world // pp + (world // pp) // 3 + 1)
    return sorted(ranks)


CASES = [(job, rank) for job, (argv, world) in JOBS.items()
         for rank in picked_ranks(world, *(int(argv[argv.index(f) + 1]) for f in
                                           ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")))]
CASES.append(("100b-512", 37))  # the rank of the README's example


def profiled_dry_run(argv: list[str]) -> dict:
    """The report (as plain data), printed lines and peak CPU bytes allocated of one dry run.
    Each runs in a fresh
    process (run_parallel with one rank): torch reuses a mesh's cached sub-meshes for an equal
    mesh built later in the same process, with the earlier rank's coordinates, so one process
    must not dry-run several ranks."""
    cfg = parse_args(argv)
    lines = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        report = dry_run(cfg, log=lines.append)
    torn_down = not dist.is_initialized()
    peak = live = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return dict(dataclasses.asdict(report), lines=lines, peak=peak, torn_down=torn_down)


def coordinates(rank: int, tp: int, pp: int, ep: int, dp: int) -> RankCoordinates:
    """The rank's place in the (pp, edp, ep, tp) mesh, tensor parallel innermost (mesh.py)."""
    return RankCoordinates(pp=rank // (tp * dp), edp=(rank // (tp * ep)) % (dp // ep),
                           ep=(rank // tp) % ep, tp=rank % tp)


@pytest.mark.parametrize("job, rank", CASES, ids=[f"{j}-rank{r}" for j, r in CASES])
def test_dry_run_holds_what_the_memory_model_says(job, rank):
    argv, world = JOBS[job]
    argv = argv + ["--dry-run", "--world-size", str(world), "--rank", str(rank)]
    r = run_parallel(1, argv, fn=profiled_dry_run)
    assert r["torn_down"]  # the fake process group is gone when the dry run returns
    assert r["seconds"] < SECONDS

    cfg = parse_args(argv)
    layout = layout_from_config(cfg, world)
    coords = coordinates(rank, layout.tp, layout.pp, layout.ep, layout.dp)
    assert RankCoordinates(**r["coords"]) == coords
    assert RankParams(**r["counted"]) == rank_param_counts(cfg.model, layout, coords.pp, coords.tp, coords.ep)
    shard = rank_param_shapes(cfg.model, layout, coords, dp_sharded=True)
    assert RankParams(**r["counted_shard"]) == count_params(shard)
    assert r["num_params"] == len(shard)
    # The printed counts are the counted ones.
    dense = r["counted_shard"]["dense"]
    assert f"dense {dense:,} (memory model {count_params(shard).dense:,})" in r["lines"][3]
    # Nothing real: the dry run never allocated as much as this rank's largest weight shard.
    largest = 2 * max(torch.Size(s).numel() for s in shard.values())  # bf16
    assert r["peak"] < largest, (r["peak"], largest)


def test_a_wrong_layout_is_caught(monkeypatch):
    """A plan that does not run (experts left whole on every rank) fails the check by name."""
    # (the package exports the function parallelize under its module's name: patch the module)
    monkeypatch.setattr(sys.modules["megatron_m6.parallel.parallelize"], "apply_expert_parallel",
                        lambda model, mesh: None)
    argv, world = JOBS["100b"]
    cfg = parse_args(argv + ["--dry-run", "--world-size", str(world), "--rank", "5"])
    # FSDP alone cuts the 512 experts over DP64: 8 per rank, as under EP64, but 512 before DP.
    with pytest.raises(LayoutError, match=r"layers\.0\.mlp\.experts\.w1: local shape \(8, 1024, 4096\) "
                                          r"\(\(512, 1024, 4096\) before data-parallel sharding\)"):
        dry_run(cfg, log=lambda line: None)
    assert not dist.is_initialized()


def test_command_line_dry_run_prints_the_report():
    argv, world = JOBS["100b-512"]
    out = subprocess.run([sys.executable, "-m", "megatron_m6.pretrain", *argv, "--dry-run",
                          "--world-size", str(world), "--rank", "37"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("dry run:")]
    assert len(lines) == 6 and "rank 37 of 512, layout TP1 PP1 EP64 DP512" in lines[0]


def _group_timeouts(argv: list[str]) -> dict[str, float]:
    """Seconds each process group of the mesh (and the world group) waits before failing."""
    cfg = parse_args(TINY + argv)
    mesh = init_process_mesh(parallel_dims(cfg, dist.get_world_size() if dist.is_initialized() else 2),
                             torch.device("cpu"), cfg.distributed_timeout_minutes)
    groups = {name: mesh[name].get_group() for name in ("pp", "edp", "ep", "tp", "dp")}
    groups["world"] = dist.group.WORLD
    return {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for name, g in groups.items()}


def test_distributed_timeout_reaches_every_group():
    timeouts = run_parallel(2, ["--distributed-timeout-minutes", "3.5", "--tensor-model-parallel-size", "2"],
                            fn=_group_timeouts)
    assert timeouts == dict.fromkeys(("pp", "edp", "ep", "tp", "dp", "world"), 3.5 * 60)


def test_an_old_torch_stops_with_one_line(tmp_path):
    """A torch older than the floor (a stand-in module that only has a version) is named in one
    line at start-up, not an ImportError from deep inside."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text('__version__ = "2.4.1+cu121"\n')
    out = subprocess.run([sys.executable, "-m", "megatron_m6.pretrain", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env={"PYTHONPATH": str(tmp_path), "PATH": ""}, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "error: megatron_m6 needs torch >= 2.13, found 2.4.1+cu121 (pip install 'torch>=2.13')"]
