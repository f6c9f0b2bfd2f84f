"""Forward GEMM with the LoRA up-projection fused into its epilogue: y = x Wᵀ + T Bᵀ (+ bias).

T = s · dropout(x) Aᵀ is [M, r] (from fused_lora_dropout_xa); adding T Bᵀ to the base accumulator
before the single store means no [M, N] LoRA tensor is ever written or read back.

A segment may also carry a per-column output scale c (DoRA's m / ‖W + sBA‖): its rows become
c ⊙ (x Wᵀ + T Bᵀ) + bias, and their value before the scale is saved (compactly, only those rows) for the
scale's gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafusion.ops.kernel_helpers import (
    _grouped_tile, _mma, _segment_column_scale, _segment_rows, _tile_segments, dot_args, rank_block,
)
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import TileConfig, lazy_kernel

__all__ = ["xw_sb_forward"]


@lazy_kernel
def _xw_sb_fwd_kernel(
    x_ptr, w_ptr, t_ptr, b_ptr, bias_ptr, y_ptr, c_ptr, pre_ptr,
    seg_start_ptr, seg_end_ptr, row_seg_ptr, rank_ptr, roff_ptr, cidx_ptr, preoff_ptr,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_bn, stride_br, stride_ym, stride_yn,
    stride_cs, stride_cn, stride_pm, stride_pn,
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N] = Wᵀ tile
        acc = _mma(x, w, acc, DOT_PRECISION, DOT_FP32)
    seg_lo, seg_hi = _tile_segments(row_seg_ptr, pid_m, M, BLOCK_M)
    for seg in range(seg_lo, seg_hi):
        in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
        rank = tl.load(rank_ptr + seg)
        roff = tl.load(roff_ptr + seg)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            t = tl.load(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr,
                        mask=in_seg[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[None, :] * stride_bn + (roff + rr)[:, None] * stride_br,
                        mask=col_ok[None, :] & r_ok[:, None], other=0.0)  # [BLOCK_R, BLOCK_N] = Bᵀ tile
            acc = _mma(t, b, acc, DOT_PRECISION, DOT_FP32)
    if HAS_SCALE:
        scale = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
        for seg in range(seg_lo, seg_hi):
            in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
            c, ci = _segment_column_scale(c_ptr, cidx_ptr, seg, cols, col_ok, stride_cs, stride_cn)
            scaled = in_seg & ((rows * 0 + ci) >= 0)
            scale = tl.where(scaled[:, None], c[None, :], scale)
            pre_rows = tl.load(preoff_ptr + seg).to(tl.int64) + rows - tl.load(seg_start_ptr + seg)
            tl.store(pre_ptr + pre_rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                     acc.to(pre_ptr.dtype.element_ty), mask=scaled[:, None] & col_ok[None, :])
        acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def xw_sb_forward(x: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, b_cat: torch.Tensor, bias: torch.Tensor | None,
                  table: SegmentTable, params: LayerParams, config: TileConfig,
                  c_cat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y [M, N] = x Wᵀ + T B_segᵀ (+ bias), each row with its own segment's B columns; with column scales c_cat
    [S_c, N] (params.col_index): the rows of scaled segments c ⊙ (…) + bias, and their values before the scale
    [params.scaled_rows, N] in fp32; else None)."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    scaled = params.has_scale and c_cat is not None
    pre = torch.empty((params.scaled_rows, n), dtype=torch.float32, device=x.device) if scaled else None
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _xw_sb_fwd_kernel[grid](
        x, weight, t, b_cat, bias if bias is not None else y, y, c_cat if scaled else y, pre if scaled else y,
        table.seg_start, table.seg_end, table.row_seg, params.ranks, params.r_offsets,
        params.col_index if scaled else params.ranks, params.pre_offsets if scaled else params.ranks,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), t.stride(0), t.stride(1),
        b_cat.stride(0), b_cat.stride(1), y.stride(0), y.stride(1),
        c_cat.stride(0) if scaled else 0, c_cat.stride(1) if scaled else 0,
        pre.stride(0) if scaled else 0, pre.stride(1) if scaled else 0,
        m, n, k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=rank_block(params.max_rank), GROUP_M=8, HAS_BIAS=bias is not None, HAS_SCALE=scaled,
        **dot_args(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y, pre
