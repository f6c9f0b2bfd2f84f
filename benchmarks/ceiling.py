"""The GEMM-bound ceiling of a LoRA training run: its matrix-product FLOPs per real token, and the matmul rate this
process reaches at the run's own shapes. A step can go no faster than ceiling = rate / FLOPs per token; a run's
tokens/s divided by it is the fraction of that bound it reaches (the rest is everything that is not a GEMM).

FLOPs per real token (2 per multiply-add), for a frozen base model trained through LoRA adapters:
- each base linear [N, K] and the LM head: forward x Wᵀ and the input gradient dy W (no weight gradient: frozen);
- each adapted module of rank r: forward x̂ Aᵀ and T Bᵀ, backward dyᵀT (dB), dy B, Gᵀx̂ (dA), G A (dx):
  6 r (K + N);
- causal attention of a sample of length L, per head of width d: QKᵀ and PV forward, four products backward, each
  over L²/2 pairs: 6 L² d per head, charged to the sample's L tokens.
Every product is charged at the rate measured for the base linears, so the bound is optimistic for the skinny
LoRA products and for attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["ModelDims", "flops_per_token", "matmul_rate", "Ceiling", "ceiling"]


@dataclass(frozen=True)
class ModelDims:
    """The widths of a Llama-style decoder that fix its FLOPs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """HF module -> (N, K) of one decoder layer's linears."""
        h, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def flops_per_token(dims: ModelDims, rank: int, target_modules: list[str], lengths: list[int]) -> float:
    """Training FLOPs per real token (see the module docstring), for samples of `lengths`."""
    linears = dims.linears()
    base = sum(4 * n * k for n, k in linears.values()) * dims.num_layers + 4 * dims.hidden_size * dims.vocab_size
    lora = sum(6 * rank * (n + k) for name, (n, k) in linears.items() if name in target_modules) * dims.num_layers
    tokens = sum(lengths)
    attention = 6 * dims.head_dim * dims.num_heads * dims.num_layers * sum(n * n for n in lengths) / tokens
    return float(base + lora + attention)


def matmul_rate(dims: ModelDims, rows: int, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """FLOP/s of this process's matrix products at the run's shapes: x Wᵀ and dy W of one layer's fused linears
    (qkv, o, gate+up, down) and the LM head, for `rows` tokens; the best of `repeats` timings."""
    h, f = dims.hidden_size, dims.intermediate_size
    qkv = h + 2 * dims.num_kv_heads * dims.head_dim
    shapes = [(qkv, h), (h, h), (2 * f, h), (h, f), (dims.vocab_size, h)]
    gen = torch.Generator(device=device).manual_seed(0)
    operands = []
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen, device=device).to(dtype)
        operands += [(torch.randn(rows, k, generator=gen, device=device).to(dtype), w.t()),
                     (torch.randn(rows, n, generator=gen, device=device).to(dtype), w)]
    flops = sum(2 * rows * a.shape[1] * b.shape[1] for a, b in operands)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        for a, b in operands:
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - tic)
    return flops / best


@dataclass(frozen=True)
class Ceiling:
    flops_per_token: float
    matmul_flops_per_s: float
    """one stage's rate: the threads (or the GPU) one pipeline stage computes with"""
    stages: int = 1
    """pipeline stages computing at once, each on its own cores or GPU at matmul_flops_per_s"""

    @property
    def tokens_per_s(self) -> float:
        return self.stages * self.matmul_flops_per_s / self.flops_per_token


def ceiling(dims: ModelDims, rank: int, target_modules: list[str], lengths: list[int], rows: int,
            dtype: torch.dtype, device: torch.device, stages: int = 1) -> Ceiling:
    """The run's GEMM-bound ceiling, one stage's matmul rate measured now in this process (the calling thread's
    torch thread count: one stage's), times the `stages` that compute at once."""
    return Ceiling(flops_per_token(dims, rank, target_modules, lengths), matmul_rate(dims, rows, dtype, device),
                   stages)
