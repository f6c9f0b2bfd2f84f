"""Base models: HF checkpoint directories → megatron-core GPTModel (CPU or GPU)."""

from lorafusion.models.builder import build_model, fc1_rows, qkv_rows
from lorafusion.models.hf import Architecture, read_architecture

__all__ = ["Architecture", "build_model", "fc1_rows", "qkv_rows", "read_architecture"]
