"""The image tokenizer of text-to-image generation: a VQ-VAE turning images into grids of codes."""

from megatron_m6.vision.pixels import image_tensor, tensor_to_image
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
           "codebook_usage", "image_tensor", "load_image_tokenizer", "tensor_to_image", "tokenizer_info"]
