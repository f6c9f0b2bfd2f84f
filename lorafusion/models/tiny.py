"""Tiny random HF-format checkpoints (config.json + model.safetensors + byte-level tokenizer).

Tests and the demo need real checkpoint directories but cannot download one; these are built here
with the same file layout and tensor names as the Hugging Face originals.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafusion.models.hf import Architecture, expected_shapes, read_architecture

__all__ = ["make_tiny_checkpoint"]

_FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "mistral": ("MistralForCausalLM", "mistral"),
}


def _config(family: str, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
            num_heads: int, num_kv_heads: int, tie: bool, rope_theta: float, max_positions: int,
            bos_id: int, eos_id: int) -> dict:
    arch, model_type = _FAMILIES[family]
    cfg = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": tie,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    if family in ("qwen2", "mistral"):
        cfg["sliding_window"] = None
        cfg["use_sliding_window"] = False
    return cfg


def _weights(arch: Architecture, generator: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    """Random tensors for every name and shape the loader expects (one source of truth: expected_shapes)."""
    tensors = {}
    for name, shape in expected_shapes(arch).items():
        if name.endswith("norm.weight"):
            # Not all-ones, so a norm weight that is loaded wrongly shows up in the parity tests.
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * std
    return tensors


def make_tiny_checkpoint(
    directory: str | Path,
    *,
    family: str = "llama",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
    init_std: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write a random Llama-style checkpoint with a byte-level tokenizer into `directory`."""
    from lorafusion.data.tokenizer import build_byte_level_tokenizer, save_tokenizer

    if family not in _FAMILIES:
        raise ValueError(f"family={family!r} is not one of {sorted(_FAMILIES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_level_tokenizer()
    cfg = _config(
        family, vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, tie=tie_word_embeddings, rope_theta=rope_theta,
        max_positions=max_position_embeddings,
        bos_id=tokenizer.token_to_id("<|bos|>"), eos_id=tokenizer.token_to_id("<|eos|>"),
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    generator = torch.Generator().manual_seed(seed)
    weights = _weights(read_architecture(directory), generator, init_std)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(directory, tokenizer)
    return directory
