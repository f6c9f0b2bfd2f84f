"""What every adapter variant provides: a config class and a per-(job, target module) layer."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["TARGET_MODULES", "AdapterConfig", "AdapterLayer", "layer_generator"]

# HF module names of a Llama-style decoder layer that an adapter can wrap.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every variant shares. Subclasses add their own and set `type`."""

    type: ClassVar[str] = ""
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    """HF module names to adapt, any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ValueError(f"adapter.target_modules is empty; list at least one of {list(TARGET_MODULES)}")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown:
            raise ValueError(
                f"adapter.target_modules has {unknown}, which the model does not have; "
                f"choose from {list(TARGET_MODULES)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"adapter.target_modules={self.target_modules} lists a module twice; list each once")
        self.target_modules = [m for m in TARGET_MODULES if m in self.target_modules]

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON view: `{type: ..., field: value, ...}`."""
        return {"type": self.type, **asdict(self)}


class AdapterLayer(nn.Module):
    """One job's adapter on one HF target module (in_features K → out_features N).

    A variant that runs through the fused low-rank path only needs `effective_factors`.
    """

    config: AdapterConfig

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, K], B [N, r], scale) with delta(x) = scale · dropout(x) Aᵀ Bᵀ."""
        raise NotImplementedError

    @property
    def dropout_p(self) -> float:
        return 0.0

    def delta_weight(self) -> torch.Tensor:
        """ΔW [N, K] that this adapter adds to the frozen weight."""
        a, b, scale = self.effective_factors()
        return scale * (b @ a)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under the PEFT module name, e.g. {'lora_A.weight': A, 'lora_B.weight': B}."""
        raise NotImplementedError

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `peft_tensors` (shapes are checked by the caller)."""
        raise NotImplementedError


def layer_generator(seed: int, layer_index: int, target: str) -> torch.Generator:
    """A generator for one (job seed, global layer, target) adapter init.

    Derived only from the job's own seed and the layer's global position, so a job's initial adapter
    does not depend on which other jobs share the run, nor on how layers are split into stages.
    """
    digest = hashlib.sha256(f"{seed}/{layer_index}/{target}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
