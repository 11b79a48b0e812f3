"""The dry run: one rank's real layout of a job of any size, built on a laptop in seconds.

`python -m megatron_m6.pretrain --dry-run --world-size N --rank R [the job's flags]` goes through
pretrain's own setup path (parallel_dims, init_process_mesh, build_pipeline_stages, parallelize
with its tensor, expert and data-parallel plans) over torch's fake process-group backend, which
needs no peers, with the model left on the meta device: no weights are allocated or drawn, and
no data loader, trainer or optimizer is built. It then checks every parameter this rank holds
against two references made independently of the plans:

- the memory model's placement rules (megatron_m6/parallel/memory.py, `rank_param_shapes`) for
  this rank's mesh coordinates, before and after data-parallel sharding;
- DTensor's own local-shape computation for the parameter's placements.

and prints the rank's local parameter counts beside the memory model's per-GPU figures. Any
difference is a `LayoutError` naming the parameters (exit status 1).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_m6.config import RunConfig
from megatron_m6.model_size import layout_from_config
from megatron_m6.parallel import destroy_process_mesh, init_process_mesh, parallel_dims
from megatron_m6.parallel.memory import (
    Layout,
    RankCoordinates,
    RankMemory,
    RankParams,
    count_params,
    estimate_rank_memory,
    rank_coordinates,
    rank_param_counts,
    rank_param_shapes,
)
from megatron_m6.parallel.recompute import plain_parameter_name
from megatron_m6.pretrain import build_layout, load_tokenizer

DP_MESH_DIMS = ("dp", "edp")  # the mesh dimensions data-parallel sharding (FSDP) splits over


class LayoutError(RuntimeError):
    """The built layout differs from what the memory model's rules say this rank holds."""


@dataclass
class DryRunReport:
    rank: int
    layout: Layout
    coords: RankCoordinates
    num_params: int  # parameters checked on this rank
    counted: RankParams  # local elements before data-parallel sharding, counted from the model
    expected: RankParams  # the memory model's count for the same coordinates
    counted_shard: RankParams  # local elements this rank holds (after FSDP's sharding)
    expected_shard: RankParams
    memory: RankMemory  # the memory model's per-GPU bytes for this rank
    seconds: float = 0.0

    def lines(self) -> list[str]:
        layout, coords, memory = self.layout, self.coords, self.memory
        gib = lambda n: f"{n / 2**30:.2f} GiB"
        pair = lambda got, want: (f"dense {got.dense:,} (memory model {want.dense:,}), "
                                  f"expert {got.expert:,} (memory model {want.expert:,})")
        return [
            f"dry run: rank {self.rank} of {layout.tp * layout.pp * layout.dp}, layout TP{layout.tp} "
            f"PP{layout.pp} EP{layout.ep} DP{layout.dp} (expert-data-parallel {layout.dp // layout.ep}), "
            f"sharding {layout.data_parallel_sharding}; coordinates pp {coords.pp}, dp {coords.dp(layout)} "
            f"(edp {coords.edp}, ep {coords.ep}), tp {coords.tp}",
            f"dry run: {self.num_params} parameters, every local shape as the layout implies "
            f"(memory model rules and DTensor agree); all on the meta device",
            f"dry run: parameters before data-parallel sharding: {pair(self.counted, self.expected)}",
            f"dry run: parameters this rank holds: {pair(self.counted_shard, self.expected_shard)}",
            f"dry run: memory model per GPU ({'bf16' if layout.bf16 else 'fp32'}, micro-batch "
            f"{layout.micro_batch_size} x {layout.seq_length}): params {gib(memory.params)}, "
            f"grads {gib(memory.grads)}, optimizer {gib(memory.optimizer)}, "
            f"activations {gib(memory.activations)} (estimate), total {gib(memory.total)}",
            f"dry run: done in {self.seconds:.1f} s, no real memory allocated",
        ]


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int, timeout_minutes: float):
    """torch.distributed initialised as `rank` of `world_size` on the fake backend: collectives
    return at once and no peer is needed. Torn down on exit, so dry runs can follow each other."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=timeout_minutes))
    try:
        yield
    finally:
        destroy_process_mesh()


def dry_run(cfg: RunConfig, log=print) -> DryRunReport:
    """Build rank `cfg.rank` of a `cfg.world_size` job on the meta device, check it against the
    memory model and DTensor, and log the report (LayoutError on any difference)."""
    start = time.perf_counter()
    load_tokenizer(cfg)  # the vocabulary size the real run would use
    dims = parallel_dims(cfg, cfg.world_size)
    layout = layout_from_config(cfg, cfg.world_size)
    meta = torch.device("meta")
    group = (fake_process_group(cfg.world_size, cfg.rank, cfg.distributed_timeout_minutes)
             if cfg.world_size > 1 else contextlib.nullcontext())
    with group:
        # The mesh on "cpu": the fake backend serves any device type, and a dry run on a GPU
        # login node must not touch its GPU.
        mesh = init_process_mesh(dims, torch.device("cpu"), cfg.distributed_timeout_minutes)
        _, parts, _, _ = build_layout(cfg, dims, mesh, meta)
        report = check_layout(cfg, layout, mesh, parts, cfg.rank)
    report.seconds = time.perf_counter() - start
    for line in report.lines():
        log(line)
    return report


def mesh_coordinates(mesh: DeviceMesh | None) -> RankCoordinates:
    """This rank's coordinates as the built mesh says."""
    if mesh is None:
        return RankCoordinates()
    return RankCoordinates(*(mesh[name].get_local_rank() for name in ("pp", "edp", "ep", "tp")))


