"""The image tokenizer of text-to-image generation: a VQ-VAE turning images into grids of codes."""

from megatron_m6.vision.vq import VQ_PRESETS, VQVAE, EMAQuantizer, VQConfig, codebook_usage

__all__ = ["VQ_PRESETS", "EMAQuantizer", "VQConfig", "VQVAE", "codebook_usage"]
