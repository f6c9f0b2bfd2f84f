"""Plain torch autograd versions of the fused ops: the ground truth for tests and the baselines for benchmarks."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["lora_linear_reference", "multi_lora_linear_reference", "lora_linear_addmm"]


def _dropout(x: torch.Tensor, p: float, keep_mask: torch.Tensor | None) -> torch.Tensor:
    if keep_mask is not None:
        return x * keep_mask.to(x.dtype) / (1.0 - p)
    return F.dropout(x, p) if p > 0.0 else x


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                          scaling: float, dropout_p: float = 0.0, bias: torch.Tensor | None = None,
                          keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's unfused LoRA layer: base linear + dropout + A + B + add. keep_mask [..., K] replaces the random mask."""
    x_hat = _dropout(x, dropout_p, keep_mask)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_hat, lora_a), lora_b)


def lora_linear_addmm(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                      scaling: float, dropout_p: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Partial fusion in torch: the LoRA-B product accumulates into the base output with one addmm."""
    flat = x.reshape(-1, x.shape[-1])
    s = F.linear(_dropout(flat, dropout_p, None), lora_a)  # [M, r]
    y = torch.addmm(F.linear(flat, weight, bias), s, lora_b.t(), alpha=scaling)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def multi_lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: Sequence[torch.Tensor | None],
                                lora_b: Sequence[torch.Tensor | None], segments: Sequence[tuple[int, int]], *,
                                scalings: Sequence[float], dropout_ps: Sequence[float], bias: torch.Tensor | None = None,
                                keep_mask: torch.Tensor | None = None,
                                column_scales: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Base linear over all rows, then each segment's LoRA update on its rows [start, end) only; a segment with a
    column scale c gets c ⊙ (base + update) + bias."""
    flat = x.reshape(-1, x.shape[-1])
    out = F.linear(flat, weight)
    pieces, cursor = [], 0
    column_scales = column_scales or [None] * len(segments)
    for (start, end), a, b, s, p, c in zip(segments, lora_a, lora_b, scalings, dropout_ps, column_scales):
        pieces.append(out[cursor:start])
        rows = out[start:end]
        if a is not None:
            mask = keep_mask[start:end] if keep_mask is not None else None
            rows = rows + s * F.linear(F.linear(_dropout(flat[start:end], p, mask), a), b)
        if c is not None:
            rows = rows * c
        pieces.append(rows)
        cursor = end
    pieces.append(out[cursor:])
    y = torch.cat(pieces)
    return (y if bias is None else y + bias).reshape(*x.shape[:-1], weight.shape[0])
