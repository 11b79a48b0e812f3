"""The image tokenizer of text-to-image generation: a VQ-VAE turning images into grids of codes."""

from megatron_m6.vision.vq import (
    VQ_PRESETS,
    VQVAE,
    EMAQuantizer,
    ImageTokenizerError,
    ImageTokenizerInfo,
    VQConfig,
    codebook_usage,
    load_image_tokenizer,
    tokenizer_info,
)

__all__ = ["VQ_PRESETS", "EMAQuantizer", "ImageTokenizerError", "ImageTokenizerInfo", "VQConfig", "VQVAE",
           "codebook_usage", "load_image_tokenizer", "tokenizer_info"]
