"""Input gradient with the LoRA branch fused into the base GEMM: dx = dy W + keep ⊙ (G A) / (1 - p).

G = s · dy B ([M, r], from fused_lora_dys_dyb). The keep mask is regenerated from the same Philox
stream as the forward (see fused_lora_dropout_xa), so nothing of size [M, K] is stored between passes.
Rows of a segment with a column scale c (DoRA) use dy ⊙ c in dy W.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafusion.ops.kernel_helpers import (
    _dropout_uniform, _grouped_tile, _mma, _segment_column_scale, _segment_rows, _tile_segments, dot_args, rank_block,
)
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import TileConfig, lazy_kernel

__all__ = ["dyw_dsa_backward"]


@lazy_kernel
def _dyw_dsa_bwd_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, dx_ptr, c_ptr,
    seg_start_ptr, seg_end_ptr, row_seg_ptr, row_seed_ptr, row_pos_ptr, rank_ptr, roff_ptr, p_ptr, cidx_ptr,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    stride_cs, stride_cn,
    M, N, K, site_id,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = kk < K
    # The LoRA term first, so one [BLOCK_M, BLOCK_K] accumulator is live through the long dy·W loop.
    lora = tl.full((BLOCK_M, BLOCK_K), 0, tl.float32)
    row_p = tl.full((BLOCK_M,), 0, tl.float32)
    seg_lo, seg_hi = _tile_segments(row_seg_ptr, pid_m, M, BLOCK_M)
    for seg in range(seg_lo, seg_hi):
        in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
        rank = tl.load(rank_ptr + seg)
        roff = tl.load(roff_ptr + seg)
        row_p = tl.where(in_seg, tl.load(p_ptr + seg), row_p)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            g = tl.load(g_ptr + rows[:, None] * stride_gm + rr[None, :] * stride_gr,
                        mask=in_seg[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptr + (roff + rr)[:, None] * stride_ar + kk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            lora = _mma(g, a, lora, DOT_PRECISION, DOT_FP32)
    if HAS_DROPOUT:
        seeds = tl.load(row_seed_ptr + rows, mask=row_ok, other=0)
        pos = tl.load(row_pos_ptr + rows, mask=row_ok, other=0)
        u = _dropout_uniform(seeds, pos, pid_k * BLOCK_K, site_id, BLOCK_M, BLOCK_K)
        keep = u >= row_p[:, None]
        lora = tl.where(keep, lora / (1.0 - row_p[:, None]), 0.0)
    acc = lora
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
            for seg in range(seg_lo, seg_hi):
                in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
                c, ci = _segment_column_scale(c_ptr, cidx_ptr, seg, nn, n_ok, stride_cs, stride_cn)
                scale = tl.where((in_seg & ((rows * 0 + ci) >= 0))[:, None], c[None, :], scale)
            dy = (dy.to(tl.float32) * scale).to(dy_ptr.dtype.element_ty)
        w = tl.load(w_ptr + nn[:, None] * stride_wn + kk[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(dy, w, acc, DOT_PRECISION, DOT_FP32)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + kk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


def dyw_dsa_backward(dy: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, a_cat: torch.Tensor, table: SegmentTable,
                     params: LayerParams, site_id: int, has_dropout: bool, config: TileConfig,
                     c_cat: torch.Tensor | None = None) -> torch.Tensor:
    """dx [M, K] = dy W + dropout-backward(G A_seg) per row (dy ⊙ c on rows of segments with column scales c_cat)."""
    m, n = dy.shape
    scaled = params.has_scale and c_cat is not None
    k = weight.shape[1]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    # The forward's tiles with the roles of N and K swapped: output tile [block_m, block_n], reduction step
    # block_k, so the shared memory a tuned config was probed with in xw_sb is what this kernel uses too.
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(k, config.block_n),)
    _dyw_dsa_bwd_kernel[grid](
        dy, weight, g, a_cat, dx, c_cat if scaled else dy,
        table.seg_start, table.seg_end, table.row_seg, table.row_seed, table.row_pos,
        params.ranks, params.r_offsets, params.dropout_ps, params.col_index if scaled else params.ranks,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        a_cat.stride(0), a_cat.stride(1), dx.stride(0), dx.stride(1),
        c_cat.stride(0) if scaled else 0, c_cat.stride(1) if scaled else 0,
        m, n, k, site_id,
        BLOCK_M=config.block_m, BLOCK_N=config.block_k, BLOCK_K=config.block_n,
        BLOCK_R=rank_block(params.max_rank), GROUP_M=8, HAS_DROPOUT=has_dropout, HAS_SCALE=scaled,
        **dot_args(dy.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dx
