"""Inference: sampling, beam search, KV-cached generation, checkpoint loading, captioning and
text continuation."""

from megatron_m6.inference.generate import (
                                            SamplingConfig,
                                            beam_search,
                                            caption_images,
                                            continue_text,
                                            generate,
                                            load_model,
                                            process_logits,
                                            sample_next,
)

__all__ = ["SamplingConfig", "beam_search", "caption_images", "continue_text", "generate", "load_model",
           "process_logits", "sample_next"]
