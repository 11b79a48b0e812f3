"""Text-to-image: image-code tokens after the text vocabulary, a grown checkpoint that keeps the
text model, fine-tuning whose loss covers the codes alone and is the same under every layout,
sampling that writes codes only and matches training's layout, reranking by caption likelihood,
and one clear error for each kind of bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from megatron_m6.config import ConfigError, parse_args
from megatron_m6.data.dataset import collate
from megatron_m6.data.downstream import DownstreamDataError, Example, open_examples, text_to_image_layout
from megatron_m6.data.image_codes import encode_image_codes
from megatron_m6.data.sample_data import draw_scene, make_sample_data
from megatron_m6.finetune import build, run
from megatron_m6.inference.generate import SamplingConfig, load_model
from megatron_m6.inference.text_to_image import generate_images, png_bytes, prompt_tokens, sample_codes
from megatron_m6.model import M6
from megatron_m6.pretrain import padded_vocab_size
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.vision import VQVAE, VQConfig, load_image_tokenizer
from tests.parallel_harness import record_steps, run_parallel
from tests.test_parallel import FLOAT64_TOLERANCE, assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda line: None  # noqa: E731
# 64 px (preprocessing's smallest image) at 16x: 4 x 4 codes of a 128-code book (which grows the
# sample vocabulary past its padding); a sample is ~33 tokens.
VQ = VQConfig(image_size=64, downsample=16, codebook_size=128, code_dim=8, channels=8)
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
         "--image-size", "64", "--resnet-layers", "1,1,1,1", "--resnet-width", "8", "--no-resnet-bottleneck",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--adam-eps", "1e-5",
         "--log-interval", "100", "--params-dtype", "float64"]


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def save_tokenizer(model: VQVAE, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)},
               os.path.join(folder, "tokenizer.pt"))
    return folder


def fresh_tokenizer(seed: int, images: torch.Tensor) -> VQVAE:
    """An untrained tokenizer whose codebook started from these images' encoder outputs."""
    torch.manual_seed(seed)
    model = VQVAE(VQ)
    model.train()
    model(images)  # the data-dependent start of the codebook
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Sample vocabulary, caption jsonls, an image tokenizer, code datasets and a text checkpoint."""
    root = tmp_path_factory.mktemp("t2i")
    data = str(root / "sample")
    make_sample_data(data, num_train_images=4, num_test_images=1, num_text_docs=20, image_size=64, seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        image, caption = draw_scene(rng, 64)
        image.save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": caption})
    for split, part in (("train", rows[:8]), ("valid", rows[8:])):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    from megatron_m6.vision.pixels import image_tensor
    pixels = torch.stack([image_tensor((root / f"{i}.png").read_bytes(), 64) for i in range(12)])
    vq = save_tokenizer(fresh_tokenizer(0, pixels), str(root / "vq"))
    vocab = f"{data}/vocab.txt"
    for split in ("train", "valid"):
        encode_image_codes(str(root / f"{split}.jsonl"), str(root / f"codes_{split}"), vq, vocab_file=vocab)
    text = str(root / "text.jsonl")
    with open(text, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"source": r["caption"][:4], "target": r["caption"][4:]}, ensure_ascii=False) + "\n"
                     for r in rows)
    pretrained = str(root / "pretrained")
    run(parse_args(MODEL + ["--task", "text_generation", "--train-data", text, "--vocab-file", vocab,
                            "--seq-length", "16", "--max-position-embeddings", "16", "--train-iters", "2",
                            "--save", pretrained], entry="finetune"),
        log=QUIET)
    grown = str(root / "grown")
    result = tool("tools/checkpoint/convert.py", "grow", "--load", pretrained, "--output", grown,
                  "--image-tokenizer", vq, "--max-position-embeddings", "48")
    assert result.returncode == 0, result.stderr
    return {"root": root, "vocab": vocab, "vq": vq, "pixels": pixels, "pretrained": pretrained, "grown": grown,
            "train": str(root / "codes_train"), "valid": str(root / "codes_valid")}


def t2i_args(work: dict, *extra: str) -> list[str]:
    return MODEL + ["--task", "text_to_image", "--train-data", work["train"], "--valid-data", work["valid"],
                    "--image-tokenizer", work["vq"], "--vocab-file", work["vocab"], "--seq-length", "48",
                    "--max-position-embeddings", "48", "--pretrained-checkpoint", work["grown"], *extra]


def test_image_code_tokens_follow_the_text_vocabulary(work):
    text = M6Tokenizer.from_vocab_file(work["vocab"])
    tok = text.with_image_codes(16)
    codes = tok.image_codes
    assert (codes.boi_id, codes.eoi_id, codes.first_code_id) == (text.vocab_size, text.vocab_size + 1,
                                                                 text.vocab_size + 2)
    assert tok.vocab_size == text.vocab_size + 18 and tok.text_vocab_size == text.vocab_size
    sentence = "左上角有两个红色的圆形"
    assert tok.encode(sentence) == text.encode(sentence)
    mixed = text.encode(sentence) + [codes.boi_id] + codes.to_ids(np.arange(16)).tolist() + [codes.eoi_id]
    assert tok.decode(mixed) == text.decode(text.encode(sentence))
    assert np.array_equal(codes.to_codes(codes.to_ids(np.array([0, 7, 15]))), [0, 7, 15])
    with pytest.raises(ValueError, match="outside the code tokens"):
        codes.to_codes([codes.boi_id])
    assert len({text.digest, tok.digest, text.with_image_codes(17).digest}) == 3


def test_a_grown_checkpoint_keeps_the_text_model(work):
    """Old ids keep their rows, so on text the grown model's hidden states and text logits are the
    old model's, exactly (float64); the new rows and positions are those of a fresh model."""
    old, new = load_model(work["pretrained"]), load_model(work["grown"])
    text = M6Tokenizer.from_vocab_file(work["vocab"])
    tok = text.with_image_codes(VQ.codebook_size)
    assert new.cfg.vocab_size == padded_vocab_size(tok.vocab_size) > old.cfg.vocab_size
    assert (new.cfg.max_position_embeddings, old.cfg.max_position_embeddings) == (48, 16)
    ids = torch.tensor([[text.cls_id] + text.encode("左上角有两个红色的圆形") + [text.sep_id]])
    n = torch.tensor([ids.shape[1]])
    want, _ = old(ids, n, n)
    got, _ = new(ids, n, n)
    assert torch.equal(got[..., :text.vocab_size], want[..., :text.vocab_size])
    for name, rows in (("embedding.word_emb.weight", text.vocab_size), ("embedding.pos_emb.weight", 16)):
        assert torch.equal(new.state_dict()[name][:rows], old.state_dict()[name][:rows])
    fresh = M6(new.cfg)  # init_weights(seed 0): the new rows' numbers come from their names alone
    from megatron_m6.model import init_weights
    init_weights(fresh, new.cfg, seed=parse_args(t2i_args(work), entry="finetune").seed)
    for name, rows in (("embedding.word_emb.weight", text.vocab_size), ("embedding.pos_emb.weight", 16)):
        assert torch.equal(new.state_dict()[name][rows:], fresh.state_dict()[name][rows:].to(new.state_dict()[name]))


