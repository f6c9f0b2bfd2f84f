"""The LoRA gradients that read dy: G = s · dy B ([M, r]) and dB = dyᵀ T ([N, r]).

A segment with a column scale c (DoRA) reads dy ⊙ c instead: the gradient of what the scale multiplied.

Fast mode (deterministic=False): one pass over dy; each (M tile, N tile) program loads its dy tile once
and adds its partial G and dB with fp32 atomics. Deterministic mode: no atomics; G (split over N) and dB (split over
each segment's rows) write fp32 partials that the host sums in a fixed order, at the price of a second
read of dy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafusion.ops.kernel_helpers import _mma, _segment_column_scale, _segment_rows, _tile_segments, dot_args, rank_block
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import TileConfig, lazy_kernel, split_length

__all__ = ["dys_dyb_backward"]


@lazy_kernel
def _dys_dyb_atomic_kernel(
    dy_ptr, b_ptr, t_ptr, g_ptr, db_ptr, c_ptr,
    seg_start_ptr, seg_end_ptr, row_seg_ptr, rank_ptr, roff_ptr, scale_ptr, cidx_ptr,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_tm, stride_tr, stride_gm, stride_gr, stride_dbn, stride_dbr,
    stride_cs, stride_cn,
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    seg_lo, seg_hi = _tile_segments(row_seg_ptr, pid_m, M, BLOCK_M)
    for seg in range(seg_lo, seg_hi):
        in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
        rank = tl.load(rank_ptr + seg)
        roff = tl.load(roff_ptr + seg)
        scale = tl.load(scale_ptr + seg)
        dy_seg = tl.where(in_seg[:, None], dy, 0.0)
        if HAS_SCALE:
            c, _ = _segment_column_scale(c_ptr, cidx_ptr, seg, cols, col_ok, stride_cs, stride_cn)
            dy_seg = (dy_seg.to(tl.float32) * c[None, :]).to(dy.dtype)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            b = tl.load(b_ptr + cols[:, None] * stride_bn + (roff + rr)[None, :] * stride_br,
                        mask=col_ok[:, None] & r_ok[None, :], other=0.0)
            g = _mma(dy_seg, b, tl.full((BLOCK_M, BLOCK_R), 0, tl.float32), DOT_PRECISION, DOT_FP32) * scale
            tl.atomic_add(g_ptr + rows[:, None] * stride_gm + rr[None, :] * stride_gr, g,
                          mask=in_seg[:, None] & r_ok[None, :])
            t = tl.load(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr,
                        mask=in_seg[:, None] & r_ok[None, :], other=0.0)
            db = _mma(tl.trans(dy_seg), t, tl.full((BLOCK_N, BLOCK_R), 0, tl.float32), DOT_PRECISION, DOT_FP32)
            tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + (roff + rr)[None, :] * stride_dbr, db,
                          mask=col_ok[:, None] & r_ok[None, :])


@lazy_kernel
def _dys_kernel(
    dy_ptr, b_ptr, g_ptr, c_ptr,
    seg_start_ptr, seg_end_ptr, row_seg_ptr, rank_ptr, roff_ptr, scale_ptr, cidx_ptr,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_gs, stride_gm, stride_gr, stride_cs, stride_cn,
    M, N, N_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One program per (M tile, N split) writes its fp32 partial of G; the host sums the splits in order."""
    pid_m = tl.program_id(0).to(tl.int64)
    n_lo = tl.program_id(1) * N_SPLIT
    n_hi = tl.minimum(n_lo + N_SPLIT, N)
    g_ptr += tl.program_id(1).to(tl.int64) * stride_gs
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    seg_lo, seg_hi = _tile_segments(row_seg_ptr, pid_m, M, BLOCK_M)
    for seg in range(seg_lo, seg_hi):
        in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
        rank = tl.load(rank_ptr + seg)
        roff = tl.load(roff_ptr + seg)
        scale = tl.load(scale_ptr + seg)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            acc = tl.full((BLOCK_M, BLOCK_R), 0, tl.float32)
            for n0 in range(n_lo, n_hi, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                n_ok = nn < N
                dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                             mask=in_seg[:, None] & n_ok[None, :], other=0.0)
                if HAS_SCALE:
                    c, _ = _segment_column_scale(c_ptr, cidx_ptr, seg, nn, n_ok, stride_cs, stride_cn)
                    dy = (dy.to(tl.float32) * c[None, :]).to(dy_ptr.dtype.element_ty)
                b = tl.load(b_ptr + nn[:, None] * stride_bn + (roff + rr)[None, :] * stride_br,
                            mask=n_ok[:, None] & r_ok[None, :], other=0.0)
                acc = _mma(dy, b, acc, DOT_PRECISION, DOT_FP32)
            tl.store(g_ptr + rows[:, None] * stride_gm + rr[None, :] * stride_gr, acc * scale,
                     mask=in_seg[:, None] & r_ok[None, :])


