import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from megatron_m6.config import ModelConfig
from megatron_m6.inference import SamplingConfig, generate, load_model, sample_next
from megatron_m6.model import M6, KVCache
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.tokenizer.tokenizer import SPECIAL_TOKENS
from megatron_m6.training.checkpoint import CheckpointError, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
            max_position_embeddings=64, image_size=64, resnet_layers=(1, 1, 1, 1),
            resnet_bottleneck=False, resnet_width=8, init_method_std=0.1)
VARIANTS = {"dense": {}, "rope": dict(position_embedding_type="rope"),
            "moe": dict(num_experts=4, moe_router_topk=2)}
CLS, SEP, IMG, NEVER = 2, 3, 7, -1


def tiny_model(**overrides) -> M6:
    """In float64: cached and uncached decoding sum in different orders, and in fp32 two nearly
    equal logits could swap places on another CPU; float64 rounding leaves no such ties."""
    torch.manual_seed(0)
    return M6(ModelConfig(**{**TINY, **overrides})).double().eval()


def prompt(model: M6, with_images: bool, batch: int = 3, source_len: int = 3):
    """Same-length prefixes `[IMG]*n [CLS] source [SEP]`; with images, the middle row has none."""
    g = torch.Generator().manual_seed(1)
    n_img = model.cfg.num_image_tokens if with_images else 0
    source = torch.randint(10, model.cfg.vocab_size, (batch, source_len), generator=g)
    tokens = torch.cat([torch.full((batch, n_img), IMG), torch.full((batch, 1), CLS), source,
                        torch.full((batch, 1), SEP)], dim=1)
    if not with_images:
        return tokens, None, None
    images = torch.randn(batch, 3, model.cfg.image_size, model.cfg.image_size, generator=g,
                         dtype=model.lm_head.weight.dtype)
    return tokens, images, torch.tensor([True, False, True][:batch])


@torch.no_grad()
def reference_greedy(model, tokens, images, has_image, steps):
    """Greedy decoding written out directly: the full sequence through the model every step."""
    prefix_len = torch.full((tokens.shape[0],), tokens.shape[1])
    for _ in range(steps):
        valid_len = torch.full_like(prefix_len, tokens.shape[1])
        logits, _ = model(tokens, prefix_len, valid_len, images, has_image)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prefix_len[0]:].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_images", [False, True])
def test_cached_greedy_equals_uncached(variant, with_images):
    model = tiny_model(**VARIANTS[variant])
    tokens, images, has_image = prompt(model, with_images)
    cfg = SamplingConfig(max_new_tokens=8)
    cached = generate(model, tokens, images, has_image, NEVER, cfg, use_cache=True)
    full = generate(model, tokens, images, has_image, NEVER, cfg, use_cache=False)
    assert cached == full == reference_greedy(model, tokens, images, has_image, 8)
    assert [len(r) for r in cached] == [8, 8, 8]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_images", [False, True])
def test_cached_logits_match_full_forward(variant, with_images):
    model = tiny_model(**VARIANTS[variant])
    prefix, images, has_image = prompt(model, with_images)
    B, plen = prefix.shape
    target = torch.randint(10, model.cfg.vocab_size, (B, 6), generator=torch.Generator().manual_seed(2))
    seq = torch.cat([prefix, target], dim=1)
    prefix_len = torch.full((B,), plen)
    with torch.no_grad():
        reference, _ = model(seq, prefix_len, torch.full((B,), seq.shape[1]), images, has_image)
        cache = KVCache(model.cfg, B, seq.shape[1], "cpu", torch.float64)
        logits, _ = model(prefix, prefix_len, prefix_len, images, has_image, cache, 0)
        # Logits of order 1 in float64: other summation orders differ by ~1e-15.
        torch.testing.assert_close(logits, reference[:, :plen], rtol=0, atol=1e-12)
        for pos in range(plen, seq.shape[1]):
            logits, _ = model(seq[:, pos:pos + 1], prefix_len, torch.full((B,), pos + 1),
                              images, has_image, cache, pos)
            torch.testing.assert_close(logits[:, 0], reference[:, pos], rtol=0, atol=1e-12)


def test_generation_respects_position_limit_and_restores_mode():
    model = tiny_model().train()
    tokens = torch.randint(10, 97, (2, 60), generator=torch.Generator().manual_seed(3))
    for use_cache in (True, False):
        out = generate(model, tokens, None, None, NEVER, SamplingConfig(max_new_tokens=32), use_cache)
        assert [len(r) for r in out] == [4, 4]  # 60 + 4 = max_position_embeddings
    assert model.training
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.zeros(1, 64, dtype=torch.long), None, None, NEVER, SamplingConfig())