def test_the_loss_covers_the_codes_alone(work):
    tok = M6Tokenizer.from_vocab_file(work["vocab"]).with_image_codes(VQ.codebook_size)
    examples, _ = open_examples(work["train"], "text_to_image", tok, 64)
    samples = []
    for e in examples:
        tokens, prefix_len, span = text_to_image_layout(e, tok, 48)
        samples.append({"tokens": torch.tensor(tokens), "prefix_len": prefix_len, "task_id": 0, "image": None,
                        "loss_span": span})
    batch = collate(samples, 48, tok.pad_id, 64)
    assert len({len(tok.encode(e.source)) for e in examples}) > 1, "captions of one length test no padding"
    for b, e in enumerate(examples):
        caption = tok.encode(e.source)
        want_labels = e.target_ids  # the codes' tokens, in raster order
        first = 48 - VQ.grid**2 - 1  # the codes, then [EOI], end the 48 positions, whatever the caption
        pads = [tok.pad_id] * (first - 3 - len(caption))
        assert batch["tokens"][b].tolist() == ([tok.cls_id, *caption, tok.sep_id, *pads, tok.image_codes.boi_id,
                                                *want_labels, tok.image_codes.eoi_id])
        assert samples[b]["prefix_len"] == first - 1, "the [PAD]s belong to the bidirectional caption"
        masked = batch["loss_mask"][b].nonzero().flatten()
        assert masked.tolist() == list(range(first - 1, first - 1 + VQ.grid**2))
        assert batch["labels"][b, masked].tolist() == want_labels
        assert all(tok.image_codes.first_code_id <= t < tok.image_codes.end_id for t in want_labels)