@lazy_kernel
def _dyb_kernel(
    dy_ptr, t_ptr, db_ptr, c_ptr,
    seg_start_ptr, seg_end_ptr, rank_ptr, roff_ptr, cidx_ptr,
    stride_dym, stride_dyn, stride_tm, stride_tr, stride_dbs, stride_dbn, stride_dbr, stride_cs, stride_cn,
    N, M_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One program per (N tile, segment, row split) sums its rows in order into an fp32 partial of dB."""
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    start = tl.load(seg_start_ptr + seg).to(tl.int64) + tl.program_id(2) * M_SPLIT
    end = tl.minimum(start + M_SPLIT, tl.load(seg_end_ptr + seg).to(tl.int64))
    db_ptr += tl.program_id(2).to(tl.int64) * stride_dbs
    rank = tl.load(rank_ptr + seg)
    roff = tl.load(roff_ptr + seg)
    if HAS_SCALE:
        c, _ = _segment_column_scale(c_ptr, cidx_ptr, seg, cols, col_ok, stride_cs, stride_cn)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        acc = tl.full((BLOCK_N, BLOCK_R), 0, tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            in_seg = rows < end
            dy = tl.load(dy_ptr + rows[None, :] * stride_dym + cols[:, None] * stride_dyn,
                         mask=in_seg[None, :] & col_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_M] = dyᵀ tile
            if HAS_SCALE:
                dy = (dy.to(tl.float32) * c[:, None]).to(dy_ptr.dtype.element_ty)
            t = tl.load(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr,
                        mask=in_seg[:, None] & r_ok[None, :], other=0.0)
            acc = _mma(dy, t, acc, DOT_PRECISION, DOT_FP32)
        tl.store(db_ptr + cols[:, None] * stride_dbn + (roff + rr)[None, :] * stride_dbr, acc,
                 mask=col_ok[:, None] & r_ok[None, :])


def dys_dyb_backward(dy: torch.Tensor, b_cat: torch.Tensor, t: torch.Tensor, table: SegmentTable, params: LayerParams,
                     deterministic: bool, config: TileConfig,
                     c_cat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G [M, max_rank] in dy's dtype, dB_cat [N, ΣR] in B's dtype); with column scales c_cat [S_c, N] the scaled
    segments read dy ⊙ c."""
    m, n = dy.shape
    block_r = rank_block(params.max_rank)
    precision = dot_args(dy.dtype)
    scaled = params.has_scale and c_cat is not None
    scale_args = (c_cat if scaled else dy, params.col_index if scaled else params.ranks,
                  c_cat.stride(0) if scaled else 0, c_cat.stride(1) if scaled else 0)
    if deterministic:
        tiles_m, tiles_n = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
        n_split = split_length(n, config.block_n, tiles_m, dy.device)
        g_parts = torch.zeros((triton.cdiv(n, n_split), m, t.shape[1]), dtype=torch.float32, device=dy.device)
        _dys_kernel[(tiles_m, g_parts.shape[0])](
            dy, b_cat, g_parts, scale_args[0], table.seg_start, table.seg_end, table.row_seg, params.ranks,
            params.r_offsets, params.scalings, scale_args[1], dy.stride(0), dy.stride(1), b_cat.stride(0),
            b_cat.stride(1), g_parts.stride(0), g_parts.stride(1), g_parts.stride(2), *scale_args[2:], m, n, n_split,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=block_r, HAS_SCALE=scaled, **precision,
            num_warps=config.num_warps,
        )
        m_split = split_length(table.longest_segment, config.block_m, tiles_n * table.num_segments, dy.device)
        db_parts = torch.zeros((triton.cdiv(table.longest_segment, m_split),) + tuple(b_cat.shape), dtype=torch.float32,
                               device=dy.device)
        _dyb_kernel[(tiles_n, table.num_segments, db_parts.shape[0])](
            dy, t, db_parts, scale_args[0], table.seg_start, table.seg_end, params.ranks, params.r_offsets,
            scale_args[1], dy.stride(0), dy.stride(1), t.stride(0), t.stride(1), db_parts.stride(0),
            db_parts.stride(1), db_parts.stride(2), *scale_args[2:], n, m_split,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=block_r, HAS_SCALE=scaled, **precision,
            num_warps=config.num_warps,
        )
        return g_parts.sum(0).to(dy.dtype), db_parts.sum(0).to(b_cat.dtype)
    g = torch.zeros((m, t.shape[1]), dtype=torch.float32, device=dy.device)
    db = torch.zeros(b_cat.shape, dtype=torch.float32, device=dy.device)
    _dys_dyb_atomic_kernel[(triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))](
        dy, b_cat, t, g, db, scale_args[0], table.seg_start, table.seg_end, table.row_seg, params.ranks,
        params.r_offsets, params.scalings, scale_args[1],
        dy.stride(0), dy.stride(1), b_cat.stride(0), b_cat.stride(1), t.stride(0), t.stride(1),
        g.stride(0), g.stride(1), db.stride(0), db.stride(1), *scale_args[2:], m, n,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=block_r, HAS_SCALE=scaled, **precision,
        num_warps=config.num_warps,
    )
    return g.to(dy.dtype), db.to(b_cat.dtype)
