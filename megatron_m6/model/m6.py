"""M6: one transformer over image patches and text tokens (Lin et al., 2021).

A sample is one sequence: [IMG] placeholders (replaced by ResNet patch features when the sample
has an image), then the source text, then the target text. The prefix (image + source) attends
bidirectionally, the target causally (see attention.py): a unified encoder-decoder through the
attention mask. The loss is cross entropy on target tokens only.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from megatron_m6.config import ModelConfig
from megatron_m6.model.attention import attention
from megatron_m6.model.moe import GroupedExperts, MoEMLP
from megatron_m6.model.resnet import ResNetFeatures
from megatron_m6.precision import LayerNorm, fp32_or_wider

IMAGE, SOURCE, TARGET = 0, 1, 2  # modality (segment) ids


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len`."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of x [B, H, S, D] at integer positions [B, S]."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, positions, prefix_len, valid_len, cache=None, layer=0, start=0):
        B, S, _ = x.shape
        # Heads-major [.., heads, 3, head_dim] layout: splitting qkv's output features over
        # tensor-parallel ranks gives each rank whole heads, so "-1 heads" is the local count.
        q, k, v = self.qkv(x).view(B, S, -1, 3, self.cfg.head_dim).permute(3, 0, 2, 1, 4)
        if self.cfg.position_embedding_type == "rope":
            q = rotary(q, positions, self.cfg.rotary_base)
            k = rotary(k, positions, self.cfg.rotary_base)
        if cache is not None:
            cache.k[layer][:, :, start:start + S] = k
            cache.v[layer][:, :, start:start + S] = v
            k, v = cache.k[layer][:, :, :start + S], cache.v[layer][:, :, :start + S]
        dropout = self.cfg.attention_dropout if self.training else 0.0
        out = attention(q, k, v, prefix_len, valid_len, q_start=start, dropout_p=dropout,
                        backend=self.cfg.attention_backend)
        return self.proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


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

    def forward(self, x, positions, prefix_len, valid_len, cache=None, start=0):
        x = x + self.dropout(self.attn(self.input_norm(x), positions, prefix_len, valid_len,
                                       cache, self.layer_number - 1, start))
        out = self.mlp(self.mlp_norm(x))
        out, aux = out if isinstance(out, tuple) else (out, x.new_zeros(()))
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
        self.modality_emb = nn.Embedding(3, h)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens, images, has_image, prefix_len, start=0):
        """Image placeholders (the first P tokens of image samples) get the patch features."""
        B, S = tokens.shape
        P = self.cfg.num_image_tokens
        seq = torch.arange(start, start + S, device=tokens.device).expand(B, S)
        is_image = seq < has_image.long()[:, None] * P
        positions = text_positions(has_image, S, P, start)
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
                cache: KVCache | None = None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, S, vocab] and the summed MoE auxiliary loss.

        With a KV cache, `tokens` are the positions start..start+S-1 of the sequence.
        """
        if has_image is None:
            has_image = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        x, positions = self.embedding(tokens, images, has_image, prefix_len, start)
        aux_total = torch.zeros((), dtype=torch.float32, device=tokens.device)
        for layer in self.layers.values():
            x, aux = layer(x, positions, prefix_len, valid_len, cache, start)
            aux_total = aux_total + aux
        return self.lm_head(self.final_norm(x)), aux_total


def local_indices(p: torch.Tensor) -> list[slice | torch.Tensor]:
    """For each dimension of `p`, the global indices this rank holds: a slice where they are
    contiguous (all of them for a plain tensor, and every placement this repository makes), else
    an index tensor. For a DTensor, they are what its placements give this rank's mesh
    coordinates (Shard, Replicate, and the _StridedShard FSDP puts over a dimension that tensor
    or expert parallelism already split). Sharding one dimension does not depend on the others,
    so each is worked out on its own, by laying out a 1-D index vector like that dimension."""
    if not isinstance(p, DTensor):
        return [slice(0, n) for n in p.shape]
    indices = []
    for dim, n in enumerate(p.shape):
        placements = [_on_first_dim(pl) if getattr(pl, "dim", None) == dim else Replicate()
                      for pl in p.placements]
        index = torch.arange(n, device=p.device_mesh.device_type)
        index = distribute_tensor(index, p.device_mesh, placements, src_data_rank=None).to_local().cpu()
        first = int(index[0]) if len(index) else 0
        contiguous = torch.equal(index, torch.arange(first, first + len(index)))
        indices.append(slice(first, first + len(index)) if contiguous else index)
    return indices


def _on_first_dim(pl):
    """The same sharding of dimension 0 (for the 1-D index vectors of `local_indices`)."""
    return _StridedShard(0, split_factor=pl.split_factor) if isinstance(pl, _StridedShard) else Shard(0)


