"""Train the VQ-VAE image tokenizer (megatron_m6/vision/vq.py) on images.

    python tools/train_image_tokenizer.py --data data/indexed/pairs_text_image --preset vq-sample \
        --train-iters 2000 --save checkpoints/vq --tensorboard-dir runs/vq
    torchrun --nproc-per-node 8 tools/train_image_tokenizer.py --data /data/images/ --preset vq-f8-8192 ...

--data is the image-text indexed dataset tools/preprocess_data.py builds (every image item), or
a folder of images (.jpg/.jpeg/.png/.webp, recursively; an unreadable one is skipped and counted).
Under torchrun each rank takes its share of every batch (gloo on CPU, NCCL on GPUs); the codebook
is kept equal on every rank by the quantizer itself, and checked at each save. The log and
TensorBoard get the losses, the codebook usage (distinct codes in the batch) and perplexity, and
TensorBoard every --log-interval a grid of inputs over their reconstructions. --save writes
SAVE/tokenizer.pt (weights, codebook, optimizer, iteration, config, RNG state) atomically; --load
resumes exactly.

The loss is the reconstruction's mean squared error plus the commitment term. For real images,
where that alone gives blurry textures, --adversarial-weight and --perceptual-weight (both 0, off,
by default) add a PatchGAN discriminator trained from scratch beside the tokenizer (hinge loss) and
a feature-matching distance in its activations, which stands in for LPIPS: LPIPS needs VGG weights,
and nothing here is downloaded. They start after --discriminator-start steps, once reconstructions
are worth judging, as VQGAN does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.data.indexed import IMAGE_MODE, IndexedDataset, dataset_exists  # noqa: E402
from megatron_m6.vision import VQ_PRESETS, VQVAE, VQConfig, codebook_usage, image_tensor  # noqa: E402
from megatron_m6.vision.vq import (  # noqa: E402
    TOKENIZER_FILE,
    PatchDiscriminator,
    discriminator_loss,
    generator_terms,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
GAN_TERMS = ("adversarial_loss", "perceptual_loss", "discriminator_loss")


class ImageSource:
    """The images of an indexed dataset or a folder, as encoded bytes by index."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            self.files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                                if f.lower().endswith(IMAGE_SUFFIXES))
            self.dataset, self.items = None, None
        elif dataset_exists(path):
            self.files, self.dataset = None, IndexedDataset(path)
            modes = self.dataset.sequence_modes
            self.items = np.flatnonzero(modes == IMAGE_MODE) if modes is not None else np.zeros(0, np.int64)
        else:
            raise FileNotFoundError(f"--data {path} is neither a folder of images nor an indexed dataset")
        if not len(self):
            raise ValueError(f"--data {path} holds no image")

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.items)

    def __getitem__(self, i: int) -> bytes:
        if self.files is not None:
            with open(self.files[i], "rb") as f:
                return f.read()
        return self.dataset.image_bytes(int(self.items[i]))


