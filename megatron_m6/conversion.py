"""Checkpoint conversion, one tensor at a time: distributed checkpoint <-> consolidated
safetensors release, a torchvision ResNet-50 into the image encoder of a new checkpoint, and a
checkpoint grown to more vocabulary rows and positions (text-to-image's code tokens).

A release is a folder: `config.json` (the ModelConfig fields), the weights as
`model.safetensors` or, above the shard size, `model-0000K-of-0000N.safetensors` with
`model.safetensors.index.json` (Hugging Face's layout), and the tokenizer's `vocab.txt`. It
loads on one device without torch.distributed. Converted training checkpoints are
"model-only": `--load` starts training from their weights at iteration 0.

Nothing here holds a whole model: DCP reads and writes one tensor per call (see
`_StreamingSavePlanner`), and release shards are filled up to `max_shard_bytes`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

from megatron_m6.config import ModelConfig
from megatron_m6.model import M6, init_weights
from megatron_m6.model.m6 import init_rules, init_values
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.training.checkpoint import (
    CheckpointError,
    _fsync_write,
    checkpoint_dir,
    latest_checkpoint,
    one_line_cause,
    publish,
)

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
VOCAB = "vocab.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIED_HEAD, EMBEDDING = "lm_head.weight", "embedding.word_emb.weight"
IMAGE_ENCODER = "embedding.image_encoder."


class ConversionError(ValueError):
    """Input a conversion cannot use; the message says what and why."""


def model_config_from_dict(saved: dict, where: str) -> ModelConfig:
    """A ModelConfig from its saved fields (meta.pt or config.json); unknown fields are an error,
    lists (from JSON) become tuples."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise CheckpointError(f"{where} has unknown model_config fields: {', '.join(unknown)}")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def _tied(cfg: ModelConfig) -> bool:
    return not cfg.untie_embeddings_and_output_weights


# -- releases ----------------------------------------------------------------------------------
def is_release(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG))


def release_config(path: str) -> ModelConfig:
    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{CONFIG} is unreadable: {e}") from None
    return model_config_from_dict(saved.get("model_config", {}), f"{path}/{CONFIG}")


def release_meta(path: str) -> dict:
    """What a release keeps of a checkpoint's meta: the iteration, and the vocabulary's digest
    when it ships its vocab.txt."""
    with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
        iteration = json.load(f).get("iteration", 0)
    vocab = os.path.join(path, VOCAB)
    return {"iteration": iteration,
            "vocab_sha256": M6Tokenizer.from_vocab_file(vocab).digest if os.path.isfile(vocab) else None}


def release_files(path: str) -> dict[str, str]:
    """Tensor name -> the shard file holding it; one clear error for a missing index or shard."""
    if os.path.isfile(os.path.join(path, SINGLE)):
        with safe_open(os.path.join(path, SINGLE), framework="pt") as f:
            return {name: SINGLE for name in f.keys()}
    index = os.path.join(path, INDEX)
    if not os.path.isfile(index):
        raise CheckpointError(f"{path} is not a release: neither {SINGLE} nor {INDEX} is there")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index} is corrupt: {e}") from None
    for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(path, shard)):
            raise CheckpointError(f"{path} is incomplete: {shard} (named in {INDEX}) is missing")
    return weight_map