@pytest.mark.parametrize("layout_name, flags", [("TP2", ["--tensor-model-parallel-size", "2"]),
                                                ("PP2", ["--pipeline-model-parallel-size", "2"])])
def test_text_to_image_finetuning_under_a_layout_matches_one_process(work, layout_name, flags):
    """Losses and full gradients of 3 steps, float64; TP2 splits the grown vocabulary."""
    want = finetune_steps(t2i_args(work))
    got = run_parallel(2, t2i_args(work) + flags, fn=finetune_steps)
    assert_close(got, want, f"{layout_name} text-to-image fine-tuning", FLOAT64_TOLERANCE)


def finetune_steps(argv: list[str]):
    trainer, loader = build(parse_args(argv, entry="finetune"), log=QUIET)
    return record_steps(trainer, loader, steps=3)


def test_sampling_writes_only_codes_and_reads_the_prompt_as_training_did(work):
    """Even when a text token's logit dominates, only codes are drawn; greedy codes are the argmax
    over the code tokens of the training layout's logits with those codes teacher-forced."""
    model = load_model(work["grown"])
    tok = M6Tokenizer.from_vocab_file(work["vocab"]).with_image_codes(VQ.codebook_size)
    with torch.no_grad():
        model.embedding.word_emb.weight[tok.eos_id] *= 1000  # tied head: [EOS] now wins every step
    prompt = prompt_tokens(tok, "左上角有两个红色的圆形", VQ.grid, model.cfg.max_position_embeddings)
    tokens = torch.tensor([prompt] * 4)
    sampled = sample_codes(model, tok, tokens, VQ.grid, SamplingConfig(greedy=False, top_k=5),
                           torch.Generator().manual_seed(0))
    assert sampled.shape == (4, VQ.grid**2) and 0 <= sampled.min() and sampled.max() < VQ.codebook_size
    greedy = sample_codes(model, tok, tokens[:1], VQ.grid, SamplingConfig(), torch.Generator())[0]
    example = Example("左上角有两个红色的圆形", "", None, source_ids=tok.encode("左上角有两个红色的圆形"),
                      target_ids=tok.image_codes.to_ids(greedy.numpy()).tolist())
    ids, prefix_len, (first, end) = text_to_image_layout(example, tok, 48)
    n = torch.tensor([len(ids)])
    logits, _ = model(torch.tensor([ids]), torch.tensor([prefix_len]), n)
    codes = tok.image_codes
    teacher = logits[0, first - 1:end - 1, codes.first_code_id:codes.end_id].argmax(-1)
    assert torch.equal(teacher, greedy)


