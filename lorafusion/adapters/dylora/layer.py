"""DyLoRA's job-wide sampled rank and its per-module factors, masked to the rank in use."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer, JobShared
from lorafusion.adapters.dylora.config import DyLoRAConfig
from lorafusion.adapters.lora import kaiming_a

__all__ = ["DyLoRAShared", "DyLoRALayer", "sampled_rank"]


def sampled_rank(seed: int, step: int, rank: int) -> int:
    """The rank b ~ U{1..rank} that optimizer step `step` (1-based) of a job seeded `seed` trains: a function of
    (seed, step) alone, so it needs no generator state and a resume at any step draws what an uninterrupted run
    does."""
    digest = hashlib.sha256(f"dylora/{seed}/{step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return int(torch.randint(1, rank + 1, (), generator=generator))


class DyLoRAShared(JobShared):
    """The rank of the step being trained, one for all the job's layers, set for the next step after each step."""

    def __init__(self, config: DyLoRAConfig, shapes: dict[str, tuple[int, int]], num_layers: int, seed: int) -> None:
        super().__init__(config, shapes, num_layers, seed)
        self.seed = seed
        # A frozen parameter, so it is part of the job's checkpointed state (a resume continues with the step's
        # rank), and its in-place change invalidates the layers' cached factors (watched_parameters).
        self.dylora_rank = nn.Parameter(torch.tensor(sampled_rank(seed, 1, config.rank)), requires_grad=False)

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.dylora_rank.fill_(sampled_rank(self.seed, step + 1, self.config.rank))


class DyLoRALayer(AdapterLayer):
    def __init__(self, config: DyLoRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 shared: DyLoRAShared, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, shared=shared, **context)
        self.lora_A = nn.Parameter(kaiming_a(config.rank, in_features, generator))  # [r, K]
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank))  # [N, r]
        self.register_buffer("positions", torch.arange(1, config.rank + 1), persistent=False)  # [r]: 1..r

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """In training, the step's sampled rank b: the factors kept [r, K] and [N, r] with the components past b
        zeroed and alpha / b folded into B (the same shapes every step, and no host sync to read b). At evaluation,
        the exported LoRA's: the first export_rank components, scale alpha / export_rank."""
        if not self.training:
            rank = self.config.export_rank
            return self.lora_A[:rank], self.lora_B[:, :rank], self.config.export_config().scaling
        a, b, rank = self.lora_A, self.lora_B, self.shared.dylora_rank
        if self.config.frozen:  # only component b learns this step
            learns = self.positions == rank
            a = torch.where(learns[:, None], a, a.detach())
            b = torch.where(learns[None, :], b, b.detach())
        keep = (self.positions <= rank).to(a.dtype)  # [r]
        return a * keep[:, None], b * (keep * (self.config.alpha / rank.to(a.dtype))), 1.0

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        rank = self.config.export_rank
        return {"lora_A.weight": self.lora_A.detach()[:rank], "lora_B.weight": self.lora_B.detach()[:, :rank]}