def _take(t: torch.Tensor, indices: list[slice | torch.Tensor]) -> torch.Tensor:
    """t[indices[0], indices[1], ...] as an outer product: a view for slices, a gathered copy
    along a dimension given by an index tensor."""
    for dim, index in enumerate(indices):
        t = t[(slice(None),) * dim + (index,)] if isinstance(index, slice) else t.index_select(dim, index)
    return t


def init_weights(model: nn.Module, cfg: ModelConfig, seed: int, prefix: str = "") -> None:
    """Initialise `model` (M6, or a pipeline stage holding some of its modules under the same
    names) from each parameter's name and `seed` alone: every layout, and a stage materialised
    from the meta device, starts from the weights of one process.

    GPT-2 style: N(0, std) for linear and embedding weights, N(0, std / sqrt(2 * layers)) for the
    residual output projections (attn.proj, mlp.fc2, experts.w2), zero biases, unit norms; the
    ResNet's convolutions He-initialised (fan-out) as torchvision does. Numbers are drawn on the
    CPU, so they do not depend on the device either. A parameter already sharded (a DTensor)
    receives its slice of the same global tensor. `prefix` names a submodule initialised on its
    own (conversion tools materialise one module at a time).

    What a rank draws: linear and embedding weights and stacked experts [E, ...] are drawn row
    by row (expert by expert), each row from its own generator, so a rank draws exactly the rows
    it holds (at m6-100b one w1 is 512 experts x 4 M = 8.6 GB: drawing it whole on every rank is
    not an option), and of those only the columns it keeps reach its shard: a transient of one
    row at a time. Where a weight is split along its columns (tensor parallel's row-parallel
    proj and fc2), the rank draws whole rows, tp times its shard. Convolutions are drawn whole
    (He's fan-out needs the whole shape; the largest, ResNet-50's, is 2.4M numbers)."""
    std, out_std = cfg.init_method_std, cfg.init_method_std / math.sqrt(2 * cfg.num_layers)
    tied = not cfg.untie_embeddings_and_output_weights

    def draw(key: str, shape, fill) -> torch.Tensor:
        t = torch.empty(shape)
        fill(t, torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode())))
        return t

    assigned: set[int] = set()

    def assign(p: torch.Tensor, key: str, fill, by_row: bool = False) -> None:
        if id(p) in assigned:  # a tied head sharing the embedding's parameter: drawn once
            return
        assigned.add(id(p))
        local = p.to_local() if isinstance(p, DTensor) else p
        indices = local_indices(p)
        if by_row:
            rows = indices[0]
            rows = range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()
            for i, row in enumerate(rows):
                local[i].copy_(_take(draw(f"{key}.{row}", p.shape[1:], fill), indices[1:]))
        else:
            local.copy_(_take(draw(key, p.shape, fill), indices))

    def normal(sd: float):
        return lambda t, g: nn.init.normal_(t, 0.0, sd, generator=g)

    def he(t, g):
        return nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=g)

    with torch.no_grad():
        for name, module in model.named_modules():
            name = name.replace("_checkpoint_wrapped_module.", "")  # recomputation wrappers
            name = ".".join(filter(None, (prefix, name)))
            if isinstance(module, nn.Conv2d):
                assign(module.weight, f"{name}.weight", he)
            elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                residual = name.endswith(("attn.proj", "mlp.fc2"))
                key = "embedding.word_emb" if tied and name.endswith("lm_head") else name
                assign(module.weight, f"{key}.weight", normal(out_std if residual else std), by_row=True)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, GroupedExperts):  # expert by expert: a shard draws its own
                for leaf, sd in (("w1", std), ("w2", out_std)):
                    assign(getattr(module, leaf), f"{name}.{leaf}", normal(sd), by_row=True)
                module.b1.zero_()
                module.b2.zero_()


def materialize(model: nn.Module, cfg: ModelConfig, device: torch.device, seed: int,
                init: bool = True) -> None:
    """Allocate a meta-device M6 (or pipeline stage) on `device` and initialise it; init=False
    only allocates, for weights a checkpoint is about to overwrite. to_empty() gives the two
    ends of the tied embedding separate storage, so the tie is made again. A meta-device target
    (a dry run's layout, see megatron_m6/dry_run.py) is left as it is: nothing to allocate."""
    if device.type == "meta":
        return
    model.to_empty(device=device)
    if not cfg.untie_embeddings_and_output_weights and hasattr(model, "embedding") and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embedding.word_emb.weight
    if init:
        init_weights(model, cfg, seed)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy per position [B, S], in fp32 or wider (vocab-parallel logits under
    loss_parallel)."""
    ce = F.cross_entropy(fp32_or_wider(logits).flatten(0, 1), labels.flatten(), reduction="none")
    if hasattr(ce, "full_tensor"):  # a DTensor from vocab-parallel cross entropy
        ce = ce.full_tensor()
    return ce.view(labels.shape)


def target_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy over target positions (divide by the global target count)."""
    return (token_losses(logits, labels) * loss_mask).sum()
