"""M6: one transformer over image patches and text tokens (Lin et al., 2021).

A sample is one sequence: [IMG] placeholders (replaced by ResNet patch features when the sample
has an image), then the source text, then the target text. The prefix (image + source) attends
bidirectionally, the target causally (see attention.py): a unified encoder-decoder through the
attention mask. The loss is cross entropy on target tokens only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from megatron_m6.config import ModelConfig
from megatron_m6.model.attention import attention
from megatron_m6.model.moe import GroupedExperts, MoEMLP
from megatron_m6.model.resnet import ResNetFeatures
from megatron_m6.precision import LayerNorm, fp32_or_wider

# The segments of a sequence, each with its own modality embedding: image patches, source text,
# target text. A token's modality id is its segment's index.
MODALITIES = ("image", "source", "target")
IMAGE, SOURCE, TARGET = range(len(MODALITIES))


@dataclass
class LayerKV:
    """One layer's keys and values [B, heads, max_len, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len`."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        self.layers = [LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.num_layers)]


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of x [B, H, S, D] at integer positions [B, S]."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v with attention dropout: no parameters, a module of its
    own so that selective recomputation (parallel/recompute.py) wraps exactly this, as Megatron
    does, and not the qkv and output projections around it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
                valid_len: torch.Tensor, q_start: int = 0) -> torch.Tensor:
        dropout = self.cfg.attention_dropout if self.training else 0.0
        return attention(q, k, v, prefix_len, valid_len, q_start=q_start, dropout_p=dropout,
                         backend=self.cfg.attention_backend)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.core = AttentionCore(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, prefix_len: torch.Tensor,
                valid_len: torch.Tensor, cache: LayerKV | None = None, start: int = 0) -> torch.Tensor:
        """Only `x` is positional: a tensor-parallel plan prepares it and passes the rest on."""
        B, S, _ = x.shape
        # Heads-major [.., heads, 3, head_dim] layout: splitting qkv's output features over
        # tensor-parallel ranks gives each rank whole heads, so "-1 heads" is the local count.
        q, k, v = self.qkv(x).view(B, S, -1, 3, self.cfg.head_dim).permute(3, 0, 2, 1, 4)
        if self.cfg.position_embedding_type == "rope":
            q = rotary(q, positions, self.cfg.rotary_base)
            k = rotary(k, positions, self.cfg.rotary_base)
        if cache is not None:
            cache.k[:, :, start:start + S] = k
            cache.v[:, :, start:start + S] = v
            k, v = cache.k[:, :, :start + S], cache.v[:, :, :start + S]
        out = self.core(q, k, v, prefix_len, valid_len, q_start=start)
        return self.proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """GELU MLP. forward(x) -> (y, aux loss) like MoEMLP's; a dense MLP's aux loss is zero."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc2(F.gelu(self.fc1(x)))
        return out, out.new_zeros(())


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the MLP is an MoE on MoE layers."""

    def __init__(self, cfg: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.input_norm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MoEMLP(cfg) if cfg.is_moe_layer(layer_number) else MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, prefix_len: torch.Tensor,
                valid_len: torch.Tensor, cache: LayerKV | None = None,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its MoE auxiliary loss (zero for a dense MLP)."""
        x = x + self.dropout(self.attn(self.input_norm(x), positions=positions, prefix_len=prefix_len,
                                       valid_len=valid_len, cache=cache, start=start))
        out, aux = self.mlp(self.mlp_norm(x))
        return x + self.dropout(out), aux


def text_positions(has_image: torch.Tensor, seq_len: int, num_image_tokens: int,
                   start: int = 0) -> torch.Tensor:
    """Position ids [B, S]: text positions start after the image; image tokens get 0 (they have
    their own 2-D row/column embedding)."""
    seq = torch.arange(start, start + seq_len, device=has_image.device).expand(len(has_image), seq_len)
    return (seq - has_image.long()[:, None] * num_image_tokens).clamp(min=0)


class Embedding(nn.Module):
    """Everything before the first block: image patch tokens, text token, position and modality
    embeddings. Returns the input sequence and the text positions (for rotary embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        # Image tokens: ResNet feature-map cells, projected, plus a learned (row, column) embedding.
        self.image_encoder = ResNetFeatures(cfg.resnet_layers, cfg.resnet_bottleneck, cfg.resnet_width)
        self.patch_proj = nn.Linear(self.image_encoder.out_channels, h)
        self.patch_row_emb = nn.Embedding(cfg.image_grid, h)
        self.patch_col_emb = nn.Embedding(cfg.image_grid, h)
        # Text tokens, positions and the modality (segment) embedding.
        self.word_emb = nn.Embedding(cfg.vocab_size, h)
        if cfg.position_embedding_type == "learned_absolute":
            self.pos_emb = nn.Embedding(cfg.max_position_embeddings, h)
        self.modality_emb = nn.Embedding(len(MODALITIES), h)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens, images, has_image, prefix_len, start=0):
        """Image placeholders (the first num_image_tokens tokens of image samples) get the patch
        features."""
        B, S = tokens.shape
        num_image = self.cfg.num_image_tokens
        seq = torch.arange(start, start + S, device=tokens.device).expand(B, S)
        is_image = seq < has_image.long()[:, None] * num_image
        positions = text_positions(has_image, S, num_image, start)
        modality = torch.where(is_image, IMAGE, torch.where(seq < prefix_len[:, None], SOURCE, TARGET))
        x = self.word_emb(tokens) + self.modality_emb(modality)
        if self.cfg.position_embedding_type == "learned_absolute":
            x = x + self.pos_emb(positions) * (~is_image)[..., None]
        if images is not None and start == 0 and bool(has_image.any()):
            patches = self.image_tokens(images[has_image])[:, :S]
            x = x.masked_scatter(is_image[..., None], patches.to(x.dtype))
        return self.dropout(x), positions

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images -> [N, P, hidden] patch embeddings in raster order."""
        feats = self.image_encoder(images)  # [N, C, g, g]
        g = feats.shape[-1]
        feats = self.patch_proj(feats.flatten(2).transpose(1, 2))  # [N, g*g, h]
        grid = torch.arange(g, device=feats.device)
        pos = self.patch_row_emb(grid)[:, None] + self.patch_col_emb(grid)[None, :]
        return feats + pos.reshape(g * g, -1)


class M6(nn.Module):
    """The whole model, or one pipeline stage of it: a stage is an M6 with the modules it does not
    hold removed (set to None; layers kept under their global index), and forward passes through
    whatever is missing, so parameter names are the same in every layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        # Keyed by global layer number so names stay stable when layers are split across ranks.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i + 1) for i in range(cfg.num_layers)})
        self.final_norm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if not cfg.untie_embeddings_and_output_weights:
            self.lm_head.weight = self.embedding.word_emb.weight
        if self.lm_head.weight.device.type != "meta":  # on meta, the caller initialises later
            init_weights(self, cfg, seed=0)

    def forward(self, tokens: torch.Tensor, prefix_len: torch.Tensor, valid_len: torch.Tensor,
                images: torch.Tensor | None = None, has_image: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int = 0, *, aux: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, S, vocab] and the summed MoE auxiliary loss.

        With a KV cache, `tokens` are the positions start..start+S-1 of the sequence. A stage
        without the embedding takes the previous stage's hidden states as `tokens`, its running
        auxiliary loss as `aux` and the text `positions`; one without the head returns hidden
        states.
        """
        if has_image is None:
            has_image = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        x = tokens
        if self.embedding is not None:
            x, positions = self.embedding(tokens, images, has_image, prefix_len, start)
        if aux is None:
            aux = x.new_zeros(())
        for name, layer in self.layers.items():
            x, layer_aux = layer(x, positions=positions, prefix_len=prefix_len, valid_len=valid_len,
                                 cache=cache.layers[int(name)] if cache is not None else None, start=start)
            aux = aux + layer_aux
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x, aux


# Every drawn tensor (or row) has a generator of its own, seeded from the run's seed and the
# tensor's key alone: seed * INIT_SEED_STRIDE + crc32(key). The stride is a prime above a
# million, so that consecutive run seeds move every key's generator seed far apart.
INIT_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class InitRule:
    """How a parameter's global tensor starts: N(0, `value`), He-normal (fan-out, as torchvision
    initialises ResNets), or the constant `value`. With `by_row`, each row (index along the first
    dimension) is drawn from its own generator, keyed "{key}.{row}", so that whoever holds some
    rows draws only those."""

    kind: Literal["normal", "he", "constant"]
    value: float = 0.0
    by_row: bool = False


def init_rules(named_modules: Iterable[tuple[str, nn.Module]],
               cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor, InitRule]]:
    """(key, tensor, rule) for every parameter and buffer of `named_modules` (M6's, or a part's
    under M6's names), each tensor once: a tied head shares the embedding's key.

    GPT-2 style: N(0, std) for linear and embedding weights, N(0, std / sqrt(2 * layers)) for
    the residual output projections (attn.proj, mlp.fc2, experts.w2), zero biases, unit norms;
    the ResNet's convolutions He-initialised. Linear and embedding weights and stacked experts
    [E, ...] are drawn row by row (expert by expert): at m6-100b one w1 is 512 experts x 4 M =
    8.6 GB, and a rank draws only the rows it holds. Convolutions are drawn whole (He's fan-out
    needs the whole shape; the largest, ResNet-50's, is 2.4M numbers)."""
    std, out_std = cfg.init_method_std, cfg.init_method_std / math.sqrt(2 * cfg.num_layers)
    tied = not cfg.untie_embeddings_and_output_weights
    zeros, ones = InitRule("constant", 0.0), InitRule("constant", 1.0)
    seen: set[int] = set()

    def rules(name: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor, InitRule]]:
        if isinstance(module, nn.Conv2d):
            yield f"{name}.weight", module.weight, InitRule("he")
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            yield f"{name}.weight", module.weight, ones
            yield f"{name}.bias", module.bias, zeros
            if isinstance(module, nn.BatchNorm2d):  # what reset_running_stats() sets
                yield f"{name}.running_mean", module.running_mean, zeros
                yield f"{name}.running_var", module.running_var, ones
                yield f"{name}.num_batches_tracked", module.num_batches_tracked, zeros
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            residual = name.endswith(("attn.proj", "mlp.fc2"))
            key = "embedding.word_emb" if tied and name.endswith("lm_head") else name
            yield f"{key}.weight", module.weight, InitRule("normal", out_std if residual else std, by_row=True)
            if getattr(module, "bias", None) is not None:
                yield f"{name}.bias", module.bias, zeros
        elif isinstance(module, GroupedExperts):
            yield f"{name}.w1", module.w1, InitRule("normal", std, by_row=True)
            yield f"{name}.w2", module.w2, InitRule("normal", out_std, by_row=True)
            yield f"{name}.b1", module.b1, zeros
            yield f"{name}.b2", module.b2, zeros

    for name, module in named_modules:
        for key, t, rule in rules(name, module):
            if id(t) not in seen:
                seen.add(id(t))
                yield key, t, rule


def _take(t: torch.Tensor, indices: Sequence[slice | torch.Tensor]) -> torch.Tensor:
    """t[indices[0], indices[1], ...] as an outer product: a view for slices, a gathered copy
    along a dimension given by an index tensor."""
    for dim, index in enumerate(indices):
        t = t[(slice(None),) * dim + (index,)] if isinstance(index, slice) else t.index_select(dim, index)
    return t


def init_values(out: torch.Tensor, key: str, shape: torch.Size, rule: InitRule, seed: int,
                indices: Sequence[slice | torch.Tensor] | None = None) -> None:
    """Write into `out` the slice of the global tensor `key` (of `shape`, started by `rule`) at
    `indices`: per dimension, the global indices `out` holds (all of them by default). Numbers
    are drawn on the CPU, so they depend on neither the device nor the layout. A by-row rule
    draws only the rows in `indices` and keeps a transient of one row at a time."""
    if rule.kind == "constant":
        out.fill_(rule.value)
        return
    if indices is None:
        indices = [slice(0, n) for n in shape]

    def draw(draw_key: str, draw_shape) -> torch.Tensor:
        t = torch.empty(draw_shape)
        generator = torch.Generator().manual_seed(seed * INIT_SEED_STRIDE + zlib.crc32(draw_key.encode()))
        if rule.kind == "he":
            return nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=generator)
        return nn.init.normal_(t, 0.0, rule.value, generator=generator)

    if rule.by_row:
        rows = indices[0]
        rows = range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()
        for i, row in enumerate(rows):
            out[i].copy_(_take(draw(f"{key}.{row}", shape[1:]), indices[1:]))
    else:
        out.copy_(_take(draw(key, shape), indices))


def init_weights(model: nn.Module, cfg: ModelConfig, seed: int, prefix: str = "") -> None:
    """Initialise `model` (M6, or one of its modules, named `prefix` in M6) from each tensor's
    name and `seed` alone (see init_rules): every layout starts from the weights of one process.
    For a model already sharded over ranks, see megatron_m6/parallel/initialisation.py."""
    with torch.no_grad():
        for key, t, rule in init_rules(model.named_modules(prefix=prefix), cfg):
            init_values(t, key, t.shape, rule, seed)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy per position [B, S], in fp32 or wider."""
    ce = F.cross_entropy(fp32_or_wider(logits).flatten(0, 1), labels.flatten(), reduction="none")
    return ce.view(labels.shape)


def target_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy over target positions (divide by the global target count)."""
    return (token_losses(logits, labels) * loss_mask).sum()
