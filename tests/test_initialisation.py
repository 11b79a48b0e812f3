"""Initialisation at scale: each rank draws and allocates only its own shard of every parameter.

Measured on 4 gloo ranks (EP2 x DP2, FSDP `optimizer`) during the whole of pretrain.setup, with
two instruments that know nothing of init_weights: a TorchDispatchMode that records every
`normal_` (the generator's seed names the tensor drawn, each row of stacked experts having its
own), and torch's profiler, which records every CPU allocation and free.
"""

import math
import tempfile
import zlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_m6.config import parse_args
from megatron_m6.model import M6
from megatron_m6.pretrain import run, setup
from tests.parallel_harness import TINY, run_parallel

# 8 experts of 32 x 256: one whole stacked expert weight (64K elements) is larger than the
# largest dense tensor (the last ResNet convolution, 64 x 64 x 3 x 3 = 36K), while a rank holds
# 2 experts (EP2, then FSDP over 2 expert-data-parallel ranks).
LAYOUT = ["--num-experts", "8", "--moe-ffn-hidden-size", "256", "--expert-model-parallel-size", "2",
          "--data-parallel-sharding", "optimizer"]
SEED = parse_args(TINY).seed


class DrawRecorder(TorchDispatchMode):
    """Every normal_ into real memory (nn.init.normal_ and kaiming_normal_ both end there; the
    modules' own initialisation on the meta device draws nothing): (seed, elements)."""

    def __init__(self):
        super().__init__()
        self.draws: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.normal_.default and not args[0].is_meta:
            generator = kwargs.get("generator")
            self.draws.append((generator and generator.initial_seed(), args[0].numel()))
        return func(*args, **kwargs)


def allocated(prof) -> tuple[int, int]:
    """(the most CPU bytes allocated at once while profiling, the bytes still allocated at its
    end), counted from its start."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


BY_ROW = (torch.nn.Linear, torch.nn.Embedding)  # and stacked experts: drawn row by row


def drawn_keys(cfg) -> dict[int, str]:
    """Generator seed -> the name of what it draws: a convolution's weight by its name, each row
    of a linear or embedding weight and each expert of a stacked expert weight by the weight's
    name and the row's index (the naming megatron_m6.model.m6.InitRule documents)."""
    with torch.device("meta"):
        model = M6(cfg.model)
    keys = {}
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith(("experts.w1", "experts.w2")) or (isinstance(module, BY_ROW) and name.endswith(".weight")):
            drawn = [f"{name}.{r}" for r in range(p.shape[0])]
        elif isinstance(module, torch.nn.Conv2d):
            drawn = [name]
        else:  # biases and norms are filled, not drawn
            drawn = []
        for key in drawn:
            keys[SEED * 1_000_003 + zlib.crc32(key.encode())] = key
    return keys


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of the storage this rank holds for `t` (FSDP's padding included)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.untyped_storage().nbytes()


def _gather(mine):
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def measure_setup(argv: list[str]) -> list[dict]:
    """On every rank: what setup drew and allocated, beside what the rank holds after it; then,
    after training a step and saving, what a setup with --load draws."""
    save = argv[argv.index("--save") + 1]
    layout = [a for a in argv if a not in ("--save", save)]
    cfg = parse_args(TINY + layout + ["--no-resnet-bottleneck"])
    recorder = DrawRecorder()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, recorder:
        trainer, _ = setup(cfg, log=lambda line: None)
    keys = drawn_keys(cfg)
    model = trainer.model
    held = {name: p for name, p in model.named_parameters()}
    by_row, whole = {}, {}
    for name, p in held.items():
        if f"{name}.0" in keys.values():
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            by_row[name] = dict(rows=list(range(offset[0], offset[0] + shape[0])),
                                row=math.prod(p.shape[1:]), local=p.to_local().numel())
        elif name in keys.values():
            whole[name] = p.numel()
    mine = dict(
        draws=[(keys.get(seed), n) for seed, n in recorder.draws],
        by_row=by_row, whole=whole,
        held_bytes=sum(local_bytes(t) for t in list(model.parameters()) + list(model.buffers())),
        allocated=allocated(prof),
    )
    del trainer, model, held

    # Train one step and save; then a setup that loads the checkpoint must draw nothing.
    cfg = parse_args(TINY + layout + ["--no-resnet-bottleneck", "--train-iters", "1", "--save", save,
                                      "--save-interval", "1"])
    trained = {n: p.full_tensor() for n, p in run(cfg, log=lambda line: None).model.named_parameters()}
    cfg = parse_args(TINY + layout + ["--no-resnet-bottleneck", "--load", save])
    recorder = DrawRecorder()
    with recorder:
        loaded, _ = setup(cfg, log=lambda line: None)
    mine["draws_with_load"] = len(recorder.draws)
    mine["loaded_equals_saved"] = all(torch.equal(p.full_tensor(), trained[n])
                                      for n, p in loaded.model.named_parameters())
    return _gather(mine)


def test_each_rank_draws_and_allocates_only_its_own_shard():
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_parallel(4, LAYOUT + ["--save", tmp], fn=measure_setup)
    for rank, r in enumerate(ranks):
        drawn: dict[str, int] = {}
        for key, n in r["draws"]:
            assert key is not None, f"rank {rank} drew a tensor that is no parameter or expert row"
            assert key not in drawn, f"rank {rank} drew {key} twice"
            drawn[key] = n
        # Linear, embedding and expert weights: exactly the rows this rank holds (DTensor's own
        # placement arithmetic), no more; FSDP shards them all on rows here, so what is drawn is
        # what is kept.
        for name, w in r["by_row"].items():
            rows = sorted(int(k.rsplit(".", 1)[1]) for k in drawn if k.rsplit(".", 1)[0] == name)
            assert rows == w["rows"], f"rank {rank} drew rows {rows} of {name}, holds {w['rows']}"
            assert all(drawn[f"{name}.{i}"] == w["row"] for i in rows)
            assert len(rows) * w["row"] >= w["local"] - w["row"]  # FSDP pads at most one row
        # Convolutions (He's fan-out needs the whole shape) are drawn whole, once each.
        assert all(drawn[k] == n for k, n in r["whole"].items())
        assert set(drawn) <= {f"{n}.{i}" for n, w in r["by_row"].items() for i in w["rows"]} | set(r["whole"])
        largest_dense = 4 * max(list(r["whole"].values()) + [w["row"] for w in r["by_row"].values()])
        assert largest_dense < 4 * math.prod((8, 32, 256))  # else the bound below could not tell
        # Peak during setup: what the rank keeps, plus one drawn tensor's transient at most (a
        # row, or a whole convolution). What it keeps is its parameters and buffers (local
        # shards, FSDP's padding included) and a few bytes of other state (FSDP's and the
        # trainer's scalars), less than one expert row.
        peak, kept = r["allocated"]
        expert_row = 4 * 32 * 256
        assert r["held_bytes"] <= kept < r["held_bytes"] + expert_row, (rank, kept, r["held_bytes"])
        assert peak <= kept + largest_dense, (rank, peak, kept)
        # With --load the checkpoint provides every weight: nothing is drawn.
        assert r["draws_with_load"] == 0
        assert r["loaded_equals_saved"]