def test_the_reranker_keeps_the_candidate_whose_caption_likelihood_is_highest(work):
    """Against an independent score: one unbatched float64 forward of `[IMG]*n [CLS] [SEP] caption
    [EOS]` per candidate, its mean token log-likelihood."""
    model = load_model(work["grown"], dtype=torch.float64).double()
    tok = M6Tokenizer.from_vocab_file(work["vocab"]).with_image_codes(VQ.codebook_size)
    vq = load_image_tokenizer(work["vq"])
    caption = "左上角有两个红色的圆形"
    (result,) = generate_images(model, tok, vq, [caption], 4, SamplingConfig(greedy=False, seed=3), reranker=model)
    from megatron_m6.data.downstream import decode_image
    scores = []
    for image in result.images:
        text = tok.encode(caption)
        n_img = model.cfg.num_image_tokens
        ids = [tok.img_id] * n_img + [tok.cls_id, tok.sep_id] + text + [tok.eos_id]
        plen = n_img + 2
        pixels = decode_image(png_bytes(image), model.cfg.image_size)[None].double()
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]), torch.tensor([plen]), torch.tensor([len(ids)]), pixels,
                              torch.tensor([True]))
        logp = F.log_softmax(logits[0, plen - 1:-1].double(), -1)
        scores.append(float(logp.gather(1, torch.tensor(ids[plen:])[:, None]).mean()))
    np.testing.assert_allclose(result.scores, scores, rtol=1e-9)
    assert result.best == int(np.argmax(scores))
    assert len(set(np.round(scores, 9))) == 4  # distinct candidates, so the pick is meaningful


