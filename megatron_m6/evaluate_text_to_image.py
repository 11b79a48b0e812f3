"""Text-to-image evaluation that needs no downloaded network:
`python -m megatron_m6.evaluate --task text_to_image --load T2I --data text_to_image_test.jsonl ...`.

For every prompt of --data (rows {"caption", "image"}, the image a reference drawing; sample-data
rows also name the scene, "cell", "count", "colour", "shape"), N candidates are sampled, decoded and
reranked (megatron_m6/inference/text_to_image.py). Reported:

- attribute accuracy of the kept image (reranked) and of the first candidate (no reranking),
  read by the sample data's drawing rules (data/scene_detector.py): colour, shape, count,
  position, and all four together;
- the image tokenizer's ceiling: reconstruction PSNR of the reference images, the detector's
  accuracy on those reconstructions (generation cannot draw better than its codes can), and the
  codebook usage of the references' codes;
- an in-domain FID (torchmetrics' FrechetInceptionDistance) with M6's own image encoder as the
  feature network (Inception's weights cannot be downloaded): its ResNet's pooled features of the
  references against those of the kept images, the first candidates, and the reconstructions.
  FIDs are comparable with each other under one feature network and set size only.
"""

from __future__ import annotations

import html
import io
import json
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from megatron_m6.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from megatron_m6.data.downstream import DownstreamDataError
from megatron_m6.data.images import load_image_bytes
from megatron_m6.data.sample_data import CELL_NAMES, scene_from_row
from megatron_m6.data.scene_detector import detect_scene, score_attributes
from megatron_m6.inference.generate import SamplingConfig
from megatron_m6.inference.text_to_image import generate_images
from megatron_m6.model import M6
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.vision import VQVAE, codebook_usage
from megatron_m6.vision.pixels import image_tensor, tensor_to_image

ATTRIBUTES = ("colour", "shape", "count", "position", "all")
SCENE_FIELDS = ("cell", "count", "colour", "shape")


def read_prompts(path: str) -> list[dict]:
    """The rows of a text_to_image test jsonl, each with its reference image's bytes."""
    if not os.path.isfile(path):
        raise DownstreamDataError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                caption, image = str(row["caption"]), str(row["image"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DownstreamDataError(f"{path}:{n}: a row is {{\"caption\", \"image\", ...}}") from None
            data, reason = load_image_bytes(image, os.path.dirname(os.path.abspath(path)))
            if data is None:
                raise DownstreamDataError(f"{path}:{n}: its reference image {image} cannot be used ({reason})")
            rows.append({**row, "caption": caption, "image_bytes": data})
    if not rows:
        raise DownstreamDataError(f"{path} has no rows")
    return rows


class EncoderFeatures(nn.Module):
    """Images in [0, 1] -> the pooled last feature map of M6's ResNet, as FID's feature network."""

    def __init__(self, model: M6):
        super().__init__()
        self.encoder, self.size = model.embedding.image_encoder, model.cfg.image_size
        self.num_features = self.encoder.out_channels  # so torchmetrics never probes with a 299 px image
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        dtype = next(self.encoder.parameters()).dtype
        feats = self.encoder(((x - self.mean) / self.std).to(dtype))
        return feats.float().mean(dim=(2, 3))


def _unit(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                        for img in images])


def fid(features: EncoderFeatures, real: Sequence[Image.Image], fake: Sequence[Image.Image]) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=True)
    metric.update(_unit(real), real=True)
    metric.update(_unit(fake), real=False)
    return float(metric.compute())


