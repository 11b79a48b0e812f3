"""Runs a few training steps of a tiny M6 under a layout, on gloo ranks spawned on this CPU,
and returns each step's loss and full (gathered) gradients, to compare with one process."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron_m6.config import parse_args
from megatron_m6.parallel import destroy_process_mesh
from megatron_m6.pretrain import run, setup
from megatron_m6.training.trainer import StepStats

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--ffn-hidden-size", "64", "--vocab-size", "128", "--seq-length", "24", "--image-size", "64",
        "--resnet-layers", "1,1,1,1", "--resnet-width", "8", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr", "1e-3", "--adam-eps", "1e-5", "--train-iters", "3",
        "--log-interval", "100"]
# --adam-eps 1e-5, not AdamW's 1e-8: a tenth of this model's gradient elements are exactly zero
# and the median is ~1e-5, so with 1e-8 Adam divides a gradient's rounding noise by its own size
# and turns it into a step of ±lr. fp32 runs that round differently (a TP split, another CPU)
# then drift apart by ~1e-3 in a few parameters by step 3, far beyond their rounding (measured:
# TP2 fp32 5.6e-5 full-gradient distance against a noise floor of 4.6e-7 on one process). Above
# that noise, each step is proportional to the gradient again and layouts stay within it.
MOE = ["--num-experts", "4", "--moe-router-topk", "2"]


def full_grads(model: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, gathered to its full shape from every rank (pipeline stages
    included), by layout-independent name; a tied embedding is reported once, as one process
    lists it."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        g = g.full_tensor() if isinstance(g, DTensor) else g
        name = re.sub(r"^\d+\.", "", name.replace("_checkpoint_wrapped_module.", ""))  # stage index
        if not (tied and name == "lm_head.weight"):
            grads[name] = g.detach().clone().cpu()
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, grads)
        for other in everyone:
            grads = {**other, **grads}
    return grads


def train_steps(argv: list[str], steps: int = 3) -> tuple[list[float], list[dict]]:
    cfg = parse_args(TINY + argv + ["--no-resnet-bottleneck"])
    trainer, loader = setup(cfg, log=lambda line: None)
    return record_steps(trainer, loader, steps)


def record_steps(trainer, loader, steps: int = 3) -> tuple[list[float], list[dict]]:
    """Each step's loss and full gradients, for `steps` steps of a built trainer."""
    cfg = trainer.cfg
    batches = iter(loader)
    losses, grads = [], []
    for _ in range(steps):
        micro = [next(batches) for _ in range(trainer.num_micro_batches)]
        losses.append(trainer.forward_backward(micro, StepStats()))
        grads.append(full_grads(trainer.model, not cfg.model.untie_embeddings_and_output_weights))
        trainer.optimizer_step()
    return losses, grads


def first_step(argv: list[str]) -> tuple[list[float], list[dict]]:
    """The loss and full gradients of the first step only."""
    return train_steps(argv, steps=1)


def replica_digests(argv: list[str]) -> list[dict[tuple, str]]:
    """Per rank, after 3 steps: a digest of every piece of every parameter and optimizer state
    it holds, keyed by (name, state, global offset and shape of the piece): ranks holding the
    same piece of a replicated tensor must hold the same bytes."""
    cfg = parse_args(TINY + argv + ["--no-resnet-bottleneck"])
    trainer, loader = setup(cfg, log=lambda line: None)
    batches = iter(loader)
    for _ in range(3):
        trainer.train_step([next(batches) for _ in range(trainer.num_micro_batches)], StepStats())

    def piece(t: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        if isinstance(t, DTensor):
            shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            return (tuple(offset), tuple(shape)), t.to_local()
        return ((0,) * t.dim(), tuple(t.shape)), t

    mine = {}
    for name, p in trainer.model.named_parameters():
        name = re.sub(r"^\d+\.", "", name.replace("_checkpoint_wrapped_module.", ""))
        for state, t in [("param", p.detach())] + sorted(trainer.optimizer.state[p].items()):
            where, local = piece(t)
            data = local.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            mine[name, state, where] = hashlib.sha256(data).hexdigest()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def history(argv: list[str]) -> list[float]:
    """Global-batch losses of a training run (resuming, saving or exiting as argv says)."""
    cfg = parse_args(TINY + argv + ["--no-resnet-bottleneck"])
    return run(cfg, log=lambda line: None).history


SAVING_FLAGS = {"--save": 1, "--save-interval": 1, "--keep-last": 1, "--async-save": 0}  # flag: values


def stop_and_resume(argv: list[str]) -> tuple[list[float], list[float]]:
    """(6 steps straight, the last 3 of 6 after exiting at step 3 and resuming); argv holds
    --save DIR for the checkpoint in between, and maybe other saving flags for that run."""
    rest, saving, i = [], [], 0
    while i < len(argv):
        n = SAVING_FLAGS.get(argv[i], -1) + 1
        (saving if n else rest).extend(argv[i:i + max(n, 1)])
        i += max(n, 1)
    save = saving[saving.index("--save") + 1]
    straight = history(rest + ["--train-iters", "6"])
    history(rest + saving + ["--train-iters", "6", "--exit-interval", "3"])
    return straight, history(rest + ["--train-iters", "6", "--load", save])


def allocated_bytes(argv: list[str]) -> list[dict[str, int]]:
    """Per rank: bytes of the parameters (as held during a step) and of the optimizer state this
    rank holds after one step (local shards only), gathered from every rank."""
    cfg = parse_args(TINY + argv + ["--no-resnet-bottleneck"])
    trainer, loader = setup(cfg, log=lambda line: None)
    batches = iter(loader)
    trainer.train_step([next(batches) for _ in range(trainer.num_micro_batches)], StepStats())

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    if cfg.data_parallel_sharding == "optimizer":  # parameters are gathered during a step
        for module in trainer.model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
    mine = {"params": sum(local_bytes(p) for p in trainer.model.parameters()),
            "optimizer": sum(local_bytes(v) for state in trainer.optimizer.state.values()
                             for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))}
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _worker(rank: int, world: int, port: int, fn, argv: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        result = fn(argv)
        if rank == 0:
            torch.save(result, out)
    finally:
        destroy_process_mesh()
    # The work is done and its result saved. Skip interpreter teardown: a gloo rank that ran
    # expert-parallel all-to-alls very rarely aborts there ("terminate called without an active
    # exception", after the last Python frame), which would fail a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_parallel(world: int, argv: list[str], fn=train_steps):
    """`fn(argv)` on `world` gloo ranks; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, port, fn, argv, out), nprocs=world, join=True)
        return torch.load(out)
