"""The image tokenizer's quantizer and VQ-VAE (megatron_m6/vision/vq.py), against float64
references written out here: nearest codes, one EMA step, data-dependent start, dead-code
restarts, the straight-through gradient, and a short training run on the sample shapes."""

import random

import numpy as np
import pytest
import torch

from megatron_m6.data.sample_data import draw_scene
from megatron_m6.vision import VQVAE, EMAQuantizer, VQConfig, codebook_usage, load_image_tokenizer


def quantizer(k: int = 8, dim: int = 5, **kw) -> EMAQuantizer:
    return EMAQuantizer(k, dim, **kw).double()


def test_codes_are_the_nearest_codebook_rows():
    q = quantizer(16, 7)
    q.codebook.copy_(torch.randn(16, 7, dtype=torch.float64))
    z = torch.randn(300, 7, dtype=torch.float64)
    want = [int(np.argmin([((zi - c) ** 2).sum() for c in q.codebook.numpy()])) for zi in z.numpy()]
    assert q.codes(z).tolist() == want


def test_the_first_batch_starts_the_codebook_from_encoder_outputs():
    """With an EMA that hardly moves (decay 1 - 1e-12), the codebook after the first batch is
    its start: every code one of the batch's rows."""
    torch.manual_seed(0)
    q = quantizer(8, 5, decay=1 - 1e-12).train()
    z = torch.randn(40, 5, dtype=torch.float64)
    q(z)
    distance = (q.codebook[:, None] - z[None]).abs().amax(-1).amin(1)
    assert bool(q.initialized) and distance.max() < 1e-9


def test_one_ema_step_equals_the_float64_formula():
    k, dim, decay, eps = 6, 4, 0.9, 1e-5
    q = quantizer(k, dim, decay=decay, dead_code_threshold=0.0).train()
    codebook = torch.randn(k, dim, dtype=torch.float64)
    count = torch.rand(k, dtype=torch.float64) * 5 + 1
    q.codebook.copy_(codebook)
    q.ema_count.copy_(count)
    q.ema_sum.copy_(codebook * count[:, None])
    q.initialized.fill_(True)
    z = torch.randn(50, dim, dtype=torch.float64)
    q(z)
    assign = [int(np.argmin(((codebook.numpy() - zi) ** 2).sum(1))) for zi in z.numpy()]
    new_count = [decay * count[j].item() + (1 - decay) * assign.count(j) for j in range(k)]
    new_sum = [decay * (codebook[j] * count[j]).numpy() + (1 - decay) * sum(
        (z[i].numpy() for i in range(len(z)) if assign[i] == j), np.zeros(dim)) for j in range(k)]
    n = sum(new_count)
    want = np.stack([new_sum[j] / ((new_count[j] + eps) / (n + k * eps) * n) for j in range(k)])
    np.testing.assert_allclose(q.ema_count.numpy(), new_count, rtol=1e-12)
    np.testing.assert_allclose(q.codebook.numpy(), want, rtol=1e-10)


def test_a_dead_code_restarts_at_an_encoder_output():
    torch.manual_seed(1)
    q = quantizer(4, 3, decay=0.5, dead_code_threshold=1.0).train()
    q(torch.randn(64, 3, dtype=torch.float64))
    q.codebook[3] = 1e6  # far from every row: never assigned, its count halves each step
    q.ema_sum[3] = q.codebook[3] * q.ema_count[3]
    for _ in range(8):  # without rows its count halves each step until it is under 1: restart
        z = torch.randn(64, 3, dtype=torch.float64)
        q(z)
        if q.codebook[3].abs().max() < 1e3:
            break
    assert q.codebook[3].abs().max() < 1e3 and any(torch.equal(q.codebook[3], r) for r in z)


def test_the_gradient_passes_straight_through():
    q = quantizer(8, 5).eval()
    q.codebook.copy_(torch.randn(8, 5, dtype=torch.float64))
    z = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 5, dtype=torch.float64)
    out, codes = q(z)
    torch.testing.assert_close(out.detach(), q.codebook[codes], rtol=0, atol=1e-15)  # z + (code - z)
    (out * w).sum().backward()
    assert torch.equal(z.grad, w)