def layout_name(name: str, tied: bool) -> str:
    """A parameter's name in M6, as the memory model lists it: no recomputation wrapper, and a
    tied head (its own copy on the last pipeline stage) under the embedding's name."""
    name = plain_parameter_name(name)
    return "embedding.word_emb.weight" if tied and name == "lm_head.weight" else name


def local_shapes(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(the local shape this rank holds, DTensor's computation of it from the placements, the
    shape before data-parallel sharding: the placements on the dp/edp mesh dimensions dropped)."""
    if not isinstance(p, DTensor):
        return tuple(p.shape), tuple(p.shape), tuple(p.shape)
    mesh, placements = p.device_mesh, p.placements
    names = mesh.mesh_dim_names or ()
    before_dp = [Replicate() if name in DP_MESH_DIMS else pl for name, pl in zip(names, placements)]
    return (tuple(p.to_local().shape),
            tuple(compute_local_shape_and_global_offset(p.shape, mesh, placements)[0]),
            tuple(compute_local_shape_and_global_offset(p.shape, mesh, before_dp)[0]))


def check_layout(cfg: RunConfig, layout: Layout, mesh: DeviceMesh | None, parts: list[nn.Module],
                 rank: int) -> DryRunReport:
    """Every parameter of `parts` against the memory model's placement for `rank` and against
    DTensor; the counts of both; LayoutError listing what differs."""
    coords = rank_coordinates(layout, rank)
    problems = []
    if mesh_coordinates(mesh) != coords:
        problems.append(f"mesh coordinates {mesh_coordinates(mesh)}, memory model {coords}")
    want_before = rank_param_shapes(cfg.model, layout, coords)
    want_shard = rank_param_shapes(cfg.model, layout, coords, dp_sharded=True)
    tied = not cfg.model.untie_embeddings_and_output_weights
    got_before, got_shard = {}, {}
    for part in parts:
        for name, p in part.named_parameters():
            name = layout_name(name, tied)
            local, dtensor_local, before = local_shapes(p)
            got_before[name], got_shard[name] = before, local
            if local != dtensor_local:
                problems.append(f"{name}: local shape {local}, DTensor's placements give {dtensor_local}")
        for name, t in list(part.named_parameters()) + list(part.named_buffers()):
            if t.device.type != "meta":
                problems.append(f"{name} is on {t.device}, not the meta device")
    for name in sorted(want_before.keys() | got_before.keys()):
        if name not in got_before or name not in want_before:
            where = "missing on this rank" if name not in got_before else "not in the memory model"
            problems.append(f"{name}: {where}")
        elif (got_before[name], got_shard[name]) != (want_before[name], want_shard[name]):
            problems.append(f"{name}: local shape {got_shard[name]} ({got_before[name]} before data-parallel "
                            f"sharding), memory model {want_shard[name]} ({want_before[name]})")
    counted, counted_shard = count_params(got_before), count_params(got_shard)
    expected = rank_param_counts(cfg.model, layout, coords.pp, coords.tp, coords.ep)
    expected_shard = count_params(want_shard)
    if counted != expected or counted_shard != expected_shard:
        problems.append(f"counts {counted} / {counted_shard}, memory model {expected} / {expected_shard}")
    if problems:
        raise LayoutError(f"rank {rank}: the layout differs from the memory model in "
                          f"{len(problems)} places: " + "; ".join(problems[:5]))
    memory = estimate_rank_memory(cfg.model, layout, coords.pp, coords.tp, coords.ep)
    return DryRunReport(rank, layout, coords, len(got_before), counted, expected, counted_shard,
                        expected_shard, memory)
