"""DoRA's per-job layer: LoRA's factors plus a trainable magnitude per output row, applied as a column scale."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.dora.config import DoRAConfig
from lorafusion.adapters.lora import LoRALayer

__all__ = ["DoRALayer"]


class DoRALayer(LoRALayer):
    peft_key_aliases = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}

    def __init__(self, config: DoRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 base, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, base=base, **context)
        # m = ‖W + s·B A‖_row with B = 0 at init
        self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(base.weight().float(), dim=1))  # [N]

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row [N], fp32, detached (no gradient flows through the norm)."""
        with torch.no_grad():
            merged = self.base.weight().float().addmm(self.lora_B.float(), self.lora_A.float(),
                                                      alpha=self.config.scaling)
            return torch.linalg.norm(merged, dim=1)

    def column_scale(self) -> torch.Tensor:
        return self.lora_magnitude_vector / self.weight_norm()

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    def delta_weight(self) -> torch.Tensor:
        """ΔW = c ⊙ (W + s·B A) − W: what merging this adapter adds to W."""
        w = self.base.weight().float()
        merged = w + self.config.scaling * (self.lora_B @ self.lora_A)
        return self.column_scale()[:, None] * merged - w
