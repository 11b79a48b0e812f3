"""Chinese WordPiece tokenizer with M6's special tokens and span sentinels."""

from megatron_m6.tokenizer.tokenizer import DEFAULT_VOCAB_FILE, ImageCodeTokens, M6Tokenizer, build_vocab

__all__ = ["DEFAULT_VOCAB_FILE", "ImageCodeTokens", "M6Tokenizer", "build_vocab"]
