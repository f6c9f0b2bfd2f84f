"""Dropout fused with the LoRA down-projection: T = s · dropout(x) Aᵀ, and its weight gradient dA = Gᵀ dropout(x).

The dropout mask is never stored: every kernel that needs it regenerates it from Philox with
key = the row's sample seed and counter = (column, row index within the sample, layer site id, 0),
so the mask of a row depends on nothing else in the microbatch. `dropout_keep_mask` materialises the
same mask for tests and for the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafusion.ops.kernel_helpers import (
    _dropout_uniform, _mma, _segment_rows, _tile_segments, dot_args, rank_block,
)
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import lazy_kernel, split_length

__all__ = ["dropout_xa_forward", "dropout_xa_grad_a", "dropout_keep_mask"]


@lazy_kernel
def _dropout_xa_fwd_kernel(
    x_ptr, a_ptr, t_ptr,
    seg_start_ptr, seg_end_ptr, row_seg_ptr, row_seed_ptr, row_pos_ptr,
    rank_ptr, roff_ptr, scale_ptr, p_ptr,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_ts, stride_tm, stride_tr,
    M, K, K_SPLIT, site_id,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One program per (M tile, K split) writes its fp32 partial of T; the host sums the splits in order."""
    pid_m = tl.program_id(0).to(tl.int64)
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    t_ptr += tl.program_id(1).to(tl.int64) * stride_ts
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    seg_lo, seg_hi = _tile_segments(row_seg_ptr, pid_m, M, BLOCK_M)
    seeds = tl.load(row_seed_ptr + rows, mask=row_ok, other=0)
    pos = tl.load(row_pos_ptr + rows, mask=row_ok, other=0)
    for seg in range(seg_lo, seg_hi):
        in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
        rank = tl.load(rank_ptr + seg)
        roff = tl.load(roff_ptr + seg)
        p = tl.load(p_ptr + seg)
        factor = tl.load(scale_ptr + seg) / (1.0 - p)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            acc = tl.full((BLOCK_M, BLOCK_R), 0, tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < K
                x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=in_seg[:, None] & k_ok[None, :], other=0.0)
                if HAS_DROPOUT:
                    u = _dropout_uniform(seeds, pos, k0, site_id, BLOCK_M, BLOCK_K)
                    x = tl.where(u >= p, x, 0.0)
                a = tl.load(a_ptr + (roff + rr)[None, :] * stride_ar + kk[:, None] * stride_ak,
                            mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R] = Aᵀ tile
                acc = _mma(x, a, acc, DOT_PRECISION, DOT_FP32)
            tl.store(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr, acc * factor,
                     mask=in_seg[:, None] & r_ok[None, :])