def test_bad_text_to_image_input_is_one_error(work, tmp_path):
    model = load_model(work["grown"])
    tok = M6Tokenizer.from_vocab_file(work["vocab"]).with_image_codes(VQ.codebook_size)
    vq = load_image_tokenizer(work["vq"])
    with pytest.raises(ValueError, match="exceeds the model's 48 positions"):
        generate_images(model, tok, vq, ["左上角有两个红色的圆形" * 3], 2, SamplingConfig(greedy=False))
    with pytest.raises(ValueError, match="--num-samples must be >= 1"):
        generate_images(model, tok, vq, ["左上角"], 0, SamplingConfig(greedy=False))
    # A tokenizer of another seed made neither dataset: fine-tuning refuses it before any work.
    other = save_tokenizer(fresh_tokenizer(1, work["pixels"]), str(tmp_path / "other_vq"))
    argv = t2i_args(work)
    argv[argv.index("--image-tokenizer") + 1] = other
    with pytest.raises(Exception, match="another image tokenizer"):
        build(parse_args(argv, entry="finetune"), log=QUIET)
    with pytest.raises(ConfigError, match="needs --image-tokenizer"):
        parse_args([a for a in t2i_args(work) if a not in ("--image-tokenizer", work["vq"])], entry="finetune")
    short = t2i_args(work)
    short[short.index("--seq-length") + 1] = "40"  # the image would not end at the last position
    with pytest.raises(ConfigError, match="--seq-length equal to --max-position-embeddings"):
        build(parse_args(short, entry="finetune"), log=QUIET)
    with pytest.raises(DownstreamDataError, match="image-code dataset"):
        open_examples(str(work["root"] / "train.jsonl"), "text_to_image", tok, 64)
    for argv, message in ((["--num-samples", "0"], "--num-samples must be >= 1"),
                          (["--num-beams", "2"], "beam search"),
                          (["--rerank", "caption"], "exceeds the model's 48 positions")):
        prompt = "左上角有两个红色的圆形" * 3 if "caption" in argv else "左上角"
        result = tool("tools/generate.py", "--load", work["grown"], "--text-to-image", prompt,
                      "--output", str(tmp_path / "out"), *argv)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_generate_py_writes_every_candidate_and_the_reranked_pick(work, tmp_path):
    out = tmp_path / "samples"
    result = tool("tools/generate.py", "--load", work["grown"], "--text-to-image", "左上角有两个红色的圆形", "右侧",
                  "--num-samples", "3", "--top-k", "8", "--rerank", "caption", "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["左上角有两个红色的圆形", "右侧"]
    for n, r in enumerate(rows):
        assert len(r["files"]) == len(r["scores"]) == 3
        assert r["best"] == r["files"][int(np.argmax(r["scores"]))]
        for name in r["files"] + [f"{n:03d}_best.png"]:
            assert (out / name).is_file()


def test_the_evaluation_against_independent_computations(work, tmp_path):
    """Reference drawings score 100% on every attribute; PSNR, codebook usage and FID equal a direct
    computation (FID: the Fréchet distance of the feature network's outputs in float64); the
    sample page and grid hold every prompt and candidate."""
    import random

    from megatron_m6.data.sample_data import HELD_OUT_SCENES, render_slotted_scene
    from megatron_m6.evaluate_text_to_image import (
        EncoderFeatures,
        evaluate_text_to_image,
        fid,
        read_prompts,
        write_samples,
    )
    from megatron_m6.vision.pixels import image_tensor

    rng, rows = random.Random(0), []
    for i, scene in enumerate(HELD_OUT_SCENES[:5]):
        render_slotted_scene(rng, scene, 96).save(tmp_path / f"ref{i}.png")
        rows.append({"caption": scene.caption, "image": f"ref{i}.png", "cell": scene.cell, "count": scene.count,
                     "colour": scene.colour, "shape": scene.shape})
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    model = load_model(work["grown"])
    tok = M6Tokenizer.from_vocab_file(work["vocab"]).with_image_codes(VQ.codebook_size)
    vq = load_image_tokenizer(work["vq"])
    prompts = read_prompts(str(tmp_path / "test.jsonl"))
    metrics, records, results = evaluate_text_to_image(model, tok, vq, prompts, SamplingConfig(greedy=False), 3,
                                                       model)
    assert all(metrics[f"reference_{a}"] == 1.0 for a in ("colour", "shape", "count", "position", "all"))
    pixels = torch.stack([image_tensor(p["image_bytes"], VQ.image_size) for p in prompts])
    codes = vq.encode(pixels)
    want = ((pixels.clamp(-1, 1) + 1) * 127.5).round().double()
    got = ((vq.decode(codes).clamp(-1, 1) + 1) * 127.5).round().double()
    mse = ((want - got) ** 2).mean(dim=(1, 2, 3))
    assert metrics["reconstruction_psnr"] == pytest.approx(float((10 * torch.log10(255**2 / mse)).mean()), rel=1e-9)
    assert metrics["codes_used"] == len(torch.unique(codes))
    assert [r["best"] for r in records] == [int(np.argmax(r["scores"])) for r in records]
    assert all(len(r["verdicts"]) == 3 for r in records)

    features = EncoderFeatures(model)
    real = [Image.open(tmp_path / f"ref{i}.png").convert("RGB") for i in range(5)]
    fake = results[0].images + results[1].images
    unit = lambda images: torch.stack([torch.from_numpy(np.asarray(i, np.float64) / 255).permute(2, 0, 1)  # noqa: E731
                                       for i in images])
    a, b = features(unit(real)).double(), features(unit(fake)).double()
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    root = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    frechet = float(((a.mean(0) - b.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * root)
    assert fid(features, real, fake) == pytest.approx(frechet, rel=1e-3, abs=1e-3)
    assert fid(features, real, real) == pytest.approx(0.0, abs=1e-3)

    write_samples(str(tmp_path / "samples"), metrics, records, results)
    page = (tmp_path / "samples" / "index.html").read_text(encoding="utf-8")
    assert all(r["caption"] in page for r in rows) and page.count("<img ") == 5 * 3
    size = results[0].images[0].size[0]
    assert Image.open(tmp_path / "samples" / "grid.png").size == (3 * (size + 4), 5 * (size + 4))


def test_bf16_generation_draws_codes_and_reranks(work):
    """The GPU's production dtype, here on the CPU: weights in bf16 (norms fp32), the image
    tokenizer in fp32; every candidate is an image of codes and the pick is its best score."""
    model = load_model(work["grown"], dtype=torch.bfloat16)
    tok = M6Tokenizer.from_vocab_file(work["vocab"]).with_image_codes(VQ.codebook_size)
    vq = load_image_tokenizer(work["vq"])
    results = generate_images(model, tok, vq, ["左上角有两个红色的圆形", "右侧"], 3,
                              SamplingConfig(greedy=False, top_k=8, top_p=0.9), batch_size=4, reranker=model)
    for r in results:
        assert r.codes.shape == (3, VQ.grid, VQ.grid) and 0 <= r.codes.min() and r.codes.max() < VQ.codebook_size
        assert len(r.images) == 3 and r.images[0].size == (VQ.image_size, VQ.image_size)
        assert np.isfinite(r.scores).all() and r.best == int(np.argmax(r.scores))