def test_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="power of 2"):
        VQVAE(VQConfig(downsample=6))
    with pytest.raises(ValueError, match="not a multiple"):
        VQVAE(VQConfig(image_size=100, downsample=8))


def shapes(n: int, size: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    images = [np.asarray(draw_scene(rng, size)[0], dtype=np.float32) for _ in range(n)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1


def train_briefly(dead_code_threshold: float) -> tuple[list[float], VQVAE]:
    """60 steps on 48 px shapes, f8 (6x6 codes), 64 codes; an EMA decay of 0.9, so that a code
    left without rows restarts after ln(9) / 0.1 = 22 steps, inside so short a run."""
    torch.manual_seed(0)
    cfg = VQConfig(image_size=48, downsample=8, codebook_size=64, code_dim=16, channels=16, ema_decay=0.9,
                   dead_code_threshold=dead_code_threshold)
    model = VQVAE(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        out = model(shapes(16, 48, step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["reconstruction_loss"].item())
    return losses, model.eval()


def test_a_short_training_run_learns_and_restarts_keep_the_codebook_in_use():
    """Without restarts the codebook collapses onto a few codes (3 of 64 when measured); with
    them most stay in use (52), and the reconstruction loss falls either way."""
    images = shapes(32, 48, 1000)
    used = {}
    for threshold in (0.0, 1.0):
        losses, model = train_briefly(threshold)
        assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses
        codes = model.encode(images)
        assert codes.shape == (32, 6, 6) and model.decode(codes).shape == images.shape
        used[threshold] = codebook_usage(codes, 64)
    assert used[1.0][0] >= 32 and used[1.0][0] >= 4 * used[0.0][0], used


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = ["--image-size", "48", "--codebook-size", "32", "--channels", "16", "--code-dim", "8", "--batch-size", "4",
        "--log-interval", "2"]


def run_tool(args: list[str], nproc: int = 1):
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return subprocess.run(launcher + ["tools/train_image_tokenizer.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_training_tool_runs_data_parallel_saves_resumes_and_logs(tmp_path):
    """torchrun with 2 gloo ranks on a folder of images, then a resume on one process; the
    checkpoint loads as a tokenizer, and TensorBoard got its events."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))

    rng = random.Random(0)
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for i in range(12):
        draw_scene(rng, 96)[0].save(tmp_path / "images" / ("sub" if i % 2 else "") / f"{i}.png")
    save = str(tmp_path / "vq")
    done = run_tool(["--data", str(tmp_path / "images"), "--train-iters", "4", "--save", save,
                     "--tensorboard-dir", str(tmp_path / "tb"), *TINY], nproc=2)
    assert done.returncode == 0, done.stderr
    assert "12 images, 2 rank(s)" in done.stdout and "iteration      4/4" in done.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    again = run_tool(["--data", str(tmp_path / "images"), "--train-iters", "6", "--save", save, "--load", save, *TINY])
    assert again.returncode == 0, again.stderr
    assert "iteration      6/6" in again.stdout and "iteration      2/" not in again.stdout
    state = torch.load(f"{save}/tokenizer.pt", weights_only=True)
    assert state["iteration"] == 6
    model = load_image_tokenizer(save)
    assert model.encode(shapes(3, 48, 0)).shape == (3, 6, 6)


def test_the_training_tool_counts_unreadable_images_and_refuses_missing_data(tmp_path):
    (tmp_path / "images").mkdir()
    draw_scene(random.Random(0), 96)[0].save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    done = run_tool(["--data", str(tmp_path / "images"), "--train-iters", "2", *TINY])
    assert done.returncode == 0, done.stderr
    assert "skipped images 0" not in done.stdout and "skipped images" in done.stdout
    missing = run_tool(["--data", str(tmp_path / "nothing"), "--train-iters", "2", *TINY])
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == (
        f"error: --data {tmp_path / 'nothing'} is neither a folder of images nor an indexed dataset")


def test_the_training_tool_reads_the_image_items_of_an_indexed_dataset(tmp_path):
    from megatron_m6.data.preprocess import PreprocessConfig, preprocess
    from megatron_m6.data.sample_data import make_sample_data

    make_sample_data(str(tmp_path / "data"), num_train_images=10, num_test_images=1, num_text_docs=5)
    cfg = PreprocessConfig(inputs=[str(tmp_path / "data" / "captions_train.jsonl")], output_prefix=str(tmp_path / "p"),
                           image_key="image", image_size=64, vocab_file=str(tmp_path / "data" / "vocab.txt"),
                           progress=False)
    preprocess(cfg)
    (prefix,) = cfg.output_names().values()
    done = run_tool(["--data", prefix, "--train-iters", "2", *TINY])
    assert done.returncode == 0, done.stderr
    assert "10 images, 1 rank(s)" in done.stdout and "skipped images 0" in done.stdout


@pytest.mark.parametrize("gan", [[], ["--adversarial-weight", "0.1", "--perceptual-weight", "1",
                                      "--discriminator-start", "2"]], ids=["plain", "with discriminator"])
def test_a_resumed_tokenizer_run_equals_an_uninterrupted_one(tmp_path, gan):
    """6 steps at once, and 4 then a resume to 6 (restarts on, so the RNG state matters): the
    weights, codebook, EMA statistics, optimizer state (and the discriminator's) are bit for bit
    the same."""
    rng = random.Random(1)
    (tmp_path / "images").mkdir()
    for i in range(10):
        draw_scene(rng, 96)[0].save(tmp_path / "images" / f"{i}.png")
    data = ["--data", str(tmp_path / "images"), *TINY, "--ema-decay", "0.5", *gan]  # codes die and restart
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for args in (["--train-iters", "6", "--save", straight], ["--train-iters", "4", "--save", split],
                 ["--train-iters", "6", "--save", split, "--load", split]):
        done = run_tool(data + args)
        assert done.returncode == 0, done.stderr
    a, b = (torch.load(f"{d}/tokenizer.pt", weights_only=True) for d in (straight, split))
    parts = ("model", "discriminator") if gan else ("model",)
    assert ("discriminator" in a) == bool(gan) and ("adversarial" in done.stdout) == bool(gan)
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for opt in ("optimizer", "discriminator_optimizer") if gan else ("optimizer",):
        flat = lambda s: [t for v in s[opt]["state"].values() for t in v.values()]  # noqa: E731, B023
        assert len(flat(a)) and all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))
    if gan:
        refused = run_tool(data[:-6] + ["--train-iters", "8", "--save", split, "--load", split])
        assert refused.returncode == 1 and "with the discriminator terms" in refused.stderr.strip().splitlines()[-1]


def test_the_discriminator_terms_are_the_hinge_gan_and_feature_matching():
    """Against separate float64 forwards of the real and the reconstructed images."""
    from megatron_m6.vision.vq import PatchDiscriminator, discriminator_loss, generator_terms

    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8).double()
    real = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    fake = (torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1).requires_grad_()
    (lr, fr), (lf, ff) = disc(real), disc(fake)
    want_d = torch.clamp(1 - lr, min=0).mean() + torch.clamp(1 + lf, min=0).mean()
    torch.testing.assert_close(discriminator_loss(disc, real, fake), want_d, rtol=1e-12, atol=0)
    adversarial, perceptual = generator_terms(disc, real, fake)
    torch.testing.assert_close(adversarial, -lf.mean(), rtol=1e-12, atol=0)
    want_p = sum((a - b).abs().mean() for a, b in zip(ff, fr)) / len(ff)
    torch.testing.assert_close(perceptual, want_p, rtol=1e-12, atol=0)
    real.requires_grad_()
    generator_terms(disc, real, fake)[1].backward()
    assert real.grad is None or not real.grad.any()  # the input is the target, not moved
    assert fake.grad.abs().sum() > 0


@pytest.mark.parametrize("image_size, downsample", [(40, 8), (48, 16), (56, 8)])
def test_encode_and_decode_keep_odd_grids(image_size, downsample):
    """Grids of 5, 3 and 7 codes a side: codes [B, g, g] and images back at the input's size."""
    cfg = VQConfig(image_size=image_size, downsample=downsample, codebook_size=8, code_dim=8, channels=8)
    model = VQVAE(cfg)
    images = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.train()
    model(images)
    codes = model.eval().encode(images)
    g = image_size // downsample
    assert g % 2 == 1 and codes.shape == (3, g, g) and cfg.grid == g
    assert model.decode(codes).shape == images.shape
