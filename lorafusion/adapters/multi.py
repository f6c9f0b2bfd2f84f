"""Many jobs' adapters on one frozen megatron linear layer.

A packed microbatch orders its tokens by job: job j owns rows [start_j, end_j). The layer runs one
base GEMM over all rows, then adds each job's low-rank update to its own rows only. A job that adapts
several HF modules fused into one megatron layer (q/k/v → linear_qkv, gate/up → linear_fc1) gets one
low-rank product: A_eff stacks the A's, B_eff places each B into that module's output rows.

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
from lorafusion.ops.utils import resolve_backend

__all__ = ["Segment", "AdapterBatch", "MultiAdapterLinear", "drop_threshold", "job_key", "mix_seed"]


def job_key(name: str) -> str:
    """Module-dict key for a job name.

    The prefix keeps names like 'eval' or 'train' from clashing with nn.Module attributes; '.' is not
    allowed in module names and '%' never occurs in job names, so the mapping is one-to-one.
    """
    return "job_" + name.replace(".", "%2E")


_INT16_VALUES = 1 << 16
_INT16_MIN = -(1 << 15)


def drop_threshold(p: float) -> int:
    """How many of the 2^16 values of a 16-bit uniform draw drop an entry: dropout p is honoured to 1/65536
    (p = 0.05 drops with probability 3277/65536), and the kept entries are scaled by the exact inverse."""
    return min(round(p * _INT16_VALUES), _INT16_VALUES - 1)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), stable across processes and runs."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


@dataclass(frozen=True)
class Segment:
    """Token rows [start, end) of the current microbatch that belong to job `job`."""

    job: str
    start: int
    end: int
    samples: tuple[tuple[int, int, int], ...] = ()
    """(start, end, dropout seed) of each sample in the segment; empty = one sample, seed 0."""


@dataclass
class AdapterBatch:
    """What every adapted layer needs to know about the microbatch being run (shared by reference)."""

    segments: list[Segment] = field(default_factory=list)
    _table: tuple | None = field(default=None, repr=False)  # (segments list, rows, device, SegmentTable)

    def segment_table(self, num_rows: int, device: torch.device):
        """The kernels' SegmentTable of the current segments, built on `device` once per microbatch."""
        from lorafusion.ops.segments import SegmentTable

        cached = self._table
        if cached is None or cached[0] is not self.segments or cached[1] != num_rows or cached[2] != device:
            table = SegmentTable.build(num_rows, [(s.start, s.end) for s in self.segments],
                                       [s.samples for s in self.segments], device=device)
            self._table = cached = (self.segments, num_rows, device, table)
        return cached[3]


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

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add_adapter(self, job: str, target: str, layer: AdapterLayer) -> None:
        key = job_key(job)
        if key not in self.adapters:
            self.adapters[key] = nn.ModuleDict()
        self.adapters[key][target] = layer

    def remove_adapter(self, job: str) -> None:
        key = job_key(job)
        if key in self.adapters:
            del self.adapters[key]

    def job_factors(self, job: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A_eff [R, K], B_eff [N, R] with scales folded in, dropout p) of one job on this layer."""
        layers = self.adapters[job_key(job)]
        n_out = self.base.weight.shape[0]
        a_parts, b_blocks, p = [], [], 0.0
        col = 0
        for target, layer in layers.items():
            a, b, scale = layer.effective_factors()
            a_parts.append(a.to(dtype))
            b_blocks.append((self.out_rows[target], col, (scale * b).to(dtype)))
            col += a.shape[0]
            p = layer.dropout_p
        a_eff = torch.cat(a_parts) if len(a_parts) > 1 else a_parts[0]
        if len(b_blocks) == 1 and len(b_blocks[0][0]) == n_out:
            return a_eff, b_blocks[0][2], p
        b_eff = a_eff.new_zeros(n_out, col)  # [N, R]: each target's B in its rows and its own columns
        for rows, start, b in b_blocks:
            b_eff[rows, start:start + b.shape[1]] = b
        return a_eff, b_eff, p

    def _dropped(self, x: torch.Tensor, seg: Segment, p: float) -> torch.Tensor:
        """Which of the segment's entries dropout zeroes: bool [tokens, K].

        Each sample's draws come from its own seed (set by the driver from the job's seed, step and the
        sample's place in its global batch) and this layer's id, so they do not depend on which other
        samples or jobs share the microbatch, nor on how the job's batch was split into microbatches.
        An entry drops when its 16-bit uniform falls below drop_threshold(p): one 64-bit draw decides four
        entries, several times cheaper than a float Bernoulli draw per entry on CPU.
        """
        k = x.shape[1]
        dropped = torch.empty((seg.end - seg.start, k), dtype=torch.bool, device=x.device)
        below = _INT16_MIN + drop_threshold(p)  # int16 draws under this drop
        generator = torch.Generator(device=x.device)
        cursor = seg.start
        for start, end, seed in seg.samples or ((seg.start, seg.end, 0),):
            if start != cursor:
                raise ValueError(f"job '{seg.job}': sample rows [{start}, {end}) do not continue the segment's samples "
                                 f"at row {cursor}; a segment's samples must tile its rows [{seg.start}, {seg.end})")
            generator.manual_seed(mix_seed(seed, self.site_id))
            count = (end - start) * k
            words = torch.empty(-(-count // 4), dtype=torch.int64, device=x.device)
            words.random_(-(2**63), None, generator=generator)  # the full 64-bit range: four uniform int16
            uniform = words.view(torch.int16)[:count].view(end - start, k)
            torch.lt(uniform, below, out=dropped[start - seg.start:end - seg.start])
            cursor = end
        if cursor != seg.end:
            raise ValueError(f"job '{seg.job}': its samples end at row {cursor}, its segment at {seg.end}; "
                             "a segment's samples must tile its rows")
        return dropped

    def _segment_update(self, x: torch.Tensor, seg: Segment):
        """(A, B, dropped) of a job on its rows x [tokens, K]: dropout(x) Aᵀ Bᵀ is its update with the
        entries `dropped` (bool [tokens, K], None without dropout) zeroed; dropout's 1/keep rides on the small A."""
        a_eff, b_eff, p = self.job_factors(seg.job, x.dtype)
        if p == 0.0 or not self.training:
            return a_eff, b_eff, None
        return a_eff / (1.0 - drop_threshold(p) / _INT16_VALUES), b_eff, self._dropped(x, seg, p)

    def _delta(self, x: torch.Tensor, seg: Segment) -> torch.Tensor:
        # x: [tokens, K] -> [tokens, N]
        a_eff, b_eff, dropped = self._segment_update(x, seg)
        if dropped is not None:
            x = x.masked_fill(dropped, 0.0)
        return F.linear(F.linear(x, a_eff), b_eff)  # [tokens, R] -> [tokens, N]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        segments = [s for s in self.batch.segments if job_key(s.job) in self.adapters]
        if not segments:
            return self.base(x, *args, **kwargs)
        plain = not args and all(v is None for v in kwargs.values()) and self._unsharded(x)
        if resolve_backend(self.kernels, x.device) == "triton":
            if not plain:
                raise RuntimeError(f"site {self.site_id}: the fused LoRA kernels need the input only (got "
                                   f"{list(kwargs) or len(args)} extra) and an unsharded layer (tensor parallel "
                                   "size 1, no sequence parallelism); run with kernels='torch'")
            return self._forward_fused(x)
        if plain:
            return self._forward_torch(x, segments)
        out, bias = self.base(x, *args, **kwargs)
        # x: [tokens, 1, K] (packed row, sequence-first) -> per-job row slices
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        # One add of every job's update (zeros on rows of no job): the backward hands dy to the base output
        # whole, where adding slices of it would build a full-size zero gradient per slice.
        deltas, cursor = [], 0  # [rows, N] pieces in row order
        for seg in segments:
            if seg.start > cursor:
                deltas.append(flat_out.new_zeros(seg.start - cursor, flat_out.shape[1]))
            deltas.append(self._delta(flat_x[seg.start:seg.end], seg))
            cursor = seg.end
        if cursor < flat_out.shape[0]:
            deltas.append(flat_out.new_zeros(flat_out.shape[0] - cursor, flat_out.shape[1]))
        delta = torch.cat(deltas) if len(deltas) > 1 else deltas[0]
        return (flat_out + delta).reshape(out.shape), bias

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

    def _forward_torch(self, x: torch.Tensor, segments: list[Segment]):
        """Base GEMM and every job's update in one autograd node of torch ops (see _MultiLoRALinear)."""
        add_bias, returned_bias = self._bias()
        rows, dropped, factors = [], [], []
        flat = x.reshape(-1, x.shape[-1])
        for seg in segments:
            a_eff, b_eff, mask = self._segment_update(flat[seg.start:seg.end], seg)
            rows.append((seg.start, seg.end))
            dropped.append(mask)
            factors += [a_eff, b_eff]
        y = _MultiLoRALinear.apply(flat, self.base.weight, add_bias, rows, dropped, *factors)
        return y.reshape(*x.shape[:-1], y.shape[-1]), returned_bias

    def _forward_fused(self, x: torch.Tensor):
        """Base GEMM and every job's update in one Triton op over the whole packed microbatch."""
        from lorafusion.ops.fused_lora import fused_multi_lora_linear

        k = x.shape[-1]
        add_bias, returned_bias = self._bias()
        table = self.batch.segment_table(x.numel() // k, x.device)
        a_list, b_list, ps = [], [], []
        for seg in self.batch.segments:
            if job_key(seg.job) in self.adapters:
                a_eff, b_eff, p = self.job_factors(seg.job, x.dtype)
            else:
                a_eff, b_eff, p = None, None, 0.0
            a_list.append(a_eff)
            b_list.append(b_eff)
            ps.append(p if self.training else 0.0)
        y = fused_multi_lora_linear(x, self.base.weight, a_list, b_list, table, scalings=[1.0] * len(a_list),
                                    dropout_ps=ps, site_id=self.site_id, bias=add_bias)
        return y, returned_bias


class _MultiLoRALinear(torch.autograd.Function):
    """y = x Wᵀ (+ bias), then per job segment y[rows] += (x[rows] with its dropped entries zeroed) Aᵀ Bᵀ.

    The torch path's one node per layer (what the Triton op fuses on CUDA): each job's update is added into
    its rows of y in place, and its input gradient into its rows of dx = dy W, so no full-size zero, cat or
    add is built. x [M, K]; weight [N, K] (frozen); factors: A_0 [R_0, K], B_0 [N, R_0], A_1, B_1, ... with
    the scale (and dropout's 1/keep) already folded in; dropped: per segment a bool [rows, K] or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, dropped, *factors):
        y = F.linear(x, weight, bias)  # [M, N]
        inputs, lows = [], []  # per segment x̂ [rows, K] (a view of x without dropout) and T = x̂ Aᵀ [rows, R]
        for (start, end), mask, a, b in zip(rows, dropped, factors[0::2], factors[1::2]):
            inputs.append(x[start:end] if mask is None else x[start:end].masked_fill(mask, 0.0))
            lows.append(inputs[-1] @ a.t())
            y[start:end].addmm_(lows[-1], b.t())
        ctx.save_for_backward(weight, *factors, *inputs, *lows)  # x̂ instead of x: dA needs x̂, dx needs neither
        ctx.rows, ctx.dropped = rows, dropped
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, *rest = ctx.saved_tensors
        count = len(ctx.rows)
        factors, inputs, lows = rest[:2 * count], rest[2 * count:3 * count], rest[3 * count:]
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # [M, K]
        grads = []
        for (start, end), mask, a, b, xs, t in zip(ctx.rows, ctx.dropped, factors[0::2], factors[1::2], inputs, lows):
            dys = dy[start:end]
            g = dys @ b  # [rows, R]
            grads += [g.t() @ xs, dys.t() @ t]  # dA [R, K], dB [N, R]
            if dx is not None:
                if mask is None:
                    dx[start:end].addmm_(g, a)
                else:
                    dx[start:end] += (g @ a).masked_fill_(mask, 0.0)
        return dx, None, None, None, None, *grads