def batches(source: ImageSource, size: int, batch: int, rank: int, world: int, seed: int, start: int,
            skipped: list[int]):
    """This rank's share of each global batch, epoch after epoch over a seeded shuffle; batch
    `start` first (a resume). An unusable image is replaced by the next one and counted."""
    per_rank = batch // world
    step = start
    while True:
        order = np.random.default_rng([seed, step * batch // len(source)]).permutation(len(source))
        first = (step * batch) % len(source)
        picks = [order[(first + rank * per_rank + j) % len(source)] for j in range(per_rank)]
        images = []
        for i in picks:
            for k in range(len(source)):
                t = image_tensor(source[(i + k) % len(source)], size)
                if t is not None:
                    break
                skipped[0] += 1
            else:
                raise ValueError("no image of --data could be read")
            images.append(t)
        yield torch.stack(images)
        step += 1


def save(model: torch.nn.Module, opt: torch.optim.Optimizer, iteration: int, cfg: VQConfig, folder: str,
         discriminator: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, TOKENIZER_FILE)
    # The RNG state too: dead-code restarts draw their rows from it, so a resume is exact.
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": iteration,
             "config": dataclasses.asdict(cfg), "rng": torch.get_rng_state()}
    if discriminator is not None:
        state["discriminator"], state["discriminator_optimizer"] = (x.state_dict() for x in discriminator)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _check_same_codebook(model: VQVAE) -> None:
    if dist.is_initialized():
        mine = model.quantizer.codebook.clone()
        theirs = mine.clone()
        dist.broadcast(theirs, 0)
        diverged = torch.tensor(float((mine != theirs).any()), device=mine.device)
        dist.all_reduce(diverged)
        if diverged.item():
            raise RuntimeError("the codebook differs between ranks (a bug: the quantizer all-reduces its updates)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data", required=True, help="an image-text indexed dataset prefix, or a folder of images")
    p.add_argument("--preset", choices=VQ_PRESETS, default="vq-sample")
    p.add_argument("--image-size", type=int, help="override the preset's")
    p.add_argument("--codebook-size", type=int, help="override the preset's")
    p.add_argument("--channels", type=int, help="override the preset's first-stage width")
    p.add_argument("--code-dim", type=int, help="override the preset's")
    p.add_argument("--downsample", type=int, help="override the preset's (codes per side = image size / this)")
    p.add_argument("--ema-decay", type=float, help="override the preset's (lower: faster codebook, earlier restarts)")
    p.add_argument("--train-iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32, help="global, split over the ranks")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--save", help="folder for tokenizer.pt")
    p.add_argument("--save-interval", type=int, default=500)
    p.add_argument("--load", help="resume from this folder's tokenizer.pt")
    p.add_argument("--tensorboard-dir")
    p.add_argument("--adversarial-weight", type=float, default=0.0,
                   help="weight of the PatchGAN generator loss (0: off; real images: about 0.1)")
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="weight of the discriminator feature-matching distance, LPIPS's stand-in (0: off)")
    p.add_argument("--discriminator-start", type=int, default=0, help="steps before the two terms begin")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        overrides = {k: getattr(a, k) for k in ("image_size", "codebook_size", "channels", "code_dim", "downsample",
                                                "ema_decay") if getattr(a, k) is not None}
        cfg = dataclasses.replace(VQ_PRESETS[a.preset], **overrides)
        cfg.validate()
        if a.batch_size % world:
            raise ValueError(f"--batch-size {a.batch_size} does not split over {world} ranks")
        source = ImageSource(a.data)
        train(a, cfg, source, rank, world, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(a: argparse.Namespace, cfg: VQConfig, source: ImageSource, rank: int, world: int, device: str) -> None:
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    model = VQVAE(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    gan = None  # (discriminator, its optimizer) with the adversarial or perceptual term
    if a.adversarial_weight or a.perceptual_weight:
        disc = PatchDiscriminator().to(device)
        gan = disc, torch.optim.Adam(disc.parameters(), lr=a.lr, betas=(0.5, 0.9))
    start = 0
    if a.load:
        state = torch.load(os.path.join(a.load, TOKENIZER_FILE), map_location=device, weights_only=True)
        if state["config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{a.load} holds a tokenizer of another configuration: {state['config']}")
        if (gan is None) != ("discriminator" not in state):
            raise ValueError(f"{a.load} was trained {'with' if gan is None else 'without'} the discriminator "
                             "terms: resume it with the same --adversarial-weight/--perceptual-weight")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if gan is not None:
            gan[0].load_state_dict(state["discriminator"])
            gan[1].load_state_dict(state["discriminator_optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        start = state["iteration"]
    wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, broadcast_buffers=False) if world > 1 else m  # noqa: E731
    ddp = wrap(model)
    ddp_disc = wrap(gan[0]) if gan is not None else None
    writer = None
    if a.tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(a.tensorboard_dir)
    if rank == 0:
        print(f"VQ-VAE {cfg} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(source)} images, {world} rank(s) on {device}", flush=True)
    skipped = [0]
    data = batches(source, cfg.image_size, a.batch_size, rank, world, a.seed, start, skipped)
    t0 = time.perf_counter()
    for iteration in range(start + 1, a.train_iters + 1):
        images = next(data).to(device)
        out = ddp(images)
        loss, judged = out["loss"], gan is not None and iteration > a.discriminator_start
        if judged:
            out["adversarial_loss"], out["perceptual_loss"] = generator_terms(ddp_disc, images, out["recon"])
            loss = loss + a.adversarial_weight * out["adversarial_loss"] + a.perceptual_weight * out["perceptual_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if judged:
            out["discriminator_loss"] = discriminator_loss(ddp_disc, images, out["recon"])
            gan[1].zero_grad(set_to_none=True)
            out["discriminator_loss"].backward()
            gan[1].step()
        if iteration % a.log_interval == 0 or iteration == a.train_iters:
            used, perplexity = codebook_usage(out["codes"], cfg.codebook_size)
            if rank == 0:
                rate = (iteration - start) * a.batch_size / (time.perf_counter() - t0)
                gan_terms = "".join(f" | {name.removesuffix('_loss')} {out[name].item():.4f}" for name in GAN_TERMS
                                    if name in out)
                print(f"iteration {iteration:6d}/{a.train_iters} | loss {out['loss'].item():.4f} | reconstruction "
                      f"{out['reconstruction_loss'].item():.4f} | commitment {out['commitment_loss'].item():.4f}"
                      f"{gan_terms} | codes used {used}/{cfg.codebook_size} | perplexity {perplexity:.1f} | "
                      f"{rate:.1f} images/s | skipped images {skipped[0]}", flush=True)
            if writer:
                for name in ("loss", "reconstruction_loss", "commitment_loss", *GAN_TERMS):
                    if name in out:
                        writer.add_scalar(f"vq/{name}", out[name].item(), iteration)
                writer.add_scalar("vq/codes_used", used, iteration)
                writer.add_scalar("vq/perplexity", perplexity, iteration)
                grid = torch.cat([images[:8], out["recon"][:8].detach().clamp(-1, 1)])
                writer.add_images("vq/inputs_over_reconstructions", (grid + 1) / 2, iteration)
        if a.save and (iteration % a.save_interval == 0 or iteration == a.train_iters):
            _check_same_codebook(model)
            if rank == 0:
                save(model, opt, iteration, cfg, a.save, gan)
    if writer:
        writer.close()


if __name__ == "__main__":
    main()
