"""Shared test helpers: tiny model configurations that run in milliseconds on CPU."""

import os

import numpy as np
import pytest
import torch

# Without a GPU, Triton's interpreter runs the kernels (DESIGN.md, "Kernels"). This must be set
# before anything imports Triton, and the model imports it through m6_kernels; the model's "auto"
# backends still take the PyTorch path on CPU, so other tests are unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_m6.config import ModelConfig
from megatron_m6.data.dataset import collate
from megatron_m6.data.task_spec import IMAGE_TASKS, LAYOUT_SPECIAL_TOKENS, TASK_NAMES, TEXT_TASKS
from megatron_m6.data.tasks import build_sample

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
    """A collated batch of samples the task builders made from random text of random lengths
    (so prefix and valid lengths vary): even samples of image tasks, odd ones of text tasks."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    tok = FakeTokenizer()
    samples = []
    for b in range(batch):
        task = IMAGE_TASKS[b // 2 % len(IMAGE_TASKS)] if b % 2 == 0 else TEXT_TASKS[b // 2 % len(TEXT_TASKS)]
        room = seq - (cfg.num_image_tokens if task in IMAGE_TASKS else 0) - LAYOUT_SPECIAL_TOKENS
        text = rng.integers(tok.sentinel_ids[0], cfg.vocab_size, int(rng.integers(room // 2, room + 1)))
        sample = build_sample(task, text.tolist(), tok, rng, seq, cfg.num_image_tokens)
        image = torch.randn(3, cfg.image_size, cfg.image_size, generator=g) if task in IMAGE_TASKS else None
        samples.append({"tokens": torch.tensor(sample.tokens), "prefix_len": sample.prefix_len,
                        "task_id": TASK_NAMES.index(task), "image": image})
    return collate(samples, seq, tok.pad_id, cfg.image_size)


# Every test starts from this seed of torch's global generator. 0 unless M6_TEST_SEED says
# otherwise: a seed loop (docs/PERFORMANCE.md, "Seed loop") runs the suite under many seeds to
# show no outcome depends on one lucky draw.
TEST_SEED = int(os.environ.get("M6_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(TEST_SEED)
    yield