def psnr(reference: torch.Tensor, image: Image.Image) -> float:
    """dB of `image` against `reference` ([3, H, W] in [-1, 1]) on the 0..255 scale."""
    want = ((reference.clamp(-1, 1) + 1) * 127.5).round().double()
    got = torch.from_numpy(np.asarray(image, np.float64)).permute(2, 0, 1)
    mse = float(((want - got) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@torch.no_grad()
def reconstructions(image_tokenizer: VQVAE, references: Sequence[bytes]) -> tuple[list[Image.Image], list[float], dict]:
    """The references through the tokenizer: decoded images, their PSNRs, and codebook usage."""
    size, device = image_tokenizer.cfg.image_size, next(image_tokenizer.parameters()).device
    pixels = [image_tensor(data, size) for data in references]
    if any(p is None for p in pixels):
        raise DownstreamDataError("a reference image cannot be decoded")
    batch = torch.stack(pixels).to(device)
    codes = image_tokenizer.encode(batch)
    images = [tensor_to_image(t) for t in image_tokenizer.decode(codes).float().cpu()]
    used, perplexity = codebook_usage(codes.cpu(), image_tokenizer.cfg.codebook_size)
    return images, [psnr(p, img) for p, img in zip(pixels, images)], {"codes_used": used,
                                                                       "codebook_perplexity": perplexity}


def _accuracy(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    return {a: float(np.mean([v[a] for v in verdicts])) for a in ATTRIBUTES}


def _scene_words(scene) -> str:
    """What the detector saw, in words (a count may exceed the captions' three)."""
    return "nothing" if scene is None else f"{CELL_NAMES[scene.cell]} {scene.count}个{scene.colour}的{scene.shape}"


def evaluate_text_to_image(model: M6, tok: M6Tokenizer, image_tokenizer: VQVAE, rows: list[dict],
                           sampling: SamplingConfig, num_samples: int, reranker: M6,
                           batch_size: int = 32) -> tuple[dict, list[dict], list]:
    """(metrics, one record per prompt, the GeneratedImages) of generating every row's caption;
    the metrics time the generation too (sampling, decoding and reranking: images per second)."""
    start = time.perf_counter()
    results = generate_images(model, tok, image_tokenizer, [r["caption"] for r in rows], num_samples, sampling,
                              batch_size, reranker)
    seconds = time.perf_counter() - start
    recon, psnrs, usage = reconstructions(image_tokenizer, [r["image_bytes"] for r in rows])
    references = [Image.open(io.BytesIO(r["image_bytes"])).convert("RGB") for r in rows]
    features = EncoderFeatures(reranker)
    metrics: dict = {"prompts": len(rows), "samples_per_prompt": num_samples, "generation_seconds": seconds,
                     "images_per_second": len(rows) * num_samples / seconds,
                     "reconstruction_psnr": float(np.mean(psnrs)), **usage,
                     "fid_reranked": fid(features, references, [r.images[r.best] for r in results]),
                     "fid_first_sample": fid(features, references, [r.images[0] for r in results]),
                     "fid_reconstruction": fid(features, references, recon)}
    records = []
    scored = all(all(k in r for k in SCENE_FIELDS) for r in rows)
    verdicts: dict[str, list] = {"reranked": [], "first_sample": [], "reconstruction": [], "reference": []}
    for row, result, rec, ref in zip(rows, results, recon, references):
        record = {"caption": row["caption"], "best": result.best,
                  "scores": None if result.scores is None else [float(s) for s in result.scores]}
        if scored:
            expected = scene_from_row(row)
            detected = [detect_scene(img) for img in result.images]
            record["detected"] = [_scene_words(s) for s in detected]
            record["verdicts"] = [score_attributes(s, expected) for s in detected]
            verdicts["reranked"].append(record["verdicts"][result.best])
            verdicts["first_sample"].append(record["verdicts"][0])
            verdicts["reconstruction"].append(score_attributes(detect_scene(rec), expected))
            verdicts["reference"].append(score_attributes(detect_scene(ref), expected))
        records.append(record)
    if scored:
        for name, v in verdicts.items():
            metrics.update({f"{name}_{a}": x for a, x in _accuracy(v).items()})
    return metrics, records, results


def write_samples(output_dir: str, metrics: dict, records: list[dict], results: list, grid_columns: int = 8) -> None:
    """OUTPUT/images/*.png, grid.png (one row per prompt, its candidates; the kept one framed),
    and index.html: every prompt with its candidates, scores, the pick and the detector's verdicts."""
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    lines = ["<!doctype html><meta charset='utf-8'><title>text-to-image samples</title>",
             "<style>td{text-align:center;font:12px sans-serif}img{image-rendering:pixelated}"
             ".best{outline:3px solid #2a2}</style><h1>Text-to-image samples</h1>",
             "<pre>" + html.escape(json.dumps(metrics, ensure_ascii=False, indent=1)) + "</pre><table>"]
    for n, (record, result) in enumerate(zip(records, results)):
        cells = []
        for k, image in enumerate(result.images):
            name = f"images/{n:03d}_{k}.png"
            image.save(os.path.join(output_dir, name))
            verdict = record.get("verdicts", [None] * len(result.images))[k]
            note = "" if verdict is None else ("✓ all" if verdict["all"] else "✗ " + ",".join(
                a for a in ATTRIBUTES[:-1] if not verdict[a]))
            score = "" if record["scores"] is None else f"{record['scores'][k]:.3f}"
            cls = " class='best'" if k == result.best else ""
            cells.append(f"<td><img src='{name}' width=96{cls}><br>{score}<br>{html.escape(note)}</td>")
        lines.append(f"<tr><th>{html.escape(record['caption'])}</th>{''.join(cells)}</tr>")
    lines.append("</table>")
    tmp = os.path.join(output_dir, ".index.html.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, os.path.join(output_dir, "index.html"))
    size = results[0].images[0].size[0]
    cols = min(grid_columns, len(results[0].images))
    grid = Image.new("RGB", (cols * (size + 4), len(results) * (size + 4)), (255, 255, 255))
    for n, result in enumerate(results):
        for k, image in enumerate(result.images[:cols]):
            x, y = k * (size + 4), n * (size + 4)
            if k == result.best:
                grid.paste((40, 170, 60), (x, y, x + size + 4, y + size + 4))
            grid.paste(image, (x + 2, y + 2))
    grid.save(os.path.join(output_dir, "grid.png"))
