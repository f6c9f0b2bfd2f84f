"""Device functions shared by the fused LoRA kernels, and the host-side choices they depend on."""

from __future__ import annotations

import torch
import triton.language as tl

from lorafusion.ops.utils import interpret_mode, jit_helper, next_pow2

__all__ = ["dot_args", "rank_block"]


@jit_helper
def _dropout_uniform(seeds, pos, cols, site_id):
    """Uniform [0, 1) per (row, column): Philox4x32-10 keyed by the row's sample seed, with counter
    (column, row index within the sample, layer site id, 0). seeds [BM] int64, pos [BM], cols [BK]."""
    zero = (pos[:, None] * 0 + cols[None, :] * 0).to(tl.uint32)
    c0 = zero + cols[None, :].to(tl.uint32)
    c1 = zero + pos[:, None].to(tl.uint32)
    c2 = (zero + site_id).to(tl.uint32)
    c3 = zero
    k0 = zero + (seeds & 0xFFFFFFFF).to(tl.uint32)[:, None]
    k1 = zero + ((seeds >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
    for _ in tl.static_range(10):  # the round and key constants of Philox4x32 (Salmon et al., SC'11)
        prev0, prev2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, prev2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, prev0) ^ c3 ^ k1
        c1 = tl.mul(0xCD9E8D57, prev2, sanitize_overflow=False)
        c3 = tl.mul(0xD2511F53, prev0, sanitize_overflow=False)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)  # top 24 bits: exact in fp32, < 1


@jit_helper
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; DOT_FP32 upcasts the operands first (interpreter only, see dot_args)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def dot_args(dtype: torch.dtype) -> dict:
    """The tl.dot settings every kernel takes.

    fp32 inputs multiply in full precision ("ieee"): tf32 would miss the fp32 parity bounds; 16-bit inputs
    ignore the setting. The Triton 3.9 interpreter multiplies bf16 operands as raw integers (a 16x16 bf16
    tl.dot returns ~1e10), so under TRITON_INTERPRET the operands are upcast to fp32 first; compiled
    kernels keep native bf16/fp16 tensor-core dots.
    """
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_FP32": interpret_mode() and dtype == torch.bfloat16}


def rank_block(max_rank: int) -> int:
    """Rank columns per inner step: the whole rank up to 64 (≥ 16, tl.dot's minimum), larger ranks loop."""
    return min(64, max(16, next_pow2(max_rank)))
