"""TeRA's job-wide frozen Tucker core and factors (one set per module shape) and its per-module scaling vectors."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer, JobShared, layer_generator
from lorafusion.adapters.tera.config import TeRAConfig

__all__ = ["TeRALayer", "TeRAShared", "tensor_modes"]


def _split(size: int) -> tuple[int, int]:
    """(a, b), a·b = size, a the largest divisor ≤ √size (a prime size gives (1, size))."""
    a = next(d for d in range(math.isqrt(size), 0, -1) if size % d == 0)
    return a, size // a


def tensor_modes(out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """(n₁, n₂, k₁, k₂): ΔW [N, K] as the tensor [n₁, n₂, k₁, k₂] (row i = m·n₂ + n, column j = a·k₂ + b)."""
    return (*_split(out_features), *_split(in_features))


def _shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


class TeRAShared(JobShared):
    """For each distinct (out, in) of the job's targets: core G [r₁, r₂, r₃, r₄] and factors U_m [I_m, r_m], frozen,
    drawn on the CPU from (projection_seed, shape) alone, so every stage and every export reader regenerates them
    bit for bit, whichever targets the job adapts."""

    def __init__(self, config: TeRAConfig, shapes: dict[str, tuple[int, int]], num_layers: int, seed: int) -> None:
        super().__init__(config, shapes, num_layers, seed)
        for out, inp in sorted(set(shapes.values())):
            modes = tensor_modes(out, inp)
            ranks = [min(config.rank, size) for size in modes]
            generator = layer_generator(config.projection_seed, -1, f"tera/{_shape_key(out, inp)}")
            key = _shape_key(out, inp)
            self.register_buffer(f"core_{key}", torch.randn(ranks, generator=generator))
            for m, (size, r) in enumerate(zip(modes, ranks)):
                self.register_buffer(f"factor{m}_{key}", torch.randn(size, r, generator=generator) / math.sqrt(r))

    def factors(self, out_features: int, in_features: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(G, [U₁, U₂, U₃, U₄]) of modules of this shape."""
        key = _shape_key(out_features, in_features)
        return getattr(self, f"core_{key}"), [getattr(self, f"factor{m}_{key}") for m in range(4)]


class TeRALayer(AdapterLayer):
    compute = "delta"

    def __init__(self, config: TeRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 shared: TeRAShared, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, shared=shared, **context)
        self.modes = tensor_modes(out_features, in_features)
        ranks = [min(config.rank, size) for size in self.modes]
        self.tera_lambda_0 = nn.Parameter(torch.zeros(ranks[0]))  # [r₁]: ΔW = 0 at init
        self.tera_lambda_1 = nn.Parameter(torch.ones(ranks[1]))  # [r₂]
        self.tera_lambda_2 = nn.Parameter(torch.ones(ranks[2]))  # [r₃]
        self.tera_lambda_3 = nn.Parameter(torch.ones(ranks[3]))  # [r₄]
        self.scale = 1.0 / math.sqrt(in_features)

    def _scaled_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(G, [U_m diag(λ_m)]) in `dtype`, differentiable in the λ's."""
        core, factors = self.shared.factors(self.out_features, self.in_features)
        lambdas = (self.tera_lambda_0, self.tera_lambda_1, self.tera_lambda_2, self.tera_lambda_3)
        return core.to(dtype), [(u * lam).to(dtype) for u, lam in zip(factors, lambdas)]

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """x ΔWᵀ [T, N] contracted mode by mode (never the dense ΔW): the input's two modes, the core, then the
        output's two modes; every intermediate is [T, ≤ max(K, N, r⁴ / r)]."""
        n1, n2, k1, k2 = self.modes
        core, (f1, f2, f3, f4) = self._scaled_factors(x.dtype)
        t = x.reshape(-1, k1, k2) @ f4  # [T, k₁, r₄]
        t = torch.einsum("taj,ai->tij", t, f3)  # [T, r₃, r₄]
        t = torch.einsum("tij,pqij->tpq", t, core)  # [T, r₁, r₂]
        t = t @ f2.t()  # [T, r₁, n₂]
        t = torch.einsum("tpn,mp->tmn", t, f1)  # [T, n₁, n₂]
        return t.reshape(-1, self.out_features) * self.scale

    def delta_weight(self) -> torch.Tensor:
        core, (f1, f2, f3, f4) = self._scaled_factors(torch.float32)
        dense = torch.einsum("pqij,mp,nq,ai,bj->mnab", core, f1, f2, f3, f4)  # [n₁, n₂, k₁, k₂]
        return dense.reshape(self.out_features, self.in_features) * self.scale

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {f"tera_lambda_{m}": getattr(self, f"tera_lambda_{m}").detach() for m in range(4)}
