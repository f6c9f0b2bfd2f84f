"""Many jobs' adapters on one frozen megatron linear layer.

A packed microbatch orders its tokens by job: job j owns rows [start_j, end_j). The layer runs one
base GEMM over all rows, then adds each job's low-rank update to its own rows only. A job that adapts
several HF modules fused into one megatron layer (q/k/v → linear_qkv, gate/up → linear_fc1) gets one
low-rank product: A_eff stacks the A's, B_eff places each B into that module's output rows.

Each job's (A_eff, B_eff) is built once per optimizer step (and apart for evaluation, where a variant may compute
otherwise), in the compute dtype (`_JobFactors`), not per microbatch: the microbatches' gradients with respect to
them are summed in fp32 and handed back through the factors' construction to the job's parameters by
`collect_grads`, which the optimizer step calls first. A variant may add a per-column scale of the job's rows
(DoRA: y = c ⊙ (x Wᵀ + update) + bias), cached the same way; a variant of its own shape (SHiRA, RandLoRA:
`forward_delta`) adds its update to its rows after the node.

Two paths compute the same thing (`kernels`, see RunConfig.kernels): on CUDA the fused Triton
multi-adapter op (lorafusion.ops), which runs the base GEMM and every job's update in one pass; elsewhere
the torch path below (one base GEMM, then each job's update on its rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.dropout import SegmentDropout, keep_scale, row_keys
from lorafusion.ops.utils import resolve_backend

__all__ = ["Segment", "AdapterBatch", "MultiAdapterLinear", "job_key"]


def job_key(name: str) -> str:
    """Module-dict key for a job name.

    The prefix keeps names like 'eval' or 'train' from clashing with nn.Module attributes; '.' is not
    allowed in module names and '%' never occurs in job names, so the mapping is one-to-one.
    """
    return "job_" + name.replace(".", "%2E")


@dataclass(frozen=True)
class Segment:
    """Token rows [start, end) of the current microbatch that belong to job `job`."""

    job: str
    start: int
    end: int
    samples: tuple[tuple[int, int, int], ...] = ()
    """(start, end, dropout seed) of each sample in the segment; empty = one sample, seed 0."""


def _segment_samples(segments: list[Segment]) -> list[tuple[int, int, int]]:
    """Every sample of the segments, in row order; ValueError when a segment's samples do not tile its rows."""
    out = []
    for seg in segments:
        cursor = seg.start
        for start, end, seed in seg.samples or ((seg.start, seg.end, 0),):
            if start != cursor or end < start:
                raise ValueError(f"job '{seg.job}': sample rows [{start}, {end}) do not continue the segment's "
                                 f"samples at row {cursor}; a segment's samples must tile its rows "
                                 f"[{seg.start}, {seg.end})")
            out.append((start, end, seed))
            cursor = end
        if cursor != seg.end:
            raise ValueError(f"job '{seg.job}': its samples end at row {cursor}, its segment at {seg.end}; "
                             "a segment's samples must tile its rows")
    return out