def test_stops_at_eos_per_row():
    model = tiny_model()
    tokens, images, has_image = prompt(model, with_images=True)
    cfg = SamplingConfig(max_new_tokens=12)
    full = generate(model, tokens, images, has_image, NEVER, cfg)
    eos = full[0][3]  # a token row 0 makes mid-way; other rows may or may not make it
    out = generate(model, tokens, images, has_image, eos, cfg)
    assert out[0] == full[0][:full[0].index(eos)]
    for row, ref in zip(out, full):
        assert row == (ref[:ref.index(eos)] if eos in ref else ref)


def test_sampling_reproducible_and_top_k_1_is_greedy():
    model = tiny_model()
    tokens, _, _ = prompt(model, with_images=False)
    hot = SamplingConfig(max_new_tokens=10, greedy=False, temperature=2.0, seed=5)
    assert generate(model, tokens, None, None, NEVER, hot) == generate(model, tokens, None, None, NEVER, hot)
    top1 = dataclasses.replace(hot, top_k=1)
    greedy = SamplingConfig(max_new_tokens=10)
    assert generate(model, tokens, None, None, NEVER, top1) == generate(model, tokens, None, None, NEVER, greedy)
    logits = torch.randn(50, 97, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_next(logits, top1, torch.Generator()), logits.argmax(-1))


@pytest.mark.parametrize("top_p", [0.45, 0.75, 0.95])
def test_top_p_samples_only_the_nucleus(top_p):
    probs = torch.tensor([0.1, 0.5, 0.04, 0.3, 0.06])
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < top_p).sum()) + 1  # smallest prefix reaching top_p
    nucleus = set(order[:size].tolist())
    logits = probs.log().expand(4000, -1)
    cfg = SamplingConfig(greedy=False, top_p=top_p)
    drawn = sample_next(logits, cfg, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == nucleus  # every nucleus token shows up in 4000 draws, nothing else


# -- checkpoint loading and the command line -------------------------------------------------

def write_run(tmp_path, **overrides):
    """A vocab.txt and a checkpoint of a tiny random model sized for it."""
    tok = M6Tokenizer(SPECIAL_TOKENS + list("猫狗在草地上"))
    tok.save_vocab(str(tmp_path / "vocab.txt"))
    cfg = ModelConfig(**{**TINY, "vocab_size": tok.vocab_size, **overrides})
    torch.manual_seed(0)
    model = M6(cfg)
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))  # lists, as if read from JSON
    save_checkpoint(str(tmp_path / "ckpt"), 10, model, torch.optim.AdamW(model.parameters()),
                    {"model_config": config, "iteration": 10})
    return model


def test_load_model_round_trip(tmp_path):
    model = write_run(tmp_path, position_embedding_type="rope")
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.cfg == model.cfg and isinstance(loaded.cfg.resnet_layers, tuple)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # Weights of another shape under this model_config: one clear error.
    other = M6(dataclasses.replace(model.cfg, hidden_size=64, ffn_hidden_size=128))
    save_checkpoint(str(tmp_path / "bad"), 1, other, torch.optim.AdamW(other.parameters()),
                    {"model_config": dataclasses.asdict(model.cfg), "iteration": 1})
    with pytest.raises(CheckpointError, match="does not fit its model_config"):
        load_model(str(tmp_path / "bad"))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_missing_checkpoint_is_one_error_line(tmp_path):
    write_run(tmp_path)
    result = run_cli("--load", str(tmp_path / "nope"), "--vocab-file", str(tmp_path / "vocab.txt"),
                     "--text", "猫")
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_cli_eval_captions_and_corrupt_image(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(REPO, "tools", "generate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    write_run(tmp_path)
    Image.new("RGB", (80, 70), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": "red.png", "text": "猫在草地上"}] * 3
    (tmp_path / "captions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--load", str(tmp_path / "ckpt"), "--vocab-file", str(tmp_path / "vocab.txt"),
              "--max-new-tokens", "4", "--device", "cpu"]
    cli.main(common + ["--eval-captions", str(tmp_path / "captions_test.jsonl"), "--show", "2",
                       "--batch-size", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].count(" | ") == 2
    assert lines[-1].startswith("caption accuracy: ") and "/3 = " in lines[-1]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(common + ["--image", str(tmp_path / "red.png"), str(tmp_path / "broken.png")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: image ")
