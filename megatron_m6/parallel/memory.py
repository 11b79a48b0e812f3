"""Per-GPU memory of a parallel layout, so a launch script's sizes can be checked before a job
queues for days and dies of out-of-memory in its first step.

Parameters, gradients and optimizer state are exact counts: the model is built on the meta device
and every parameter is placed the way the layout splits it (Megatron's rules):

- TP: `qkv` and `fc1` (weight and bias) split on their output dimension, `proj` and `fc2` weights
  on their input dimension (their biases replicated), the word embedding and `lm_head` on the
  vocabulary; everything else (norms, position/modality/patch embeddings, ResNet, router) is
  replicated. MoE experts (`experts.w1/b1/w2/b2`, stacked [E, ...]) are split over EP on the
  expert dimension and replicated across TP.
- PP: contiguous layer stages (round-robin chunks of `num_layers_per_virtual_pipeline_stage`
  layers when interleaved); the embedding module (ResNet included) on the first stage, the final
  norm and head on the last. With tied embeddings the last stage holds its own copy of the word
  embedding for the head (when there is more than one stage).
- Splits follow torch.chunk / DTensor `Shard` (ceil-sized pieces), so rank 0 is the largest.

Bytes per parameter follow Megatron's mixed-precision convention: 16-bit parameters (fp32
without --bf16), fp32 gradients (this repo reduces gradients in fp32), and fp32 Adam moments
plus, with bf16, an fp32 master copy, counted as optimizer state (12 bytes, 8 without bf16).
Data-parallel sharding divides a flat buffer evenly (rounded up): `optimizer` shards the
optimizer state, `full` also parameters and gradients; non-expert parameters over the whole DP
group, expert parameters over the expert-data-parallel group (DP / EP). Transient buffers
(all-gathered layers under `full`, communication buckets, the CUDA caching allocator's slack)
are not counted: keep a few GiB of headroom.

Activations are an ESTIMATE: Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models") per layer, s*b*h*(34 + 5*a*s/h) bytes in 16-bit, generalised to this
model's FFN width and to MoE layers (never split by TP: every TP rank routes the whole sequence,
see tensor_parallel.py), divided by TP where tensor and sequence parallelism split them;
selective recomputation drops the attention-score term, full recomputation keeps the layer input
(plus one layer being recomputed). It is conservative for this repo: SDPA's fused kernels keep no
s x s scores and dropout defaults to 0. The first stage adds the ResNet's saved tensors (measured
on the meta device, every sample assumed to carry an image) and the last stage the logits.
A stage holds the activations of every micro-batch in flight under 1F1B (pp - stage of them,
more when interleaved); this assumes at least pp micro-batches per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from megatron_m6.config import ModelConfig
from megatron_m6.model import M6
from megatron_m6.model.resnet import ResNetFeatures

SHARDING_MODES = ("replicate", "optimizer", "full")
RECOMPUTE_MODES = (None, "selective", "full")


@dataclass
class Layout:
    """How one training job splits the model: the sizes of the parallel dimensions and the
    memory-saving options (the meaning of the Megatron flags of the same names)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    data_parallel_sharding: str = "replicate"  # replicate | optimizer | full
    recompute_granularity: str | None = None  # None | selective | full
    micro_batch_size: int = 1
    seq_length: int = 512
    bf16: bool = True
    num_layers_per_virtual_pipeline_stage: int | None = None

    def check(self, cfg: ModelConfig) -> None:
        """Reject layouts the model cannot be split into (ValueError with one line)."""
        if min(self.tp, self.pp, self.ep, self.dp, self.micro_batch_size) < 1:
            raise ValueError("parallel sizes and the micro-batch size must be at least 1")
        if self.data_parallel_sharding not in SHARDING_MODES:
            raise ValueError(f"data_parallel_sharding must be one of {SHARDING_MODES}")
        if self.recompute_granularity not in RECOMPUTE_MODES:
            raise ValueError(f"recompute_granularity must be one of {RECOMPUTE_MODES}")
        if cfg.num_attention_heads % self.tp:
            raise ValueError(f"TP {self.tp} does not divide {cfg.num_attention_heads} heads")
        if cfg.num_layers % self.pp:
            raise ValueError(f"PP {self.pp} does not divide {cfg.num_layers} layers")
        if self.dp % self.ep:
            raise ValueError(f"EP {self.ep} must divide DP {self.dp} (experts are carved out of DP)")
        if self.ep > 1 and cfg.num_experts % self.ep:
            raise ValueError(f"EP {self.ep} does not divide {cfg.num_experts} experts")
        v = self.num_layers_per_virtual_pipeline_stage
        if v is not None and (v < 1 or (cfg.num_layers // self.pp) % v):
            raise ValueError(f"{v} layers per virtual stage do not divide the "
                             f"{cfg.num_layers // self.pp} layers of a pipeline stage")


@dataclass
class RankParams:
    """Parameter elements one rank holds before data-parallel sharding."""

    dense: int  # sharded over the whole DP group
    expert: int  # sharded over the expert-data-parallel group (DP / EP)

    @property
    def total(self) -> int:
        return self.dense + self.expert


@dataclass
class RankMemory:
    """Bytes one GPU holds; `activations` is an estimate, the rest exact (see module docstring)."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def _chunk(n: int, parts: int, index: int) -> int:
    """Length of piece `index` of n cut like torch.chunk: ceil-sized pieces, the last shorter."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def _tp_split_dim(name: str) -> int | None:
    """The dimension TP splits a non-expert parameter on; None when it is replicated."""
    if name in ("embedding.word_emb.weight", "lm_head.weight"):
        return 0
    if not name.startswith("layers."):
        return None
    module, kind = name.split(".")[-2:]
    if module in ("qkv", "fc1"):
        return 0
    if module in ("proj", "fc2") and kind == "weight":
        return 1
    return None


def layer_stage(layer: int, cfg: ModelConfig, layout: Layout) -> int:
    """Pipeline stage of layer `layer` (0-based): contiguous, or round-robin chunks of
    `num_layers_per_virtual_pipeline_stage` layers when interleaved."""
    per_chunk = layout.num_layers_per_virtual_pipeline_stage or cfg.num_layers // layout.pp
    return (layer // per_chunk) % layout.pp


def _stage_of(name: str, cfg: ModelConfig, layout: Layout) -> int:
    top = name.split(".")[0]
    if top == "layers":
        return layer_stage(int(name.split(".")[1]), cfg, layout)
    if top == "embedding":
        return 0
    if top in ("final_norm", "lm_head"):
        return layout.pp - 1
    raise ValueError(f"memory model: no placement rule for parameter {name}")


@dataclass(frozen=True)
class RankCoordinates:
    """Where one rank sits in the process mesh (pp, edp, ep, tp), tensor parallel innermost
    (megatron_m6/parallel/mesh.py); `dp` is its index in the flattened (edp, ep) dimension."""

    pp: int = 0
    edp: int = 0
    ep: int = 0
    tp: int = 0

    def dp(self, layout: Layout) -> int:
        return self.edp * layout.ep + self.ep


def rank_coordinates(layout: Layout, rank: int) -> RankCoordinates:
    """The mesh coordinates of global rank `rank`: row-major over (pp, edp, ep, tp)."""
    if not 0 <= rank < layout.pp * layout.dp * layout.tp:
        raise ValueError(f"rank {rank} is outside a job of {layout.pp * layout.dp * layout.tp} ranks")
    rest, tp = divmod(rank, layout.tp)
    rest, ep = divmod(rest, layout.ep)
    pp, edp = divmod(rest, layout.dp // layout.ep)
    return RankCoordinates(pp, edp, ep, tp)


def rank_param_shapes(cfg: ModelConfig, layout: Layout, coords: RankCoordinates,
                      dp_sharded: bool = False) -> dict[str, tuple[int, ...]]:
    """Local shape of every parameter the rank at `coords` holds, by its name in M6 (a tied head
    is `embedding.word_emb.weight`, on the last stage too), from the real module shapes.

    Before data-parallel sharding (`dp_sharded` False): the placement rules of the module
    docstring. With `dp_sharded`, as FSDP2 holds them under the `optimizer` and `full` modes: each
    parameter's tensor/expert-parallel piece cut again on dimension 0 like torch.chunk, over the
    data-parallel group (expert parameters over the expert-data-parallel group)."""
    layout.check(cfg)
    with torch.device("meta"):
        model = M6(cfg)
    tied = not cfg.untie_embeddings_and_output_weights
    fsdp = dp_sharded and layout.data_parallel_sharding != "replicate" and layout.dp > 1
    shapes = {}
    for name, p in model.named_parameters():  # a tied head weight is listed once, as word_emb
        stages = {_stage_of(name, cfg, layout)}
        if tied and name == "embedding.word_emb.weight":
            stages.add(layout.pp - 1)
        if coords.pp not in stages:
            continue
        shape = list(p.shape)
        expert = ".experts." in name
        if expert:
            shape[0] = _chunk(shape[0], layout.ep, coords.ep)
        elif (dim := _tp_split_dim(name)) is not None:
            shape[dim] = _chunk(shape[dim], layout.tp, coords.tp)
        if fsdp:
            shards, index = ((layout.dp // layout.ep, coords.edp) if expert
                             else (layout.dp, coords.dp(layout)))
            shape[0] = _chunk(shape[0], shards, index)
        shapes[name] = tuple(shape)
    return shapes


def count_params(shapes: dict[str, tuple[int, ...]]) -> RankParams:
    """(dense, expert) elements of the parameters `shapes` describes."""
    dense = sum(math.prod(s) for n, s in shapes.items() if ".experts." not in n)
    return RankParams(dense, sum(math.prod(s) for n, s in shapes.items() if ".experts." in n))


def rank_param_counts(cfg: ModelConfig, layout: Layout, stage: int, tp_rank: int = 0,
                      ep_rank: int = 0) -> RankParams:
    """Parameter elements on the rank at (stage, tp_rank, ep_rank), from the real module shapes."""
    return count_params(rank_param_shapes(cfg, layout, RankCoordinates(pp=stage, ep=ep_rank, tp=tp_rank)))


def state_bytes(counts: RankParams, layout: Layout) -> tuple[int, int, int]:
    """(params, grads, optimizer) bytes of one rank holding `counts` under the layout's sharding."""
    mode = layout.data_parallel_sharding
    edp = layout.dp // layout.ep

    def elements(shard: bool) -> int:
        if not shard:
            return counts.total
        return -(-counts.dense // layout.dp) + -(-counts.expert // edp)

    param_bytes, optimizer_bytes = (2, 12) if layout.bf16 else (4, 8)
    return (param_bytes * elements(mode == "full"), 4 * elements(mode == "full"),
            optimizer_bytes * elements(mode != "replicate"))


def layer_activation_bytes(cfg: ModelConfig, layout: Layout, layer: int) -> int:
    """Estimated bytes one micro-batch leaves saved for backward in transformer layer `layer`."""
    s, b, h, a = layout.seq_length, layout.micro_batch_size, cfg.hidden_size, cfg.num_attention_heads
    t = layout.tp
    e = 2 if layout.bf16 else 4  # element size; dropout masks are 1 byte
    sbh = s * b * h
    sp = layout.sequence_parallel and t > 1
    if layout.recompute_granularity == "full":
        return e * sbh // (t if sp else 1)  # only the layer input is kept
    # Two norm inputs, the qkv input, the attention dropout mask: replicated across TP without SP.
    replicated = 3 * e * sbh + sbh
    # Q, K, V and the projection's input; softmax output, its dropout mask and output.
    split = 4 * e * sbh
    if layout.recompute_granularity != "selective":
        split += (2 * e + 1) * a * s * s * b
    moe = 0
    if cfg.is_moe_layer(layer + 1):
        # Router input and fp32 probabilities; per pick: the permuted token, the GELU and w2
        # inputs, the expert output kept for the gated combine. Experts are replicated across TP
        # and every TP rank routes the whole (gathered) sequence, so TP never splits these.
        picks = cfg.moe_router_topk * (cfg.moe_capacity_factor or 1.0)
        f = cfg.expert_ffn_hidden_size
        moe = e * sbh + 4 * s * b * cfg.num_experts + int(picks * (2 * e * sbh + 2 * e * s * b * f))
        replicated += sbh  # dropout mask
    else:
        replicated += e * sbh + sbh  # fc1 input, dropout mask
        split += 2 * e * s * b * cfg.ffn_hidden_size  # GELU and fc2 inputs
    return moe + ((replicated + split) // t if sp else replicated + split // t)


def _image_encoder_activation_bytes(cfg: ModelConfig, images: int, bf16: bool) -> int:
    """Bytes the ResNet saves for backward on `images` images, measured on the meta device
    (parameters excluded; outputs shared by in-place ReLUs counted twice: an upper bound)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device("meta"):
        encoder = ResNetFeatures(cfg.resnet_layers, cfg.resnet_bottleneck, cfg.resnet_width).to(dtype)
        x = torch.empty(images, 3, cfg.image_size, cfg.image_size, dtype=dtype)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(x)
    return sum(saved)


def in_flight_micro_batches(pp: int, stage: int, chunks: int) -> list[int]:
    """Micro-batches whose activations each model chunk of `stage` holds at the peak of 1F1B:
    pp - stage without interleaving; with it, the warm-up forwards of Megatron's interleaved
    schedule, which run pp micro-batches through chunk 0, then chunk 1, and so on."""
    if chunks == 1:
        return [pp - stage]
    warmup = 2 * (pp - stage - 1) + (chunks - 1) * pp + 1
    groups, rest = divmod(warmup, chunks * pp)
    return [groups * pp + min(pp, max(0, rest - c * pp)) for c in range(chunks)]


def activation_bytes(cfg: ModelConfig, layout: Layout, stage: int) -> int:
    """Estimated activation bytes of pipeline stage `stage` at the peak of a 1F1B step."""
    layout.check(cfg)
    pp, s, b = layout.pp, layout.seq_length, layout.micro_batch_size
    e = 2 if layout.bf16 else 4
    per_chunk = layout.num_layers_per_virtual_pipeline_stage or cfg.num_layers // pp
    chunks = cfg.num_layers // pp // per_chunk
    in_flight = in_flight_micro_batches(pp, stage, chunks)
    total = 0
    for c, n in enumerate(in_flight):
        first = (c * pp + stage) * per_chunk
        total += n * sum(layer_activation_bytes(cfg, layout, i) for i in range(first, first + per_chunk))
    if layout.recompute_granularity == "full":  # one layer rebuilt in full during backward
        total += layer_activation_bytes(cfg, replace(layout, recompute_granularity=None),
                                        stage * per_chunk)
    if stage == 0:
        total += in_flight[0] * _image_encoder_activation_bytes(cfg, b, layout.bf16)
    if stage == pp - 1:  # one micro-batch: head input, logits and fp32 log-softmax (vocab-parallel)
        total += e * s * b * cfg.hidden_size + (e + 4) * s * b * cfg.vocab_size // layout.tp
    return total


def estimate_rank_memory(cfg: ModelConfig, layout: Layout, rank_stage: int | None = None,
                         tp_rank: int = 0, ep_rank: int = 0) -> RankMemory:
    """Bytes on the rank at (`rank_stage`, `tp_rank`, `ep_rank`); by default the largest one
    (TP and EP rank 0) of the stage that needs the most."""
    stages = range(layout.pp) if rank_stage is None else [rank_stage]
    estimates = []
    for stage in stages:
        params, grads, optimizer = state_bytes(rank_param_counts(cfg, layout, stage, tp_rank, ep_rank), layout)
        estimates.append(RankMemory(params, grads, optimizer, activation_bytes(cfg, layout, stage)))
    return max(estimates, key=lambda m: m.total)
