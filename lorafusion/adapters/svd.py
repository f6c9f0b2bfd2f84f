"""Truncated SVDs, one home for every variant and tool that needs one: of a dense ΔW (exact, or randomized where that
pays), of a low-rank ΔW given by its factors (exact, without forming the N×K matrix), and the best rank-R LoRA built
from them (LoRA-Squeeze, the truncated-SVD export of variants without an exact one).

Every function returns (U [N, t], S [t], Vh [t, K]) with ΔW ≈ U diag(S) Vh, singular values descending; t ≤ the
rank asked for (a factored ΔW of inner rank r has at most r non-zero singular values).
"""

from __future__ import annotations

import torch

__all__ = ["SVD_METHODS", "RANDOMIZED_MIN_DIM", "OVERSAMPLE", "POWER_ITERATIONS", "svd_method", "dense_svd",
           "randomized_svd", "factor_svd", "best_lora"]

SVD_METHODS = ("auto", "exact", "randomized")

# Randomized SVD is used for a dense ΔW when min(N, K) ≥ RANDOMIZED_MIN_DIM and the sketch (rank + OVERSAMPLE
# columns) is at most a quarter of min(N, K). Below that size the exact SVD is cheap and exact; above it its
# O(N·K·min(N, K)) cost grows cubically with the model's width, while each sketch pass costs O(N·K·(rank + OVERSAMPLE))
# (timings in docs/variants.md, "LoRA-Squeeze").
RANDOMIZED_MIN_DIM = 1024
OVERSAMPLE = 10
"""Extra sketch columns beyond the rank (Halko, Martinsson & Tropp 2011, §4.2: 5-10 give near-optimal ranges)."""
POWER_ITERATIONS = 4
"""Subspace iterations: the error approaches the optimum as the spectrum's gap is raised to the 2q+1 power; full-rank
updates (SHiRA, RandLoRA) decay slowly, so more than torch.svd_lowrank's 2."""


def svd_method(shape: tuple[int, int], rank: int, method: str = "auto") -> str:
    """'exact' or 'randomized' for a dense ΔW of `shape` truncated to `rank` ('auto': see RANDOMIZED_MIN_DIM)."""
    if method != "auto":
        return method
    small = min(shape)
    return "randomized" if small >= RANDOMIZED_MIN_DIM and 4 * (rank + OVERSAMPLE) <= small else "exact"


def dense_svd(delta: torch.Tensor, rank: int, method: str = "auto", seed: int = 0):
    """Rank-`rank` truncated SVD of ΔW [N, K] (fp32) by `svd_method`; the randomized sketch is drawn from `seed`."""
    if svd_method(tuple(delta.shape), rank, method) == "randomized":
        return randomized_svd(delta, rank, seed)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def randomized_svd(matrix: torch.Tensor, rank: int, seed: int = 0, width: int | None = None):
    """torch.svd_lowrank (Halko-Martinsson-Tropp: a Gaussian sketch of `width` columns, default rank + OVERSAMPLE,
    POWER_ITERATIONS subspace iterations re-orthonormalised each half-step, then the exact SVD of the small projected
    matrix), in fp32, under an RNG seeded with `seed` that leaves the global one as it was: deterministic."""
    width = min(width or rank + OVERSAMPLE, *matrix.shape)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix.float(), q=width, niter=POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v.t()[:rank]


def factor_svd(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int):
    """Truncated SVD of ΔW = scale · B A (A [r, K], B [N, r]) from thin QRs of the factors: B = Q_b R_b, Aᵀ = Q_a R_a
    give ΔW = Q_b (scale · R_b R_aᵀ) Q_aᵀ, so only the small core is decomposed; cost O((N + K) r²), exact."""
    q_b, r_b = torch.linalg.qr(b.float())  # [N, m], [m, r]
    q_a, r_a = torch.linalg.qr(a.float().t())  # [K, m'], [m', r]
    u_core, s, vh_core = torch.linalg.svd(scale * (r_b @ r_a.t()), full_matrices=False)  # core [m, m']
    rank = min(rank, s.shape[0])
    return q_b @ u_core[:, :rank], s[:rank], vh_core[:rank] @ q_a.t()


def best_lora(delta: torch.Tensor, rank: int, *, factors: tuple[torch.Tensor, torch.Tensor, float] | None = None,
              method: str = "auto", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(A [rank, K], B [N, rank], relative error, method) of the best rank-`rank` LoRA of ΔW [N, K] at scaling 1
    (Eckart–Young: B = U S, A = Vᵀ, as peft's convert_to_lora writes it). `factors` (A, B, s) of a ΔW = s·B A
    take the exact factored SVD; else `method` ('auto', 'exact', 'randomized'). Directions beyond ΔW's own rank are
    zero rows of A and columns of B; the error ‖ΔW − B A‖ / ‖ΔW‖ (0 for ΔW = 0) is measured on the product."""
    delta = delta.detach().float()
    if factors is not None:
        a, b, scale = factors
        (u, s, vh), method = factor_svd(a.detach(), b.detach(), scale, rank), "factors"
    else:
        method = svd_method(tuple(delta.shape), rank, method)
        u, s, vh = dense_svd(delta, rank, method, seed)
    kept = s.shape[0]
    a_out = torch.zeros(rank, delta.shape[1], device=delta.device)
    b_out = torch.zeros(delta.shape[0], rank, device=delta.device)
    a_out[:kept], b_out[:, :kept] = vh, u * s
    norm = torch.linalg.norm(delta)
    error = float(torch.linalg.norm(delta - b_out @ a_out) / norm) if norm > 0 else 0.0
    return a_out, b_out, error, method
