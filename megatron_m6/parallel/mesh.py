"""The process mesh: one DeviceMesh over (pp, edp, ep, tp), tensor parallel innermost.

Data parallel is what remains of the world size after tensor and pipeline parallel; expert
parallel is carved out of it (dp = edp x ep), so experts are sharded over `ep` and their
gradients reduced over `edp` only. `dp` is the flattened (edp, ep) dimension. The same code runs
with gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as C10dBackend  # the options type groups take
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_m6.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        return self.dp // self.ep


def parallel_dims(cfg: RunConfig, world_size: int) -> ParallelDims:
    """The layout of `cfg` on `world_size` ranks, or one clear ConfigError."""
    m = cfg.model
    tp, pp, ep = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                  cfg.expert_model_parallel_size)
    if min(tp, pp, ep) < 1:
        raise ConfigError("parallel sizes must be at least 1")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor ({tp}) x pipeline "
                          f"({pp}) parallel size")
    dims = ParallelDims(world_size, tp, pp, ep)
    checks = [
        (m.num_attention_heads % tp, f"--num-attention-heads {m.num_attention_heads} is not divisible by TP {tp}"),
        (m.ffn_hidden_size % tp, f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by TP {tp}"),
        (m.vocab_size % tp, f"vocabulary size {m.vocab_size} is not divisible by TP {tp}"),
        (m.num_layers % pp, f"--num-layers {m.num_layers} is not divisible by {pp} pipeline stages"),
        (ep > 1 and not m.num_experts, f"--expert-model-parallel-size {ep} needs --num-experts"),
        (m.num_experts % ep, f"--num-experts {m.num_experts} is not divisible by EP {ep}"),
        (dims.dp % ep, f"EP {ep} does not divide data-parallel size {dims.dp}"),
        (cfg.sequence_parallel and tp == 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (cfg.sequence_parallel and cfg.seq_length % tp,
         f"--seq-length {cfg.seq_length} is not divisible by TP {tp} (sequence parallel)"),
        (cfg.num_layers_per_virtual_pipeline_stage and pp == 1,
         "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
        (cfg.num_layers_per_virtual_pipeline_stage
         and m.num_layers % (pp * cfg.num_layers_per_virtual_pipeline_stage),
         f"--num-layers {m.num_layers} is not divisible by {pp} stages x "
         f"{cfg.num_layers_per_virtual_pipeline_stage} layers per virtual stage"),
        (cfg.global_batch_size % (cfg.micro_batch_size * dims.dp),
         f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
         f"{cfg.micro_batch_size} x data-parallel size {dims.dp}"),
    ]
    for failed, message in checks:
        if failed:
            raise ConfigError(message)
    micro_per_rank = cfg.global_batch_size // (cfg.micro_batch_size * dims.dp)
    if pp > 1 and micro_per_rank % pp:
        raise ConfigError(f"{micro_per_rank} micro-batches per step per data-parallel rank must be a "
                          f"multiple of the {pp} pipeline stages (raise --global-batch-size)")
    return dims


def init_process_mesh(dims: ParallelDims, device: torch.device,
                      timeout_minutes: float = 10.0) -> DeviceMesh | None:
    """Join the process group started by torchrun (or one already initialised, like a dry run's
    fake group) and build the mesh (None for one process). A collective on any of its groups
    that waits longer than `timeout_minutes` fails (--distributed-timeout-minutes)."""
    if dims.world_size == 1:
        return None
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    # new_group does not inherit init_process_group's timeout (it falls back to torch's default),
    # so every mesh dimension's group gets it through its options.
    options = _group_options(dist.get_backend(), timeout)
    names = ("pp", "edp", "ep", "tp")
    override = {name: options for name in names} if options is not None else None
    mesh = init_device_mesh(device.type, (dims.pp, dims.edp, dims.ep, dims.tp), mesh_dim_names=names,
                            backend_override=override)
    mesh["edp", "ep"]._flatten("dp", backend_override=options)
    return mesh


def _group_options(backend: str, timeout: timedelta) -> C10dBackend.Options | None:
    """Group options carrying `timeout` for NCCL (which accepts only its own options type) and
    gloo; None (torch's defaults) for others, such as a dry run's fake backend."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return options
    return C10dBackend.Options(backend, timeout) if backend == "gloo" else None


def destroy_process_mesh() -> None:
    """Tear the process groups down while the interpreter is still whole. Models hold their
    groups (DTensor meshes, all-to-all hooks) in reference cycles; left to interpreter shutdown,
    gloo ranks that ran expert-parallel all-to-alls sometimes aborted (SIGABRT after a finished
    run: 4 in 30 runs, 0 in 70 with this). Collect first, then destroy."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device_type: str) -> torch.device:
    """cuda:LOCAL_RANK under torchrun on GPUs, else the CPU."""
    if device_type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