def read_release(path: str, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in the release (or of `names`), one shard open at a time."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in release_files(path).items():
        if names is None or name in names:
            by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        try:
            with safe_open(os.path.join(path, shard), framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as e:  # safetensors reports a bad header as either
            raise CheckpointError(f"{path}/{shard} is corrupt: {e}") from None


def expected_weights(model: nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """What a release of this model holds: its state dict, the tied head once (as the
    embedding)."""
    state = model.state_dict()
    if _tied(cfg):
        state.pop(TIED_HEAD, None)
    return state


def _check_names(have: set[str], want: set[str], where: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit its model config: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")


@torch.no_grad()
def load_release_weights(path: str, model: M6) -> None:
    """The release's weights into a whole model on one device, tensor by tensor."""
    state = expected_weights(model, model.cfg)
    _check_names(set(release_files(path)), set(state), path)
    for name, tensor in read_release(path):
        if tensor.shape != state[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model wants {tuple(state[name].shape)}")
        state[name].copy_(tensor)


@torch.no_grad()
def load_release_into_parts(path: str, parts: list[nn.Module], cfg: ModelConfig) -> None:
    """The release's weights into this rank's share of a training model under any layout: each
    rank reads only the tensors its stages hold and keeps its own slice of each (tensor- and
    FSDP-sharded parameters are DTensors), so no rank needs the whole model and nothing is sent."""
    files = release_files(path)
    states = [get_model_state_dict(part) for part in parts]
    source = {name: EMBEDDING if name == TIED_HEAD and _tied(cfg) else name for state in states for name in state}
    missing = sorted(set(source.values()) - set(files))
    if missing:
        raise CheckpointError(f"{path} does not fit its model config: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}")
    full = dict(read_release(path, set(source.values())))
    for part, state in zip(parts, states):
        loaded = {}
        for name, target in state.items():
            tensor = full[source[name]]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"{path}: {source[name]} has shape {tuple(tensor.shape)}, "
                                      f"the model wants {tuple(target.shape)}")
            tensor = tensor.to(target.dtype)
            loaded[name] = (distribute_tensor(tensor, target.device_mesh, target.placements, src_data_rank=None)
                            if isinstance(target, DTensor) else tensor.to(target.device))
        set_model_state_dict(part, loaded)


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names in order, cut into shards of at most max_shard_bytes (a bigger tensor alone)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + [current] if current else shards


def _shard_name(k: int, n: int) -> str:
    return SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def checkpoint_to_release(load_dir: str, output: str, max_shard_bytes: int = 5 * 2**30,
                          dtype: str | None = None, vocab_file: str | None = None,
                          progress: bool = True) -> dict:
    """The latest checkpoint under `load_dir` (any layout) as a release in `output`, written
    under a temporary name and renamed when complete. Returns a summary (tensors, bytes,
    shards)."""
    path, meta = latest_checkpoint(load_dir)
    cfg = model_config_from_dict(meta["model_config"], f"{path}/meta.pt")
    _refuse_existing(output)
    if vocab_file and not os.path.isfile(vocab_file):
        raise ConversionError(f"vocab file {vocab_file} does not exist")
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    tensors = {k.removeprefix("model."): v for k, v in stored.items()
               if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    with torch.device("meta"):
        want = expected_weights(M6(cfg), cfg)
    _check_names(set(tensors) - ({TIED_HEAD} if _tied(cfg) else set()), set(want), path)
    out_dtype = {name: DTYPES[dtype] if dtype and tensors[name].properties.dtype.is_floating_point
                 else tensors[name].properties.dtype for name in want}
    sizes = {name: want[name].numel() * out_dtype[name].itemsize for name in want}
    shards = _shard_plan(sizes, max_shard_bytes)
    tmp = f"{output}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map = {}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="to release", disable=not progress)
    for k, names in enumerate(shards):  # one DCP read per shard: its tensors, nothing else
        state = {"model": {name: torch.empty(tuple(tensors[name].size), dtype=tensors[name].properties.dtype)
                           for name in names}}
        try:
            dcp.load(state, checkpoint_id=path, no_dist=True)
        except Exception as e:
            raise CheckpointError(f"{path}: reading {names[0]}... failed: {one_line_cause(e)}") from None
        block = {name: state["model"].pop(name).to(out_dtype[name]).contiguous() for name in names}
        shard = os.path.join(tmp, _shard_name(k, len(shards)))
        save_file(block, shard, metadata={"format": "pt"})
        _fsync_file(shard)
        weight_map.update({name: _shard_name(k, len(shards)) for name in names})
        bar.update(sum(sizes[name] for name in names))
        del block  # before the next shard is read: one shard in memory at a time
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        _write_text(os.path.join(tmp, INDEX), json.dumps(index, indent=2))
    config = {"architectures": ["M6"], "torch_dtype": str(out_dtype[EMBEDDING]).removeprefix("torch."),
              "iteration": meta["iteration"], "model_config": dataclasses.asdict(cfg)}
    _write_text(os.path.join(tmp, CONFIG), json.dumps(config, indent=2, ensure_ascii=False))
    if vocab_file:
        shutil.copyfile(vocab_file, os.path.join(tmp, VOCAB))
    os.replace(tmp, output)
    return {"tensors": len(want), "bytes": sum(sizes.values()), "shards": len(shards)}


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    _fsync_write(path, lambda f: f.write(text.encode("utf-8")))


def _refuse_existing(output: str) -> None:
    if os.path.exists(output):
        raise ConversionError(f"{output} already exists; conversion never overwrites")


# -- writing model-only training checkpoints -----------------------------------------------------
class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans the save from meta tensors (shapes only) and makes each tensor only when the
    writer asks for it; with one file per tensor the writer holds one tensor at a time."""

    def __init__(self, make: Callable[[str], torch.Tensor]):
        super().__init__()
        self.make = make

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.make(write_item.index.fqn.removeprefix("model."))


def write_model_checkpoint(save_dir: str, cfg: ModelConfig, make: Callable[[str], torch.Tensor],
                           progress: bool = True, meta: dict | None = None) -> str:
    """A model-only checkpoint (iteration 0) of an M6 with `cfg` under `save_dir`, every tensor
    made by `make(name)`, with `meta`'s entries added to its meta.pt; published like a training
    checkpoint (tracker last)."""
    _refuse_existing(save_dir)
    with torch.device("meta"):
        shapes = M6(cfg).state_dict()
    bar = tqdm(total=len(shapes), unit="tensor", desc="to checkpoint", disable=not progress)

    def checked(name: str) -> torch.Tensor:
        t = make(name)
        if t.shape != shapes[name].shape:
            raise ConversionError(f"{name} has shape {tuple(t.shape)}, the model wants "
                                  f"{tuple(shapes[name].shape)}")
        bar.update(1)
        return t.to(shapes[name].dtype).contiguous()

    os.makedirs(save_dir)
    tmp = checkpoint_dir(save_dir, 0) + ".tmp"
    os.makedirs(tmp)
    writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False)
    dcp.save({"model": shapes}, storage_writer=writer, planner=_StreamingSavePlanner(checked),
             no_dist=True)
    bar.close()
    meta = {**(meta or {}), "iteration": 0, "consumed_samples": 0, "model_only": True,
            "model_config": dataclasses.asdict(cfg), "world_size": None}
    _fsync_write(os.path.join(tmp, "meta.pt"), lambda f: torch.save(meta, f))
    return publish(save_dir, 0, keep_last=None)


def release_to_checkpoint(release: str, save_dir: str, progress: bool = True) -> str:
    """A release as a model-only training checkpoint, loadable under any parallel layout."""
    cfg = release_config(release)
    files = release_files(release)
    with torch.device("meta"):
        _check_names(set(files), set(expected_weights(M6(cfg), cfg)), release)

    def make(name: str) -> torch.Tensor:
        source = EMBEDDING if name == TIED_HEAD and _tied(cfg) else name
        with safe_open(os.path.join(release, files[source]), framework="pt") as f:
            return f.get_tensor(source)

    return write_model_checkpoint(save_dir, cfg, make, progress)


# -- a torchvision ResNet-50 into a new checkpoint ------------------------------------------------
def read_torchvision_resnet(path: str) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict (.pth/.pt via torch.load, memory-mapped, or
    .safetensors), its classifier dropped."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConversionError(f"{path} is not a readable state dict: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}


def resnet_to_checkpoint(resnet_path: str, cfg: ModelConfig, seed: int, save_dir: str,
                         progress: bool = True) -> str:
    """A model-only checkpoint of a freshly initialised M6 (as `pretrain --seed` would draw it)
    whose image encoder holds the torchvision ResNet's weights."""
    resnet = read_torchvision_resnet(resnet_path)
    with torch.device("meta"):
        model = M6(cfg)
    encoder = {k.removeprefix(IMAGE_ENCODER): v.shape for k, v in model.state_dict().items()
               if k.startswith(IMAGE_ENCODER)}
    missing, unexpected = sorted(set(encoder) - set(resnet)), sorted(set(resnet) - set(encoder))
    wrong = [k for k in set(encoder) & set(resnet) if resnet[k].shape != encoder[k]]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"{resnet_path} does not fit the image encoder (resnet_layers {cfg.resnet_layers}, "
            f"bottleneck {cfg.resnet_bottleneck}, width {cfg.resnet_width}): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {sorted(wrong)[:3]}")
    owners = dict(model.named_modules())
    cache: dict[str, nn.Module] = {}

    def make(name: str) -> torch.Tensor:
        if name.startswith(IMAGE_ENCODER):
            return resnet[name.removeprefix(IMAGE_ENCODER)]
        owner, leaf = name.rsplit(".", 1)
        if owner not in cache:  # materialise and initialise one module at a time
            module = copy.deepcopy(owners[owner]).to_empty(device="cpu")
            init_weights(module, cfg, seed, prefix=owner)
            cache.clear()
            cache[owner] = module
        return cache[owner].state_dict()[leaf]

    return write_model_checkpoint(save_dir, cfg, make, progress)


# -- growing a checkpoint's vocabulary and positions ---------------------------------------------
GROWN_ROWS = ("embedding.word_emb.weight", "lm_head.weight", "embedding.pos_emb.weight")


def _read_tensor(path: str, name: str, stored: TensorStorageMetadata) -> torch.Tensor:
    state = {"model": {name: torch.empty(tuple(stored.size), dtype=stored.properties.dtype)}}
    try:
        dcp.load(state, checkpoint_id=path, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{path}: reading {name} failed: {one_line_cause(e)}") from None
    return state["model"][name]


def grow_checkpoint(load_dir: str, save_dir: str, vocab_size: int, keep_vocab_rows: int,
                    max_position_embeddings: int | None = None, seed: int = 0, meta: dict | None = None,
                    progress: bool = True) -> str:
    """The latest checkpoint of `load_dir` as a model-only checkpoint with `vocab_size` embedding
    (and output) rows and at least `max_position_embeddings` learned positions. Rows below
    `keep_vocab_rows` (the text vocabulary; above it lie padding rows that never trained) and
    every old position keep their weights, so a text sequence gives the same hidden states and
    text logits as before; new rows start as the rows of a fresh model of `seed` would."""
    path, old_meta = latest_checkpoint(load_dir)
    old = model_config_from_dict(old_meta["model_config"], f"{path}/meta.pt")
    positions = max(old.max_position_embeddings, max_position_embeddings or 0)
    cfg = dataclasses.replace(old, vocab_size=vocab_size, max_position_embeddings=positions)
    if not keep_vocab_rows <= min(old.vocab_size, vocab_size):
        raise ConversionError(f"cannot keep {keep_vocab_rows} vocabulary rows of {old.vocab_size} in {vocab_size}")
    stored = {k.removeprefix("model."): v for k, v in dcp.FileSystemReader(path).read_metadata().state_dict_metadata
              .items() if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    with torch.device("meta"):
        model = M6(cfg)
    rules = {key: rule for key, _, rule in init_rules(model.named_modules(), cfg)}

    def make(name: str) -> torch.Tensor:
        source = EMBEDDING if name == TIED_HEAD and _tied(cfg) else name
        if source not in stored:
            raise ConversionError(f"{path} lacks {source}")
        old_tensor = _read_tensor(path, source, stored[source])
        if source not in GROWN_ROWS:
            return old_tensor
        keep = old.max_position_embeddings if source.endswith("pos_emb.weight") else keep_vocab_rows
        shape = model.state_dict()[name].shape
        grown = torch.empty(shape, dtype=old_tensor.dtype)
        init_values(grown, source, shape, rules[source], seed)
        grown[:keep] = old_tensor[:keep]
        return grown

    return write_model_checkpoint(save_dir, cfg, make, progress, meta)
