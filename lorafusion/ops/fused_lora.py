"""The fused LoRA linear layer: the four kernels behind one torch.autograd.Function.

Forward:  T = s · dropout(x) Aᵀ                 (fused_lora_dropout_xa)
          y = x Wᵀ + T Bᵀ (+ bias)              (fused_lora_xw_sb)
Backward: G = s · dy B,  dB = dyᵀ T             (fused_lora_dys_dyb)
          dx = dy W + dropout-backward(G A)     (fused_lora_dyw_dsa)
          dA = Gᵀ dropout(x)                    (fused_lora_dropout_xa)
W and bias are frozen (the base model is never trained), so no dW or dbias is computed.

A segment may carry a column scale c [N] (DoRA): its rows are c ⊙ (x Wᵀ + T Bᵀ) + bias; the backward kernels
then read dy ⊙ c on its rows, and dc = Σ rows dy ⊙ (x Wᵀ + T Bᵀ) (fused_lora_column_scale).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch

from lorafusion.ops.reference import lora_linear_reference
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import pick_config, resolve_backend, tile_key, tuned

__all__ = ["FusedMultiLoRAFunction", "fused_multi_lora_linear", "fused_lora_linear", "layer_params", "tune_tiles"]


def _kernels() -> SimpleNamespace:
    """The Triton kernels' host functions, imported on first use: every torch path of this module (and
    `fused_lora_linear` off CUDA) works without Triton installed."""
    try:
        from lorafusion.ops.fused_lora_column_scale import column_scale_grad
        from lorafusion.ops.fused_lora_dropout_xa import dropout_xa_forward, dropout_xa_grad_a
        from lorafusion.ops.fused_lora_dys_dyb import dys_dyb_backward
        from lorafusion.ops.fused_lora_dyw_dsa import dyw_dsa_backward
        from lorafusion.ops.fused_lora_xw_sb import xw_sb_forward
    except ImportError as err:
        raise RuntimeError(f"the fused LoRA kernels need Triton ({err}); install it with "
                           "`pip install 'lorafusion[triton]'`, or run with kernels='torch'") from err
    return SimpleNamespace(column_scale_grad=column_scale_grad, dropout_xa_forward=dropout_xa_forward,
                           dropout_xa_grad_a=dropout_xa_grad_a, dys_dyb_backward=dys_dyb_backward,
                           dyw_dsa_backward=dyw_dsa_backward, xw_sb_forward=xw_sb_forward)


class FusedMultiLoRAFunction(torch.autograd.Function):
    """x [M, K], weight [N, K], bias [N] | None, a_cat [ΣR, K], b_cat [N, ΣR], c_cat [S_c, N] | None -> y [M, N]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_cat: torch.Tensor,
                b_cat: torch.Tensor, c_cat: torch.Tensor | None, table: SegmentTable, params: LayerParams, site_id: int,
                has_dropout: bool, deterministic: bool) -> torch.Tensor:
        kernels = _kernels()
        n, k, r = weight.shape[0], weight.shape[1], a_cat.shape[0]
        config = pick_config(n, k, r, x.device)  # chosen before training (tune_tiles), or the default
        t = kernels.dropout_xa_forward(x, a_cat, table, params, site_id, has_dropout, config.block_m, config.block_k)  # [M, r]
        y, pre = kernels.xw_sb_forward(x, weight, t, b_cat, bias, table, params, config, c_cat)  # [M, N], [scaled rows, N]
        ctx.save_for_backward(x, weight, a_cat, b_cat, t, c_cat, pre)
        ctx.table, ctx.params, ctx.config = table, params, config
        ctx.site_id, ctx.has_dropout, ctx.deterministic = site_id, has_dropout, deterministic
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        kernels = _kernels()
        x, weight, a_cat, b_cat, t, c_cat, pre = ctx.saved_tensors
        table, params, config = ctx.table, ctx.params, ctx.config
        dy = dy.contiguous()
        g, db = kernels.dys_dyb_backward(dy, b_cat, t, table, params, ctx.deterministic, config, c_cat)  # [M, r], [N, ΣR]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = kernels.dyw_dsa_backward(dy, weight, g, a_cat, table, params, ctx.site_id, ctx.has_dropout, config, c_cat)
        da = kernels.dropout_xa_grad_a(x, g, a_cat, table, params, ctx.site_id, ctx.has_dropout, ctx.deterministic,
                               config.block_m, config.block_k)
        dc = kernels.column_scale_grad(dy, pre, c_cat, table, params, config) if c_cat is not None else None
        return dx, None, None, da, db, dc, None, None, None, None, None


def layer_params(table: SegmentTable, lora_a: Sequence[torch.Tensor | None], scalings: Sequence[float],
                 dropout_ps: Sequence[float], column_scales: Sequence[torch.Tensor | None] | None = None) -> LayerParams:
    ranks = tuple(0 if a is None else int(a.shape[0]) for a in lora_a)
    scaled = tuple(c is not None for c in column_scales) if column_scales is not None else None
    return table.layer_params(ranks, tuple(float(s) for s in scalings), tuple(float(p) for p in dropout_ps), scaled)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a, lora_b, table: SegmentTable) -> None:
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [N, {k}] (PEFT layout, K = x.shape[-1])")
    if x.numel() // k != table.num_rows:
        raise ValueError(f"x has {x.numel() // k} rows but the segment table covers {table.num_rows}; rebuild the table")
    if len(lora_a) != table.num_segments or len(lora_b) != table.num_segments:
        raise ValueError(f"need one (lora_a, lora_b) per segment ({table.num_segments}); got {len(lora_a)}, {len(lora_b)}")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if (a is None) != (b is None):
            raise ValueError(f"segment {i}: give both lora_a and lora_b, or neither (no adapter)")
        if a is not None and (a.dim() != 2 or a.shape[1] != k or b.shape != (n, a.shape[0])):
            raise ValueError(f"segment {i}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} must be [r, {k}] / [{n}, r]")
    tensors = [weight] + ([bias] if bias is not None else []) + [t for t in (*lora_a, *lora_b) if t is not None]
    for tensor in tensors:
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(f"all tensors must match x ({x.dtype}, {x.device}); got {tensor.dtype}, {tensor.device}; "
                             "cast the adapter factors with .to(x.dtype)")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the fused LoRA op treats weight and bias as frozen; call weight.requires_grad_(False)")


