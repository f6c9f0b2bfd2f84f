"""RandLoRA's job-wide random bases and its per-module trainable scalings λ, γ."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafusion.adapters.base import AdapterLayer, JobShared
from lorafusion.adapters.randlora.config import RandLoRAConfig

__all__ = ["RandLoRAShared", "RandLoRALayer", "basis_dtype"]


def basis_dtype() -> torch.dtype:
    """The half dtype PEFT draws dense bases in: bfloat16 where accelerate reports it available (every CPU,
    CUDA GPUs that support it), float16 on older GPUs. The drawn values depend on it, which is why exports carry
    the bases."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _kaiming(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=math.sqrt(5), generator=generator)


def _num_bases(min_dim: int, rank: int) -> int:
    return -(-min_dim // rank)  # enough rank-`rank` bases for full rank


class RandLoRAShared(JobShared):
    """randlora_A [rank, 1, min dim] and randlora_B [max dim, bases, rank] over the job's targets, drawn as PEFT
    draws them from projection_seed (A first, then one [max dim, 1, rank] block per basis; each divided by its
    std), kept in fp32."""

    def __init__(self, config: RandLoRAConfig, shapes: dict[str, tuple[int, int]], num_layers: int, seed: int) -> None:
        super().__init__(config, shapes, num_layers, seed)
        max_out, max_in = (max(dims) for dims in zip(*shapes.values()))
        big, small = max(max_out, max_in), min(max_out, max_in)
        bases, r = _num_bases(small, config.rank), config.rank
        generator = torch.Generator("cpu").manual_seed(config.projection_seed)
        if config.sparse:
            a, b = self._ternary((r, 1, small), (big, bases, r), generator)
        else:
            dtype = basis_dtype()
            a = _kaiming((r, 1, small), generator, dtype)
            b = torch.cat([_kaiming((big, 1, r), generator, dtype) for _ in range(bases)], dim=1)
        self.register_buffer("randlora_A", (a / a.std()).float())
        self.register_buffer("randlora_B", (b / b.std()).float())

    @staticmethod
    def _ternary(shape_a, shape_b, generator: torch.Generator, sparsity: float = 3.0):
        """PEFT's sparse bases: uniform draws thresholded to −1 / 0 / 1 (each sign with probability 1/(2·sparsity))."""
        out = []
        for shape in (shape_a, shape_b):
            draw = torch.rand(shape, generator=generator)
            basis = torch.zeros(shape)
            basis[draw < 1 / (2 * sparsity)] = -1
            basis[draw > 1 - 1 / (2 * sparsity)] = 1
            out.append(basis)
        return out

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"base_model.randlora_A": self.randlora_A, "base_model.randlora_B": self.randlora_B}

    def optional_peft_keys(self) -> tuple[str, ...]:
        return ("base_model.randlora_A", "base_model.randlora_B")  # save_projection=False: regenerated


class RandLoRALayer(AdapterLayer):
    compute = "delta"
    peft_extra_keys = ("randlora_A", "randlora_B")  # PEFT's per-module copies of the shared bases

    def __init__(self, config: RandLoRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 shared: RandLoRAShared, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, shared=shared, **context)
        self.min_dim, self.max_dim = min(in_features, out_features), max(in_features, out_features)
        self.bases = _num_bases(self.min_dim, config.rank)
        self.randlora_lambda = nn.Parameter(torch.zeros(config.rank, self.bases))  # [r, bases]
        self.randlora_gamma = nn.Parameter(torch.full((self.bases, self.min_dim), 1.0 / max(self.bases, self.min_dim)))

    def scaled_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) with delta(x) = scale · (x Pᵀ) Qᵀ: PEFT's flattened A (row k·bases + b) and B (column b·r + k)."""
        shared = self.shared
        lam, gamma = self.randlora_lambda, self.randlora_gamma
        a = shared.randlora_A[:, :, :self.min_dim]  # [r, 1, min]
        scaled_a = (lam[:, :, None] * a * gamma[None]).flatten(0, 1)  # [r·bases, min]
        flat_b = shared.randlora_B[:self.max_dim, :self.bases, :].flatten(1)  # [max, bases·r]
        if self.min_dim == self.in_features:
            return scaled_a, flat_b
        return flat_b.t(), scaled_a.t()

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.scaled_bases()
        return F.linear(F.linear(x, p.to(x.dtype)), q.to(x.dtype)) * self.config.scaling

    def delta_weight(self) -> torch.Tensor:
        p, q = self.scaled_bases()
        return self.config.scaling * (q @ p)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda.detach(), "randlora_gamma": self.randlora_gamma.detach()}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """λ and γ; PEFT's per-module copies of the bases must equal the job's shared ones."""
        shared = self.shared
        for key in self.peft_extra_keys:
            if key in tensors and not torch.equal(tensors[key].to(shared.randlora_A.device), getattr(shared, key)):
                raise ValueError(f"{key} of this module differs from base_model.{key}; RandLoRA's bases are shared "
                                 "by all modules, the file is inconsistent")
        super().load_peft_tensors({k: v for k, v in tensors.items() if k not in self.peft_extra_keys})