@dataclass
class AdapterBatch:
    """What every adapted layer needs to know about the microbatch being run (shared by reference).

    Its tables (dropout row keys, the kernels' SegmentTable) are built on first use and kept until
    `segments` is replaced, so each is built once per microbatch and shared by every layer."""

    segments: list[Segment] = field(default_factory=list)
    _tables: dict = field(default_factory=dict, repr=False)
    _for: list | None = field(default=None, repr=False)

    def _cached(self, key: tuple, build):
        if self._for is not self.segments:
            self._tables, self._for = {}, self.segments
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]

    def dropout_keys(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """[num_rows] int64 on `device`: each row's dropout key (see adapters.dropout.row_keys)."""
        return self._cached(("keys", num_rows, device), lambda: row_keys(
            num_rows, _segment_samples(self.segments)).to(device, non_blocking=True))

    def segment_table(self, num_rows: int, device: torch.device):
        """The kernels' SegmentTable of the current segments on `device`."""
        from lorafusion.ops.segments import SegmentTable

        return self._cached(("table", num_rows, device), lambda: SegmentTable.build(
            num_rows, [(s.start, s.end) for s in self.segments], [s.samples for s in self.segments], device=device))


class _JobFactors:
    """One job's (A_eff [R, K], B_eff [N, R], column scale c [N] or None) on one layer in the compute dtype, built
    once per optimizer step, and the fp32 sums of the gradients the microbatches since then sent to them."""

    def __init__(self, factors: tuple, dropout_p: float, params: list[nn.Parameter]) -> None:
        # Leaves that require grad only so autograd records the nodes that use them; _GradSink diverts their
        # gradients into the fp32 sums.
        self.tensors = [None if t is None else t.detach().requires_grad_() for t in factors]
        self.dropout_p, self.params = dropout_p, params
        self.versions = self.current_versions()
        self.grads: list[torch.Tensor | None] = [None] * len(factors)

    @property
    def a(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def b(self) -> torch.Tensor:
        return self.tensors[1]

    def current_versions(self) -> tuple[int, ...]:
        """The parameters' in-place write counters: they move with an optimizer step or a load."""
        return tuple(p._version for p in self.params)

    def inputs(self) -> list[torch.Tensor | None]:
        """(A, B, c) for this microbatch's autograd graph: their gradients land in `grads`."""
        if not torch.is_grad_enabled():
            return [None if t is None else t.detach() for t in self.tensors]
        return [None if t is None else _GradSink.apply(t, self, i) for i, t in enumerate(self.tensors)]

    def add_grad(self, index: int, grad: torch.Tensor) -> None:
        if self.grads[index] is None:
            self.grads[index] = grad.float().clone() if grad.dtype != torch.float32 else grad.clone()
        else:
            self.grads[index].add_(grad)


class _GradSink(torch.autograd.Function):
    """Identity on a cached factor whose backward adds the gradient to the factor's fp32 sum."""

    @staticmethod
    def forward(ctx, factor: torch.Tensor, owner: _JobFactors, index: int) -> torch.Tensor:
        ctx.owner, ctx.index = owner, index
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.owner.add_grad(ctx.index, grad)
        return None, None, None


class MultiAdapterLinear(nn.Module):
    """Wraps a megatron Column/RowParallelLinear; keeps its `(output, bias)` return convention."""

    def __init__(self, base: nn.Module, out_rows: dict[str, torch.Tensor], batch: AdapterBatch, site_id: int = 0,
                 kernels: str = "auto") -> None:
        super().__init__()
        self.base = base
        self.site_id = site_id  # distinct per wrapped layer, so dropout masks differ between layers
        self.kernels = kernels  # 'auto' | 'triton' | 'torch', see RunConfig.kernels
        self.out_rows = out_rows  # HF target name -> its rows in the base output
        self.batch = batch
        self.adapters = nn.ModuleDict()  # job key -> ModuleDict(target -> AdapterLayer)
        self._factors: dict[str, _JobFactors] = {}  # job key -> its factors of the current optimizer step
        # job key -> its factors at evaluation, kept apart: a variant may compute otherwise there (DyLoRA and
        # MatryoshkaLoRA at their export rank), and an evaluation between a job's microbatches must leave the
        # training factors and the gradients they owe alone (evaluation runs without gradients)
        self._eval_factors: dict[str, _JobFactors] = {}
        self.train(base.training)  # wrapping a layer keeps the model's mode

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add_adapter(self, job: str, target: str, layer: AdapterLayer) -> None:
        key = job_key(job)
        if key not in self.adapters:
            self.adapters[key] = nn.ModuleDict()
        self.adapters[key][target] = layer.train(self.training)  # the wrapper's mode (a variant may compute by it)
        self.drop_factors(job)

    def remove_adapter(self, job: str) -> None:
        key = job_key(job)
        if key in self.adapters:
            del self.adapters[key]
        self.drop_factors(job)

    def train(self, mode: bool = True) -> MultiAdapterLinear:
        if mode:
            self._eval_factors.clear()  # back to training: the evaluation's factors are not kept beside the training's
        return super().train(mode)

    def drop_factors(self, job: str) -> None:
        """Forget the job's cached factors (after a load); its next microbatch rebuilds them."""
        self._factors.pop(job_key(job), None)
        self._eval_factors.pop(job_key(job), None)

    def computes_by_factors(self, job: str) -> bool:
        """Whether the job's variant runs through the fused low-rank path (else its layers' forward_delta)."""
        return all(layer.compute == "factors" for layer in self.adapters[job_key(job)].values())

    def job_factors(self, job: str, dtype: torch.dtype = torch.float32):
        """(A_eff [R, K], B_eff [N, R] with scales folded in, dropout p, column scale c_eff [N] or None) of one job
        on this layer, built from its parameters (differentiable)."""
        layers = self.adapters[job_key(job)]
        n_out = self.base.weight.shape[0]
        a_parts, b_blocks, col_scales, p = [], [], [], 0.0
        col = 0
        for target, layer in layers.items():
            a, b, scale = layer.effective_factors()
            a_parts.append(a.to(dtype))
            b_blocks.append((self.out_rows[target], col, (scale * b).to(dtype)))
            c = layer.column_scale()
            if c is not None:
                col_scales.append((self.out_rows[target], c.to(dtype)))
            col += a.shape[0]
            p = layer.dropout_p
        a_eff = torch.cat(a_parts) if len(a_parts) > 1 else a_parts[0]
        c_eff = None
        if len(col_scales) == 1 and len(col_scales[0][0]) == n_out:
            c_eff = col_scales[0][1]
        elif col_scales:
            c_eff = a_eff.new_ones(n_out)  # [N]: 1 on the rows of modules without a scale
            for rows, c in col_scales:
                c_eff = c_eff.index_put((rows,), c)
        if len(b_blocks) == 1 and len(b_blocks[0][0]) == n_out:
            return a_eff, b_blocks[0][2], p, c_eff
        b_eff = a_eff.new_zeros(n_out, col)  # [N, R]: each target's B in its rows and its own columns
        for rows, start, b in b_blocks:
            b_eff[rows, start:start + b.shape[1]] = b
        return a_eff, b_eff, p, c_eff

    def factors(self, job: str, dtype: torch.dtype) -> _JobFactors:
        """The job's factors in `dtype` in the current mode (training or evaluation, cached apart), rebuilt only when
        a parameter changed (an optimizer step, a load)."""
        key = job_key(job)
        cache = self._factors if self.training else self._eval_factors
        cached = cache.get(key)
        if cached is not None and cached.versions == cached.current_versions() and cached.a.dtype == dtype:
            return cached
        if cached is not None and self.training:
            self.collect_grads(job)  # gradients owed to the parameters as they were
        with torch.no_grad():
            a, b, p, c = self.job_factors(job, dtype)
        watched = dict.fromkeys(q for layer in self.adapters[key].values() for q in layer.watched_parameters())
        cache[key] = _JobFactors((a, b, c), p, list(watched))
        return cache[key]

    def collect_grads(self, job: str) -> None:
        """Add the job's gradient sums since the last call to its parameters' .grad (through the factors'
        construction, once per optimizer step) and reset them."""
        cached = self._factors.get(job_key(job))
        if cached is None or all(g is None for g in cached.grads):
            return
        a_eff, b_eff, _, c_eff = self.job_factors(job, torch.float32)
        pairs = [(t, g) for t, g in zip((a_eff, b_eff, c_eff), cached.grads)
                 if g is not None and t is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        cached.grads = [None] * len(cached.grads)

    def _dropped(self, flat: torch.Tensor, seg: Segment, p: float) -> SegmentDropout:
        """Dropout p on the segment's rows of the microbatch's input flat [M, K] (see adapters.dropout)."""
        keys = self.batch.dropout_keys(flat.shape[0], flat.device)[seg.start:seg.end]
        return SegmentDropout(keys, self.site_id, flat.shape[1], p)

    def _segment_update(self, flat: torch.Tensor, seg: Segment):
        """(A, B, c, dropout, 1/keep) of a job on its rows of flat [M, K]: dropout(x) Aᵀ Bᵀ is its update with the
        entries `dropout` drops (a SegmentDropout, None without dropout) zeroed and the product scaled by 1/keep; c
        its column scale or None."""
        factors = self.factors(seg.job, flat.dtype)
        a, b, c = factors.inputs()
        p = factors.dropout_p
        if p == 0.0 or not self.training:
            return a, b, c, None, 1.0
        return a, b, c, self._dropped(flat, seg, p), keep_scale(p)

    def _add_deltas(self, flat: torch.Tensor, y: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """Add the update of every job whose variant computes its own (forward_delta) to its rows of y [M, N]."""
        for seg in segments:
            layers = self.adapters[job_key(seg.job)]
            xs = flat[seg.start:seg.end]  # [tokens, K]
            p = next(iter(layers.values())).dropout_p
            if p > 0.0 and self.training:
                xs = self._dropped(flat, seg, p).zeroed(xs) * keep_scale(p)
            for target, layer in layers.items():
                delta = layer.forward_delta(xs).to(y.dtype)  # [tokens, N_target]
                rows = self.out_rows[target]
                y = _AddRows.apply(y, delta, seg.start, None if len(rows) == y.shape[1] else rows)
        return y

    def forward(self, x: torch.Tensor, *args, **kwargs):
        segments = [s for s in self.batch.segments if job_key(s.job) in self.adapters]
        if not segments:
            return self.base(x, *args, **kwargs)
        by_factors, own = [], []
        for seg in segments:
            (by_factors if self.computes_by_factors(seg.job) else own).append(seg)
        plain = not args and all(v is None for v in kwargs.values()) and self._unsharded(x)
        if resolve_backend(self.kernels, x.device) == "triton":
            if not plain:
                raise RuntimeError(f"site {self.site_id}: the fused LoRA kernels need the input only (got "
                                   f"{list(kwargs) or len(args)} extra) and an unsharded layer (tensor parallel "
                                   "size 1, no sequence parallelism); run with kernels='torch'")
            y, returned_bias = self._forward_fused(x)
        elif plain:
            add_bias, returned_bias = self._bias()
            y = self._apply_torch(x.reshape(-1, x.shape[-1]), by_factors, self.base.weight, add_bias)
        else:
            out, returned_bias = self.base(x, *args, **kwargs)
            added = None if returned_bias is not None else getattr(self.base, "bias", None)
            # x: [tokens, 1, K] (packed row, sequence-first): every job's update added to the base output
            y = self._apply_torch(x.reshape(-1, x.shape[-1]), by_factors, None, added, out.reshape(-1, out.shape[-1]))
        flat_y = y.reshape(-1, y.shape[-1])
        if own:
            flat_y = self._add_deltas(x.reshape(-1, x.shape[-1]), flat_y, own)
        return flat_y.reshape(*x.shape[:-1], flat_y.shape[-1]), returned_bias

    def _unsharded(self, x: torch.Tensor) -> bool:
        """Whether the base layer holds its whole weight (the fused paths compute x Wᵀ themselves)."""
        base = self.base
        n, k = base.weight.shape[0], x.shape[-1]
        return not (getattr(base, "sequence_parallel", False) or n != getattr(base, "output_size", n)
                    or k != getattr(base, "input_size", k))

    def _bias(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bias added to the output here, bias returned beside it), megatron's skip_bias_add convention."""
        bias = getattr(self.base, "bias", None)
        return (None, bias) if getattr(self.base, "skip_bias_add", False) else (bias, None)

    def _apply_torch(self, flat: torch.Tensor, segments: list[Segment], weight: torch.Tensor | None,
                     bias: torch.Tensor | None, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """The base GEMM (or the given base output, which includes `bias`) and every job's update in one autograd
        node (_MultiLoRALinear)."""
        rows, dropped, scales, factors = [], [], [], []
        for seg in segments:
            a, b, c, dropout, scale = self._segment_update(flat, seg)
            rows.append((seg.start, seg.end))
            dropped.append(dropout)
            scales.append(scale)
            factors += [a, b, c]
        return _MultiLoRALinear.apply(flat, weight, bias, base_out, rows, dropped, scales, *factors)

    def _forward_fused(self, x: torch.Tensor):
        """Base GEMM and every job's low-rank update (with its column scale, DoRA) in one Triton op over the whole
        packed microbatch."""
        from lorafusion.ops.fused_lora import fused_multi_lora_linear

        k = x.shape[-1]
        add_bias, returned_bias = self._bias()
        table = self.batch.segment_table(x.numel() // k, x.device)
        a_list, b_list, c_list, ps = [], [], [], []
        for seg in self.batch.segments:
            a, b, c, p = None, None, None, 0.0
            if job_key(seg.job) in self.adapters and self.computes_by_factors(seg.job):
                factors = self.factors(seg.job, x.dtype)
                (a, b, c), p = factors.inputs(), factors.dropout_p
            a_list.append(a)
            b_list.append(b)
            c_list.append(c)
            ps.append(p if self.training else 0.0)
        y = fused_multi_lora_linear(x, self.base.weight, a_list, b_list, table, scalings=[1.0] * len(a_list),
                                    dropout_ps=ps, site_id=self.site_id, bias=add_bias, column_scales=c_list)
        return y, returned_bias


class _AddRows(torch.autograd.Function):
    """y[start:start + tokens, cols] += delta in y's own storage (cols None: every column), differentiable in both
    (y may be a tensor autograd has not seen yet: the first adapted layer's input needs no gradient)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, delta: torch.Tensor, start: int, cols: torch.Tensor | None) -> torch.Tensor:
        ctx.start, ctx.end, ctx.cols = start, start + delta.shape[0], cols
        if cols is None:
            y[start:ctx.end] += delta
        else:
            y[start:ctx.end].index_add_(1, cols, delta)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        part = dy[ctx.start:ctx.end]
        return dy, part if ctx.cols is None else part.index_select(1, ctx.cols), None, None


class _MultiLoRALinear(torch.autograd.Function):
    """y = x Wᵀ (+ bias) (or a given base output that includes `bias`), then per job segment
    y[rows] += (1/keep) · (x[rows] with its dropped entries zeroed) Aᵀ Bᵀ, or with a column scale c
    y[rows] = c ⊙ (y[rows] − bias + that update) + bias.

    The torch path's one node per layer (what the Triton op fuses on CUDA): each job's update is added into
    its rows of y in place, and its input gradient into its rows of dx = dy W, so no full-size zero, cat or
    add is built. x [M, K]; weight [N, K] (frozen) or None with base_out [M, N]; factors: A_0 [R_0, K],
    B_0 [N, R_0], c_0 [N] or None, A_1, B_1, c_1, ... with the adapter's scale folded in; dropped: per segment a
    SegmentDropout or None; scales: per segment dropout's 1/keep (1.0 without dropout).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, base_out, rows, dropped, scales, *factors):
        y = F.linear(x, weight, bias) if weight is not None else base_out.clone()  # [M, N]
        inputs, lows, pres = [], [], []  # per segment x̂ [rows, K], T = x̂ Aᵀ / keep [rows, R], c's input [rows, N]
        for (start, end), dropout, scale, a, b, c in zip(rows, dropped, scales, *(factors[i::3] for i in range(3))):
            inputs.append(x[start:end] if dropout is None else dropout.zeroed(x[start:end]))
            low = inputs[-1] @ a.t()
            lows.append(low if scale == 1.0 else low.mul_(scale))
            if c is None:
                y[start:end].addmm_(lows[-1], b.t())
                continue
            pre = (y[start:end] if bias is None else y[start:end] - bias).addmm(lows[-1], b.t())  # [rows, N]
            pres.append(pre)
            torch.mul(pre, c, out=y[start:end])
            if bias is not None:
                y[start:end] += bias
        ctx.save_for_backward(weight, *(t for t in factors if t is not None), *inputs, *lows, *pres)
        ctx.rows, ctx.dropped, ctx.scales, ctx.in_features = rows, dropped, scales, x.shape[1]
        ctx.has_scale = [c is not None for c in factors[2::3]]
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, *rest = ctx.saved_tensors
        count, scaled = len(ctx.rows), ctx.has_scale
        n_factors = 2 * count + sum(scaled)
        packed, rest = rest[:n_factors], rest[n_factors:]
        inputs, lows, pres = rest[:count], rest[count:2 * count], iter(rest[2 * count:])
        factors, it = [], iter(packed)
        for has in scaled:
            factors.append((next(it), next(it), next(it) if has else None))
        grads_c = [None] * count
        if any(scaled):  # c ⊙ (...) passes dy ⊙ c on to everything inside it
            dy = dy.clone()
            for i, ((start, end), (_, _, c)) in enumerate(zip(ctx.rows, factors)):
                if c is not None:
                    grads_c[i] = (dy[start:end] * next(pres)).sum(0)  # [N]
                    dy[start:end].mul_(c)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight if weight is not None else dy.new_zeros(dy.shape[0], ctx.in_features)  # [M, K]
        grads = []
        for (start, end), dropout, scale, (a, b, _), xs, t, dc in zip(ctx.rows, ctx.dropped, ctx.scales, factors,
                                                                   inputs, lows, grads_c):
            dys = dy[start:end]
            g = dys @ b  # [rows, R]
            if scale != 1.0:
                g.mul_(scale)
            grads += [g.t() @ xs, dys.t() @ t, dc]  # dA [R, K], dB [N, R], dc [N] or None
            if dx is not None:
                if dropout is None:
                    dx[start:end].addmm_(g, a)
                else:
                    dropout.add_kept_(dx[start:end], g @ a)
        base_grad = dy if ctx.needs_input_grad[3] else None
        return dx, None, None, base_grad, None, None, None, *grads