def fused_multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: Sequence[torch.Tensor | None],
                            lora_b: Sequence[torch.Tensor | None], table: SegmentTable, *, scalings: Sequence[float],
                            dropout_ps: Sequence[float], site_id: int = 0, bias: torch.Tensor | None = None,
                            deterministic: bool = True,
                            column_scales: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) + per segment i: s_i · dropout_i(x) A_iᵀ B_iᵀ on the segment's rows (Triton); a segment
    with column_scales[i] = c [N] gets c ⊙ (x Wᵀ + s_i · dropout_i(x) A_iᵀ B_iᵀ) + bias instead (DoRA).

    x [..., K] with table.num_rows rows; lora_a[i] [r_i, K], lora_b[i] [N, r_i], or None for a segment
    with no adapter on this layer; ranks may differ per segment. Dropout masks follow the table's per-row
    seeds (see SegmentTable). deterministic=True (default) never uses atomics, so gradients are bitwise
    reproducible run to run; False takes the single-pass atomic backward.
    """
    _check(x, weight, bias, lora_a, lora_b, table)
    if column_scales is not None:
        if len(column_scales) != table.num_segments:
            raise ValueError(f"need one column scale (or None) per segment ({table.num_segments}); "
                             f"got {len(column_scales)}")
        for i, c in enumerate(column_scales):
            if c is not None and (c.shape != (weight.shape[0],) or c.dtype != x.dtype or c.device != x.device):
                raise ValueError(f"segment {i}: column scale {tuple(c.shape)} {c.dtype} must be [{weight.shape[0]}] "
                                 f"{x.dtype} on {x.device}")
        if all(c is None for c in column_scales):
            column_scales = None
    params = layer_params(table, lora_a, scalings, dropout_ps, column_scales)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    present = [i for i, a in enumerate(lora_a) if a is not None]
    if present:
        a_cat = torch.cat([lora_a[i] for i in present]) if len(present) > 1 else lora_a[present[0]]
        b_cat = torch.cat([lora_b[i] for i in present], dim=1) if len(present) > 1 else lora_b[present[0]]
    else:
        a_cat = x.new_zeros(1, x.shape[-1])
        b_cat = x.new_zeros(weight.shape[0], 1)
    has_dropout = any(p > 0.0 for p in dropout_ps)
    c_cat = torch.stack([c for c in column_scales if c is not None]) if column_scales is not None else None
    y = FusedMultiLoRAFunction.apply(flat, weight, bias, a_cat, b_cat, c_cat, table, params, site_id, has_dropout,
                                     deterministic)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                      scaling: float, dropout_p: float = 0.0, bias: torch.Tensor | None = None, seed: int | None = None,
                      deterministic: bool = True, kernels: str = "auto") -> torch.Tensor:
    """One adapter: y = x Wᵀ + scaling · dropout(x) Aᵀ Bᵀ (+ bias), PEFT shapes (W [N, K], A [r, K], B [N, r]).

    kernels: 'auto' runs Triton on CUDA and the torch reference elsewhere; 'triton' / 'torch' force one.
    seed: the dropout stream on the Triton path (row i, column j draws Philox(seed; j, i, 0, 0)); None
    draws one from torch's default generator, like nn.Dropout.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if resolve_backend(kernels, x.device) == "torch":
        return lora_linear_reference(x, weight, lora_a, lora_b, scaling=scaling, dropout_p=dropout_p, bias=bias)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    rows = x.numel() // x.shape[-1]
    table = SegmentTable.build(rows, [(0, rows)], [((0, rows, seed),)], device=x.device)
    return fused_multi_lora_linear(x, weight, [lora_a], [lora_b], table, scalings=[scaling], dropout_ps=[dropout_p],
                                   bias=bias, deterministic=deterministic)


def tune_tiles(shapes: list[tuple[int, int, int]], rows: int, dtype: torch.dtype, device: torch.device,
               bench=None) -> None:
    """Choose the tiles of every layer shape (N, K, total rank r) before training: each candidate of
    utils.TUNE_CONFIGS is timed on the base GEMM with its LoRA epilogue at `rows` tokens (synthetic data, one
    segment), the fastest kept for (GPU, N, K). Shapes already chosen (or loaded with utils.load_tiles) are not
    timed again. bench(config, run) -> ms replaces timing `run` with triton.testing.do_bench (tests)."""
    if bench is None:
        import triton.testing

        def bench(config, run):
            return triton.testing.do_bench(run, warmup=5, rep=25)

    xw_sb_forward = _kernels().xw_sb_forward
    for n, k, r in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(rows, k, generator=gen, device=device).to(dtype)
        weight = torch.randn(n, k, generator=gen, device=device).to(dtype)
        t = torch.randn(rows, r, generator=gen, device=device).to(dtype)
        b_cat = torch.randn(n, r, generator=gen, device=device).to(dtype)
        table = SegmentTable.build(rows, [(0, rows)], device=device)
        params = table.layer_params((r,), (1.0,), (0.0,))
        tuned(tile_key(n, k, device),
              lambda cfg: bench(cfg, lambda: xw_sb_forward(x, weight, t, b_cat, None, table, params, cfg)[0]))
