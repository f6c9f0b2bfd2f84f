"""Datasets for LoRA jobs: tokenizers, datasets (JSONL, Parquet, Arrow, saved HF folders) read into labelled
samples, and per-job order."""

from lorafusion.data.dataset import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    OVERFLOW_MODES,
    Sample,
    SampleStream,
    load_dataset,
)
from lorafusion.data.tokenizer import (
    DEFAULT_BOS_TOKEN,
    DEFAULT_EOS_TOKEN,
    DEFAULT_PAD_TOKEN,
    TextTokenizer,
    build_byte_level_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

__all__ = [
    "DEFAULT_BOS_TOKEN",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_EOS_TOKEN",
    "DEFAULT_PAD_TOKEN",
    "IGNORE_INDEX",
    "OVERFLOW_MODES",
    "Sample",
    "SampleStream",
    "TextTokenizer",
    "build_byte_level_tokenizer",
    "load_dataset",
    "load_tokenizer",
    "save_tokenizer",
]
