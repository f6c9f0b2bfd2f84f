"""Model-shape registry for benchmarks: the linear layers of the models the paper and our targets name."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "MODELS", "linear_shapes", "scaled"]


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's widths (from each model's HF config.json)."""

    name: str
    hidden_size: int
    intermediate_size: int


MODELS = {
    "llama-3.1-8b": ModelShape("Llama-3.1-8B", 4096, 14336),
    "qwen2.5-32b": ModelShape("Qwen2.5-32B", 5120, 27648),
    "llama-3.1-70b": ModelShape("Llama-3.1-70B", 8192, 28672),
}


def linear_shapes(model: ModelShape) -> dict[str, tuple[int, int]]:
    """Layer name -> (N, K) of the adapted linears: o_proj (square), up_proj and down_proj."""
    h, i = model.hidden_size, model.intermediate_size
    return {"o_proj": (h, h), "up_proj": (i, h), "down_proj": (h, i)}


def scaled(model: ModelShape, divisor: int) -> ModelShape:
    """The same aspect ratios, every width divided by `divisor` (CPU smoke runs)."""
    return ModelShape(f"{model.name}/{divisor}", model.hidden_size // divisor, model.intermediate_size // divisor)
