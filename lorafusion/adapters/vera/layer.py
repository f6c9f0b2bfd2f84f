"""VeRA's job-wide frozen projections and its per-module scaling vectors."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer, JobShared
from lorafusion.adapters.vera.config import VeRAConfig

__all__ = ["VeRAShared", "VeRALayer"]


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init: U(−b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAShared(JobShared):
    """vera_A [rank, max in] and vera_B [max out, rank] over the job's targets, drawn in that order from one CPU
    generator seeded with projection_seed (bit-identical to PEFT's)."""

    def __init__(self, config: VeRAConfig, shapes: dict[str, tuple[int, int]], num_layers: int, seed: int) -> None:
        super().__init__(config, shapes, num_layers, seed)
        max_out, max_in = (max(dims) for dims in zip(*shapes.values()))
        generator = torch.Generator("cpu").manual_seed(config.projection_seed)
        self.register_buffer("vera_A", _kaiming_uniform((config.rank, max_in), generator))
        self.register_buffer("vera_B", _kaiming_uniform((max_out, config.rank), generator))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"base_model.vera_A": self.vera_A, "base_model.vera_B": self.vera_B}

    def optional_peft_keys(self) -> tuple[str, ...]:
        return ("base_model.vera_A", "base_model.vera_B")  # PEFT's save_projection=False leaves them out


class VeRALayer(AdapterLayer):
    def __init__(self, config: VeRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 shared: VeRAShared, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, shared=shared, **context)
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))  # [N]
        self.vera_lambda_d = nn.Parameter(torch.full((config.rank,), float(config.d_initial)))  # [r]

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        shared = self.shared
        a = self.vera_lambda_d[:, None] * shared.vera_A[:, :self.in_features]  # [r, K]
        b = self.vera_lambda_b[:, None] * shared.vera_B[:self.out_features]  # [N, r]
        return a, b, 1.0

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}
