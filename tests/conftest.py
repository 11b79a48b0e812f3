"""Shared test helpers: tiny model configurations that run in milliseconds on CPU."""

import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the kernels (DESIGN.md, "Kernels"). This must be set
# before anything imports Triton, and the model imports it through m6_kernels; the model's "auto"
# backends still take the PyTorch path on CPU, so other tests are unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_m6.config import ModelConfig


ALPHABET = "abcdefghijklmnopqrstuvwxyz我们的图片猫狗"


class FakeTokenizer:
    """Char-level stand-in for M6Tokenizer: 8 specials, 100 sentinels, then the alphabet."""

    pad_id, unk_id, cls_id, sep_id, mask_id, bos_id, eos_id, img_id = range(8)
    sentinel_ids = list(range(8, 108))
    vocab_size = 108 + len(ALPHABET)

    def encode(self, text):
        return [108 + ALPHABET.index(c) if c in ALPHABET else self.unk_id for c in text]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=101, hidden_size=32, num_layers=2, num_attention_heads=4,
                ffn_hidden_size=64, max_position_embeddings=48, image_size=64,
                resnet_layers=(1, 1, 1, 1), resnet_bottleneck=False, resnet_width=8)
    return ModelConfig(**{**base, **overrides})


def random_batch(cfg: ModelConfig, batch: int = 4, seq: int = 32, seed: int = 0) -> dict:
    """A batch in the collate layout: odd prefix/valid lengths, some samples with images."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.num_image_tokens
    tokens = torch.randint(8, cfg.vocab_size, (batch, seq), generator=g)
    has_image = torch.arange(batch) % 2 == 0
    tokens[has_image, :P] = 7
    valid = torch.randint(P + 6, seq + 1, (batch,), generator=g)
    prefix = torch.stack([torch.randint(P + 2 if h else 2, int(v) - 2, (1,), generator=g)[0]
                          for h, v in zip(has_image, valid)])
    pos = torch.arange(seq)
    loss_mask = ((pos >= prefix[:, None] - 1) & (pos < valid[:, None] - 1)).float()
    labels = torch.roll(tokens, -1, 1) * loss_mask.long()
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, prefix_len=prefix, valid_len=valid,
                images=torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g),
                has_image=has_image, task_id=torch.arange(batch) % 5)


# Every test starts from this seed of torch's global generator. 0 unless M6_TEST_SEED says
# otherwise: a seed loop (docs/PERFORMANCE.md, "Seed loop") runs the suite under many seeds to
# show no outcome depends on one lucky draw.
TEST_SEED = int(os.environ.get("M6_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(TEST_SEED)
    yield
