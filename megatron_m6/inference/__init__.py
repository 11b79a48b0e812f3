"""Inference: sampling, KV-cached generation, checkpoint loading, captioning and text continuation."""

from megatron_m6.inference.generate import (
                                            SamplingConfig,
                                            caption_images,
                                            continue_text,
                                            generate,
                                            load_model,
                                            sample_next,
)

__all__ = ["SamplingConfig", "caption_images", "continue_text", "generate", "load_model",
           "sample_next"]
