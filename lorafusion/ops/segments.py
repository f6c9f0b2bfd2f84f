"""The per-microbatch table that tells every kernel which adapter (job) owns which token rows.

Built on the device once per microbatch and reused by every adapted layer. A kernel tile of any height
finds the segments it overlaps from `row_seg` at its first and last row, then masks rows by each
segment's [start, end); rows in no segment (padding) get the base output only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SegmentTable", "LayerParams"]


@dataclass(frozen=True)
class LayerParams:
    """Per-segment adapter settings of one layer, on the device."""

    ranks: torch.Tensor  # [S] int32, 0 = no adapter for this segment on this layer
    r_offsets: torch.Tensor  # [S] int32, first column of the segment's factors in B_cat (row in A_cat)
    scalings: torch.Tensor  # [S] fp32
    dropout_ps: torch.Tensor  # [S] fp32
    max_rank: int
    col_index: torch.Tensor | None = None  # [S] int32: the segment's row of the column scales c_cat, -1 = none
    pre_offsets: torch.Tensor | None = None  # [S] int32: its first row in the saved pre-scale outputs, -1 = none
    scaled_rows: int = 0  # rows of the segments with a column scale (the saved pre-scale outputs' height)

    @property
    def has_scale(self) -> bool:
        return self.col_index is not None


@dataclass
class SegmentTable:
    """Segments [start, end) in row order, and per row the dropout stream it draws from.

    A row's dropout mask is a function of (its sample's seed, the layer's site id, its index within the
    sample, the column) only, so a job's masks do not depend on the other rows of the microbatch.
    """

    num_rows: int
    seg_start: torch.Tensor  # [S] int32
    seg_end: torch.Tensor  # [S] int32
    row_seg: torch.Tensor  # [M] int32: last segment starting at or before the row (0 before the first)
    row_seed: torch.Tensor  # [M] int64: the row's sample seed
    row_pos: torch.Tensor  # [M] int32: the row's index within its sample
    bounds: tuple[tuple[int, int], ...]
    _params: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, num_rows: int, segments: list[tuple[int, int]], samples: list[tuple[tuple[int, int, int], ...]] | None = None,
              device: torch.device | str = "cpu") -> "SegmentTable":
        """`segments`: (start, end) per adapter segment, sorted and disjoint; `samples`: per segment its
        (start, end, seed) samples (empty = the whole segment is one sample with seed 0)."""
        _check_segments(num_rows, segments)
        samples = samples or [()] * len(segments)
        if len(samples) != len(segments):
            raise ValueError(f"samples has {len(samples)} entries for {len(segments)} segments; give one tuple per segment")
        row_seg = torch.zeros(num_rows, dtype=torch.int32)
        row_seed = torch.zeros(num_rows, dtype=torch.int64)
        row_pos = torch.zeros(num_rows, dtype=torch.int32)
        for index, ((start, end), parts) in enumerate(zip(segments, samples)):
            row_seg[start:] = index
            for s_start, s_end, seed in parts or ((start, end, 0),):
                if not start <= s_start <= s_end <= end:
                    raise ValueError(f"sample rows [{s_start}, {s_end}) lie outside their segment [{start}, {end})")
                row_seed[s_start:s_end] = seed
                row_pos[s_start:s_end] = torch.arange(s_end - s_start, dtype=torch.int32)
        starts = torch.tensor([s for s, _ in segments], dtype=torch.int32)
        ends = torch.tensor([e for _, e in segments], dtype=torch.int32)
        device = torch.device(device)
        return cls(num_rows, starts.to(device), ends.to(device), row_seg.to(device), row_seed.to(device),
                   row_pos.to(device), tuple(segments))

    @property
    def num_segments(self) -> int:
        return len(self.bounds)

    @property
    def longest_segment(self) -> int:
        """Rows of the longest segment (at least 1): the row splits of the per-segment reductions cover it."""
        return max(max(end - start for start, end in self.bounds), 1)

    def layer_params(self, ranks: tuple[int, ...], scalings: tuple[float, ...], dropout_ps: tuple[float, ...],
                     scaled: tuple[bool, ...] | None = None) -> LayerParams:
        """Device tensors for one layer's settings, uploaded once per distinct setting per microbatch. scaled: which
        segments have a per-column output scale (DoRA), in the order of their rows in c_cat."""
        scaled = tuple(scaled) if scaled is not None and any(scaled) else None
        key = (tuple(ranks), tuple(scalings), tuple(dropout_ps), scaled)
        if key not in self._params:
            if not len(ranks) == len(scalings) == len(dropout_ps) == self.num_segments:
                raise ValueError(f"need one rank, scaling and dropout p per segment ({self.num_segments}), "
                                 f"got {len(ranks)}, {len(scalings)}, {len(dropout_ps)}")
            for p in dropout_ps:
                if not 0.0 <= p < 1.0:
                    raise ValueError(f"dropout p={p} must be in [0, 1)")
            offsets = [0]
            for r in ranks[:-1]:
                offsets.append(offsets[-1] + r)
            device = self.seg_start.device
            col_index = pre_offsets = None
            rows = 0
            if scaled is not None:
                if len(scaled) != self.num_segments:
                    raise ValueError(f"need one 'scaled' flag per segment ({self.num_segments}), got {len(scaled)}")
                indices, starts = [], []
                for flag, (start, end) in zip(scaled, self.bounds):
                    indices.append(len(starts) - starts.count(-1) if flag else -1)  # scaled segments before it
                    starts.append(rows if flag else -1)
                    rows += (end - start) if flag else 0
                col_index = torch.tensor(indices, dtype=torch.int32, device=device)
                pre_offsets = torch.tensor(starts, dtype=torch.int32, device=device)
            self._params[key] = LayerParams(
                ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
                r_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
                scalings=torch.tensor(scalings, dtype=torch.float32, device=device),
                dropout_ps=torch.tensor(dropout_ps, dtype=torch.float32, device=device),
                max_rank=max(ranks, default=0), col_index=col_index, pre_offsets=pre_offsets, scaled_rows=rows,
            )
        return self._params[key]


def _check_segments(num_rows: int, segments: list[tuple[int, int]]) -> None:
    if not segments:
        raise ValueError("a segment table needs at least one (start, end) segment")
    cursor = 0
    for start, end in segments:
        if not cursor <= start <= end <= num_rows:
            raise ValueError(f"segment [{start}, {end}) must be sorted, disjoint and inside [0, {num_rows})")
        cursor = end
