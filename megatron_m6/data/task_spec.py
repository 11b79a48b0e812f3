"""The five pretraining tasks as the configuration sees them: their names, which read an image,
and the shortest sequence each can fill.

No project imports, so config.py (which validates --task-weights and --seq-length) and the data
pipeline (which builds the samples, data/tasks.py) share these facts without importing each other.
"""

from __future__ import annotations

TASK_NAMES = ("text_denoising", "prefix_lm", "captioning", "mm_denoising", "mm_prefix_lm")
TEXT_TASKS = ("text_denoising", "prefix_lm")
IMAGE_TASKS = ("captioning", "mm_denoising", "mm_prefix_lm")
DENOISING_TASKS = ("text_denoising", "mm_denoising")
FINETUNE_TASKS = ("caption", "vqa", "itm", "text_generation", "text_to_image")  # downstream (data/downstream.py)
LAYOUT_SPECIAL_TOKENS = 3  # [CLS], [SEP] and [EOS] around source and target
MIN_TEXT_TOKENS = 2  # prefix LM and span corruption need a token on each side


def min_text_tokens(task: str) -> int:
    """Fewest text tokens a sample of `task` can be built from (a caption may be one token)."""
    return 1 if task == "captioning" else MIN_TEXT_TOKENS


def min_seq_length(task: str, num_image_tokens: int) -> int:
    """Shortest seq_length that can hold one sample of `task`: its image, the layout's special
    tokens, the shortest text, and for denoising the one sentinel in both source and target."""
    n_img = num_image_tokens if task in IMAGE_TASKS else 0
    sentinels = 2 if task in DENOISING_TASKS else 0
    return n_img + LAYOUT_SPECIAL_TOKENS + min_text_tokens(task) + sentinels