@lazy_kernel
def _dropout_keep_kernel(
    keep_ptr, row_seg_ptr, seg_start_ptr, seg_end_ptr, row_seed_ptr, row_pos_ptr, p_ptr,
    stride_km, M, K, site_id,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    seg = tl.load(row_seg_ptr + rows, mask=row_ok, other=0)  # per row: rows past M read segment 0, in bounds
    in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
    p = tl.load(p_ptr + seg, mask=row_ok, other=0.0)
    seeds = tl.load(row_seed_ptr + rows, mask=row_ok, other=0)
    pos = tl.load(row_pos_ptr + rows, mask=row_ok, other=0)
    u = _dropout_uniform(seeds, pos, pid_k * BLOCK_K, site_id, BLOCK_M, BLOCK_K)
    keep = (u >= p[:, None]) & in_seg[:, None]
    tl.store(keep_ptr + rows[:, None] * stride_km + kk[None, :], keep.to(tl.int8),
             mask=row_ok[:, None] & (kk < K)[None, :])


@lazy_kernel
def _dropout_xa_grad_a_kernel(
    x_ptr, g_ptr, da_ptr,
    seg_start_ptr, seg_end_ptr, row_seed_ptr, row_pos_ptr,
    rank_ptr, roff_ptr, p_ptr,
    stride_xm, stride_xk, stride_gm, stride_gr, stride_ds, stride_dr, stride_dk,
    K, M_SPLIT, site_id,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Deterministic: one program per (K tile, segment, row split) sums its rows in order into an fp32
    partial; the host sums the splits in order."""
    pid_k = tl.program_id(0)
    seg = tl.program_id(1)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < K
    seg_start = tl.load(seg_start_ptr + seg).to(tl.int64)
    start = seg_start + tl.program_id(2) * M_SPLIT
    end = tl.minimum(start + M_SPLIT, tl.load(seg_end_ptr + seg).to(tl.int64))
    da_ptr += tl.program_id(2).to(tl.int64) * stride_ds
    rank = tl.load(rank_ptr + seg)
    roff = tl.load(roff_ptr + seg)
    p = tl.load(p_ptr + seg)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        acc = tl.full((BLOCK_R, BLOCK_K), 0, tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            in_seg = rows < end
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=in_seg[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                seeds = tl.load(row_seed_ptr + rows, mask=in_seg, other=0)
                pos = tl.load(row_pos_ptr + rows, mask=in_seg, other=0)
                u = _dropout_uniform(seeds, pos, pid_k * BLOCK_K, site_id, BLOCK_M, BLOCK_K)
                x = tl.where(u >= p, x, 0.0)
            g = tl.load(g_ptr + rows[None, :] * stride_gm + rr[:, None] * stride_gr,
                        mask=in_seg[None, :] & r_ok[:, None], other=0.0)  # [BLOCK_R, BLOCK_M] = Gᵀ tile
            acc = _mma(g, x, acc, DOT_PRECISION, DOT_FP32)
        tl.store(da_ptr + (roff + rr)[:, None] * stride_dr + kk[None, :] * stride_dk, acc / (1.0 - p),
                 mask=r_ok[:, None] & k_ok[None, :])


@lazy_kernel
def _dropout_xa_grad_a_atomic_kernel(
    x_ptr, g_ptr, da_ptr,
    seg_start_ptr, seg_end_ptr, row_seg_ptr, row_seed_ptr, row_pos_ptr,
    rank_ptr, roff_ptr, p_ptr,
    stride_xm, stride_xk, stride_gm, stride_gr, stride_dr, stride_dk,
    M, K, site_id,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Fast mode: one program per (M tile, K tile) adds its partial dA with fp32 atomics (order not fixed)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = kk < K
    seg_lo, seg_hi = _tile_segments(row_seg_ptr, pid_m, M, BLOCK_M)
    x_raw = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    u = tl.full((BLOCK_M, BLOCK_K), 1.0, tl.float32)  # uniform draws; 1.0 keeps every element when p = 0
    if HAS_DROPOUT:
        seeds = tl.load(row_seed_ptr + rows, mask=row_ok, other=0)
        pos = tl.load(row_pos_ptr + rows, mask=row_ok, other=0)
        u = _dropout_uniform(seeds, pos, pid_k * BLOCK_K, site_id, BLOCK_M, BLOCK_K)
    for seg in range(seg_lo, seg_hi):
        in_seg = _segment_rows(seg_start_ptr, seg_end_ptr, seg, rows, row_ok)
        rank = tl.load(rank_ptr + seg)
        roff = tl.load(roff_ptr + seg)
        p = tl.load(p_ptr + seg)
        x = tl.where(in_seg[:, None] & (u >= p), x_raw, 0.0)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            g = tl.load(g_ptr + rows[None, :] * stride_gm + rr[:, None] * stride_gr,
                        mask=in_seg[None, :] & r_ok[:, None], other=0.0)
            part = _mma(g, x, tl.full((BLOCK_R, BLOCK_K), 0, tl.float32), DOT_PRECISION, DOT_FP32) / (1.0 - p)
            tl.atomic_add(da_ptr + (roff + rr)[:, None] * stride_dr + kk[None, :] * stride_dk, part,
                          mask=r_ok[:, None] & k_ok[None, :])


def dropout_xa_forward(x: torch.Tensor, a_cat: torch.Tensor, table: SegmentTable, params: LayerParams, site_id: int,
                       has_dropout: bool, block_m: int, block_k: int) -> torch.Tensor:
    """T [M, max_rank] = s · dropout(x) Aᵀ per segment; rows of no segment and columns past a rank are 0."""
    m, k = x.shape
    tiles_m = triton.cdiv(m, block_m)
    k_split = split_length(k, block_k, tiles_m, x.device)
    parts = torch.zeros((triton.cdiv(k, k_split), m, max(params.max_rank, 1)), dtype=torch.float32, device=x.device)
    _dropout_xa_fwd_kernel[(tiles_m, parts.shape[0])](
        x, a_cat, parts,
        table.seg_start, table.seg_end, table.row_seg, table.row_seed, table.row_pos,
        params.ranks, params.r_offsets, params.scalings, params.dropout_ps,
        x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), parts.stride(0), parts.stride(1), parts.stride(2),
        m, k, k_split, site_id,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_block(params.max_rank),
        HAS_DROPOUT=has_dropout, **dot_args(x.dtype),
    )
    return parts.sum(0).to(x.dtype)  # [M, max_rank]


def dropout_xa_grad_a(x: torch.Tensor, g: torch.Tensor, a_cat: torch.Tensor, table: SegmentTable, params: LayerParams,
                      site_id: int, has_dropout: bool, deterministic: bool, block_m: int, block_k: int) -> torch.Tensor:
    """dA_cat [ΣR, K] = Gᵀ dropout(x) per segment, G = s · dy B ([M, max_rank])."""
    m, k = x.shape
    block_r = rank_block(params.max_rank)
    common = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, HAS_DROPOUT=has_dropout,
                  **dot_args(x.dtype))
    if deterministic:
        tiles_k = triton.cdiv(k, block_k)
        m_split = split_length(table.longest_segment, block_m, tiles_k * table.num_segments, x.device)
        parts = torch.zeros((triton.cdiv(table.longest_segment, m_split),) + tuple(a_cat.shape), dtype=torch.float32,
                            device=x.device)
        _dropout_xa_grad_a_kernel[(tiles_k, table.num_segments, parts.shape[0])](
            x, g, parts, table.seg_start, table.seg_end, table.row_seed, table.row_pos,
            params.ranks, params.r_offsets, params.dropout_ps,
            x.stride(0), x.stride(1), g.stride(0), g.stride(1), parts.stride(0), parts.stride(1), parts.stride(2),
            k, m_split, site_id, **common,
        )
        return parts.sum(0).to(a_cat.dtype)
    da = torch.zeros(a_cat.shape, dtype=torch.float32, device=a_cat.device)
    _dropout_xa_grad_a_atomic_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        x, g, da, table.seg_start, table.seg_end, table.row_seg, table.row_seed, table.row_pos,
        params.ranks, params.r_offsets, params.dropout_ps,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), da.stride(0), da.stride(1), m, k, site_id, **common,
    )
    return da.to(a_cat.dtype)


def dropout_keep_mask(table: SegmentTable, params: LayerParams, num_cols: int, site_id: int,
                      block_m: int = 16, block_k: int = 16) -> torch.Tensor:
    """The keep mask [M, K] (bool) the kernels draw for this layer; False on rows of no segment."""
    m = table.num_rows
    keep = torch.zeros((m, num_cols), dtype=torch.int8, device=table.row_seg.device)
    _dropout_keep_kernel[(triton.cdiv(m, block_m), triton.cdiv(num_cols, block_k))](
        keep, table.row_seg, table.seg_start, table.seg_end, table.row_seed, table.row_pos, params.dropout_ps,
        keep.stride(0), m, num_cols, site_id, BLOCK_M=block_m, BLOCK_K=block_k,
    )
    return keep.bool()
