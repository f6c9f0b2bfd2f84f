"""Device functions shared by the fused LoRA kernels, and the host-side choices they depend on."""

from __future__ import annotations

import torch
import triton.language as tl

from lorafusion.ops.utils import interpret_mode, jit_helper, next_pow2

__all__ = ["dot_args", "rank_block"]


@jit_helper
def _dropout_uniform(seeds, pos, k0, site_id, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Uniform [0, 1) for BLOCK_M rows x columns [k0, k0 + BLOCK_K), k0 a multiple of 4.

    One Philox4x32-10 call per 4 columns: key = the row's sample seed (int64 split in two words), counter =
    (column // 4, row index within the sample, layer site id, 0); its outputs 0..3 go to columns 4j..4j+3.
    seeds [BLOCK_M] int64, pos [BLOCK_M] int32. The mask of a row is thus a function of its sample's
    seed, the layer, its place in the sample and the column only.
    """
    quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    zero = (pos[:, None] * 0 + quads[None, :] * 0).to(tl.uint32)
    c0 = zero + quads[None, :].to(tl.uint32)
    c1 = zero + pos[:, None].to(tl.uint32)
    c2 = (zero + site_id).to(tl.uint32)
    c3 = zero
    key0 = zero + (seeds & 0xFFFFFFFF).to(tl.uint32)[:, None]
    key1 = zero + ((seeds >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
    for _ in tl.static_range(10):  # the round and key constants of Philox4x32 (Salmon et al., SC'11)
        prev0, prev2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, prev2) ^ c1 ^ key0
        c2 = tl.umulhi(0xD2511F53, prev0) ^ c3 ^ key1
        c1 = tl.mul(0xCD9E8D57, prev2, sanitize_overflow=False)
        c3 = tl.mul(0xD2511F53, prev0, sanitize_overflow=False)
        key0 = key0 + 0x9E3779B9
        key1 = key1 + 0xBB67AE85
    # [BLOCK_M, BLOCK_K / 4, 2, 2] with [.., j, a, b] = output 2a + b, flattened row-major: column 4j + 2a + b
    words = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK_M, BLOCK_K))
    return (words >> 8).to(tl.float32) * (1.0 / 16777216.0)  # top 24 bits: exact in fp32, < 1


@jit_helper
def _tile_segments(row_seg_ptr, pid_m, M, BLOCK_M: tl.constexpr):
    """[seg_lo, seg_hi): the segments that M tile `pid_m` overlaps, read from row_seg at its first and last row."""
    seg_lo = tl.load(row_seg_ptr + pid_m * BLOCK_M)
    seg_hi = tl.load(row_seg_ptr + tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) + 1
    return seg_lo, seg_hi


@jit_helper
def _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok):
    """Mask of the `rows` (valid where row_ok) that lie in segment `seg`'s [start, end)."""
    return row_ok & (rows >= tl.load(seg_start_ptr + seg)) & (rows < tl.load(seg_end_ptr + seg))


@jit_helper
def _segment_column_scale(c_ptr, cidx_ptr, seg, cols, col_ok, stride_cs, stride_cn):
    """(c [BLOCK_N] fp32, ci): segment `seg`'s row ci of c_cat at `cols`, and c = 1.0 where it has none (ci = −1)."""
    ci = tl.load(cidx_ptr + seg)
    c = tl.load(c_ptr + tl.maximum(ci, 0).to(tl.int64) * stride_cs + cols * stride_cn,
                mask=col_ok & ((cols * 0 + ci) >= 0), other=1.0)
    return c.to(tl.float32), ci


@jit_helper
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m as int64, pid_n) of program `pid` over an [M, N] output in grouped order: GROUP_M row tiles
    share each column band of the weight while it is in L2."""
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % (GROUP_M * tiles_n)) % group_size).to(tl.int64)
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size
    return pid_m, pid_n


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
