"""The gradient of per-segment column scales (DoRA's m / ‖W + sBA‖): dc = Σ over the segment's rows of dy ⊙ pre.

pre is each scaled row's output before its scale (saved compactly by fused_lora_xw_sb). One program per
(N tile, segment, row split) sums its rows in order into an fp32 partial; the host sums the splits in a fixed
order, so the result is bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafusion.ops.kernel_helpers import _mma, dot_args
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import TileConfig, lazy_kernel, split_length

__all__ = ["column_scale_grad"]


@lazy_kernel
def _column_scale_grad_kernel(
    dy_ptr, pre_ptr, dc_ptr,
    seg_start_ptr, seg_end_ptr, cidx_ptr, preoff_ptr,
    stride_dym, stride_dyn, stride_pm, stride_pn, stride_ds, stride_dc, stride_dn,
    N, M_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ci = tl.load(cidx_ptr + seg)
    seg_start = tl.load(seg_start_ptr + seg).to(tl.int64)
    start = seg_start + tl.program_id(2) * M_SPLIT
    end = tl.minimum(start + M_SPLIT, tl.load(seg_end_ptr + seg).to(tl.int64))
    end = tl.where(ci >= 0, end, start)  # a segment without a scale sums nothing (and stores nothing)
    pre_base = tl.load(preoff_ptr + seg).to(tl.int64) - seg_start
    # The column sums as a product with a block of ones (16 identical rows, the smallest dot): every row of
    # `acc` holds the sums, row 0 is stored.
    ones = tl.full((16, BLOCK_M), 1.0, tl.float32)
    acc = tl.full((16, BLOCK_N), 0, tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = (rows < end)[:, None] & col_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=ok, other=0.0)
        pre = tl.load(pre_ptr + (pre_base + rows)[:, None] * stride_pm + cols[None, :] * stride_pn, mask=ok, other=0.0)
        acc = _mma(ones, dy.to(tl.float32) * pre.to(tl.float32), acc, DOT_PRECISION, DOT_FP32)
    first = tl.arange(0, 16)[:, None] == 0
    tl.store(dc_ptr + tl.program_id(2).to(tl.int64) * stride_ds + tl.maximum(ci, 0).to(tl.int64) * stride_dc
             + (tl.arange(0, 16)[:, None] * 0 + cols[None, :]) * stride_dn, acc,
             mask=first & col_ok[None, :] & ((cols[None, :] * 0 + ci) >= 0))


def column_scale_grad(dy: torch.Tensor, pre: torch.Tensor, c_cat: torch.Tensor, table: SegmentTable,
                      params: LayerParams, config: TileConfig) -> torch.Tensor:
    """dc_cat [S_c, N] in c_cat's dtype: per scaled segment, the column sums of dy ⊙ pre over its rows."""
    n = dy.shape[1]
    tiles_n = triton.cdiv(n, config.block_n)
    m_split = split_length(table.longest_segment, config.block_m, tiles_n * table.num_segments, dy.device)
    parts = torch.zeros((triton.cdiv(table.longest_segment, m_split),) + tuple(c_cat.shape), dtype=torch.float32,
                        device=dy.device)
    _column_scale_grad_kernel[(tiles_n, table.num_segments, parts.shape[0])](
        dy, pre, parts, table.seg_start, table.seg_end, params.col_index, params.pre_offsets,
        dy.stride(0), dy.stride(1), pre.stride(0), pre.stride(1), parts.stride(0), parts.stride(1), parts.stride(2),
        n, m_split, BLOCK_M=config.block_m, BLOCK_N=config.block_n, **dot_args(torch.float32),
        num_warps=config.num_warps,
    )
    return parts.sum(0).to(c_cat.dtype)
