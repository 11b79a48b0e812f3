"""A convolutional VQ-VAE: the image tokenizer of text-to-image generation (M6, CogView, OFA).

An encoder downsamples an image by `downsample` (8 or 16) into a grid of `code_dim` vectors; the
quantizer replaces each vector by its nearest codebook entry (its index is the image token); a
decoder maps the grid back to pixels. The codebook is learnt by exponential moving averages of
the vectors assigned to each code (van den Oord et al., 2017, appendix), not by gradients, and
two measures keep it from collapsing onto a few codes: it starts from encoder outputs of the
first batch instead of noise, and a code unused for a while (its EMA count below
`dead_code_threshold`) restarts at a random encoder output of the current batch. Under data
parallelism the EMA statistics and the restart vectors are all-reduced, so every rank keeps the
same codebook.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    """Sizes of the image tokenizer; `grid` = image_size / downsample codes per side."""

    image_size: int = 96
    downsample: int = 8
    codebook_size: int = 512
    code_dim: int = 64
    channels: int = 64  # the first stage's width; it doubles at each downsampling
    ema_decay: float = 0.99
    commitment: float = 0.25  # weight of ||encoder output - its code||^2 in the loss
    dead_code_threshold: float = 1.0  # EMA count under which a code restarts

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def validate(self) -> None:
        stages = math.log2(self.downsample)
        if stages != int(stages) or stages < 1:
            raise ValueError(f"downsample must be a power of 2 >= 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of downsample {self.downsample}")
        if self.codebook_size < 2 or not 0 < self.ema_decay < 1:
            raise ValueError("need codebook_size >= 2 and 0 < ema_decay < 1")


# The sample data (96 px shapes, 12x12 codes; narrow and quick to adapt, so that a CPU trains it in
# minutes: 1000 steps of 16 images keep colour and position of every held-out scene, PERFORMANCE.md)
# and real images (256 px; CogView's f8 8192, f16 16384).
VQ_PRESETS = {
    "vq-sample": VQConfig(channels=16, code_dim=32, ema_decay=0.9),
    "vq-f8-8192": VQConfig(image_size=256, downsample=8, codebook_size=8192, code_dim=256, channels=128),
    "vq-f16-16384": VQConfig(image_size=256, downsample=16, codebook_size=16384, code_dim=256, channels=128),
}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _from_rank_0(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, 0)
    return t


class EMAQuantizer(nn.Module):
    """Nearest-codebook quantization with EMA updates, data-dependent start and dead-code restarts."""

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, dead_code_threshold: float = 1.0,
                 eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        self.register_buffer("codebook", torch.zeros(codebook_size, dim))
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", torch.zeros(codebook_size, dim))
        self.register_buffer("initialized", torch.tensor(False))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance) of each row of z."""
        distances = (z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t()
                     + self.codebook.pow(2).sum(1)[None])
        return distances.argmin(1)

    def _random_rows(self, z: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of z drawn at random (with replacement if z has fewer), rank 0's on every rank."""
        picked = z[torch.randint(len(z), (n,), device=z.device)] if len(z) < n else \
            z[torch.randperm(len(z), device=z.device)[:n]]
        return _from_rank_0(picked.clone())

    def _fresh_count(self, z: torch.Tensor) -> float:
        """The EMA count a new code starts with: a fair share of a batch's rows, so that a code
        restarts only after about ln(share / threshold) / (1 - decay) steps without rows."""
        return max(len(z) / len(self.codebook), 2 * self.dead_code_threshold)

    def _restart(self, z: torch.Tensor, which: torch.Tensor) -> None:
        fresh = self._random_rows(z, int(which.sum()))
        self.codebook[which] = fresh
        self.ema_count[which] = self._fresh_count(z)
        self.ema_sum[which] = fresh * self._fresh_count(z)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        if not bool(self.initialized):
            self._restart(z, torch.ones(len(self.codebook), dtype=torch.bool, device=z.device))
            self.initialized.fill_(True)
            codes = self.codes(z)
        one_hot = F.one_hot(codes, len(self.codebook)).type_as(z)
        count, total = _all_reduce_mean(one_hot.sum(0)), _all_reduce_mean(one_hot.t() @ z)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + len(self.codebook) * self.eps) * n  # Laplace
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_code_threshold
        if dead.any():
            self._restart(z, dead)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [N, dim] -> (quantized z with the straight-through gradient, codes [N]); in
        training, the codebook then moves towards the rows assigned to each code."""
        codes = self.codes(z.detach())
        if self.training:
            self._update(z.detach(), codes)
            codes = self.codes(z.detach())
        quantized = self.codebook[codes]
        return z + (quantized - z).detach(), codes


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _widths(cfg: VQConfig) -> list[int]:
    return [cfg.channels * 2 ** i for i in range(int(math.log2(cfg.downsample)) + 1)]


class Encoder(nn.Sequential):
    """Stride-2 convolutions, each followed by a ResBlock at the lower resolution: no ResBlock at
    full resolution, where it would cost most of the network's compute (4x the next stage's)."""

    def __init__(self, cfg: VQConfig):
        widths = _widths(cfg)
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), ResBlock(b)]
        layers += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], cfg.code_dim, 1)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """The encoder mirrored: a ResBlock, then a transposed stride-2 convolution, per stage."""

    def __init__(self, cfg: VQConfig):
        widths = _widths(cfg)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[0], 3, padding=1)]
        for a, b in zip(widths, widths[1:]):
            layers += [ResBlock(a), nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
        layers += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 3, 3, padding=1)]
        super().__init__(*layers)


class VQVAE(nn.Module):
    """Images in [-1, 1], [B, 3, H, W] <-> codes [B, grid, grid]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = EMAQuantizer(cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.dead_code_threshold)

    def _grid_rows(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        z = self.encoder(images)  # [B, D, g, g]
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), (z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        rows, (b, h, w) = self._grid_rows(images)
        return self.quantizer.codes(rows).reshape(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.quantizer.codebook[codes].permute(0, 3, 1, 2)
        return self.decoder(z)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction, its loss (MSE plus the commitment term), and the codes."""
        rows, (b, h, w) = self._grid_rows(images)
        quantized, codes = self.quantizer(rows)
        recon = self.decoder(quantized.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        reconstruction = F.mse_loss(recon, images)
        commitment = F.mse_loss(rows, self.quantizer.codebook[codes].detach())
        return {"recon": recon, "codes": codes.reshape(b, h, w), "reconstruction_loss": reconstruction,
                "commitment_loss": commitment, "loss": reconstruction + self.cfg.commitment * commitment}


class PatchDiscriminator(nn.Module):
    """A PatchGAN (pix2pix's, as VQGAN trains beside its tokenizer): one real/fake logit per
    overlapping patch, trained from scratch with the tokenizer, so it needs no download. Its hidden
    activations also give the perceptual term, a feature-matching distance (pix2pixHD's) standing
    in for LPIPS, whose VGG weights cannot be downloaded."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks, width = [nn.Sequential(nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2))], channels
        for _ in range(layers - 1):
            blocks.append(nn.Sequential(nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width),
                                        nn.LeakyReLU(0.2)))
            width *= 2
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, 1, 3, 1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch logits [B, 1, h, w] and every block's activations."""
        features, x = [], images
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.head(x), features


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake)), one forward of both (so a
    DistributedDataParallel discriminator runs once per backward)."""
    logits, _ = discriminator(torch.cat([real, fake.detach()]))
    real_logits, fake_logits = logits.chunk(2)
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_terms(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """(adversarial, perceptual) terms of the tokenizer's loss: -mean D(fake), the hinge GAN's
    generator loss, and the mean L1 distance of the discriminator's activations of the
    reconstruction from those of the input (which get no gradient)."""
    logits, features = discriminator(torch.cat([real, fake]))
    perceptual = sum(F.l1_loss(f.chunk(2)[1], f.chunk(2)[0].detach()) for f in features) / len(features)
    return -logits.chunk(2)[1].mean(), perceptual


TOKENIZER_FILE = "tokenizer.pt"  # what tools/train_image_tokenizer.py saves in its --save folder


class ImageTokenizerError(ValueError):
    """An image tokenizer checkpoint that is missing, unreadable, or not the one data was made with."""


@dataclass(frozen=True)
class ImageTokenizerInfo:
    """What an image-code dataset or a model must agree on with its tokenizer: the codebook size,
    the grid (codes per side), the image size, and a digest of the codebook and decoder weights, so
    codes are never decoded by another tokenizer of the same shape."""

    codebook_size: int
    grid: int
    image_size: int
    sha256: str

    def mismatch(self, other: ImageTokenizerInfo) -> str | None:
        """None when the two agree, else a phrase saying how they differ."""
        for name in ("codebook_size", "grid", "image_size", "sha256"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} {theirs} where {mine} was expected"
        return None


def tokenizer_info(model: VQVAE) -> ImageTokenizerInfo:
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if name.startswith(("quantizer.codebook", "decoder.")):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    cfg = model.cfg
    return ImageTokenizerInfo(cfg.codebook_size, cfg.grid, cfg.image_size, digest.hexdigest())


def tokenizer_path(path: str) -> str:
    """The checkpoint file of `path`: tools/train_image_tokenizer.py's --save folder, or the file."""
    return os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path


def load_image_tokenizer(path: str, device: str | torch.device = "cpu") -> VQVAE:
    """A trained tokenizer (a --save folder or its tokenizer.pt), in eval mode; one clear error
    for a missing or unreadable checkpoint."""
    file = tokenizer_path(path)
    if not os.path.isfile(file):
        raise ImageTokenizerError(f"image tokenizer {path} not found (train one with tools/train_image_tokenizer.py)")
    try:
        state = torch.load(file, map_location=device, weights_only=True)
        model = VQVAE(VQConfig(**state["config"])).to(device)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, OSError) as e:
        raise ImageTokenizerError(f"image tokenizer {file} cannot be read ({type(e).__name__}: {e})") from None
    return model.eval()


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> tuple[int, float]:
    """(distinct codes used, perplexity exp(entropy) of their frequencies) of a batch of codes."""
    freq = torch.bincount(codes.reshape(-1), minlength=codebook_size).double()
    p = freq[freq > 0] / freq.sum()
    return int((freq > 0).sum()), float(torch.exp(-(p * p.log()).sum()))
