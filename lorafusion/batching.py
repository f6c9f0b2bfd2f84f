"""Packed microbatches: several jobs' samples in one row, and the per-token loss over them.

Tokens are ordered by job (each job's samples contiguous) so every adapted layer sees one segment per
job; samples are separated by `cu_seqlens` so attention and RoPE positions restart per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lorafusion.adapters.multi import Segment
from lorafusion.data import IGNORE_INDEX, Sample
from lorafusion.models.attention import PackedLayout, PackedParams

__all__ = ["Microbatch", "build_microbatch", "token_losses"]


@dataclass
class Microbatch:
    """One packed row of samples, ready for the model."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T], restarting at 0 for every sample
    labels: torch.Tensor  # [1, T], IGNORE_INDEX where no loss
    layout: PackedLayout
    """Where each sample lies, for attention and RoPE (built once, shared by every layer)."""
    segments: list[Segment]
    """Token rows of each job, in order."""

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.layout.cu_seqlens  # [samples + 1] int32

    def packed_seq_params(self) -> PackedParams:
        return PackedParams(self.layout)

    def to(self, device: torch.device) -> "Microbatch":
        return Microbatch(self.input_ids.to(device, non_blocking=True), self.position_ids.to(device, non_blocking=True),
                          self.labels.to(device, non_blocking=True), self.layout.to(device), self.segments)


def build_microbatch(items: list[tuple]) -> Microbatch:
    """Pack (job name, sample[, dropout seed]) items into one row, each job's samples together (stable)."""
    if not items:
        raise ValueError("build_microbatch needs at least one sample")
    order: dict[str, list[tuple[Sample, int]]] = {}
    for job, sample, *seed in items:
        order.setdefault(job, []).append((sample, seed[0] if seed else 0))
    ids, pos, labels, bounds, segments = [], [], [], [0], []
    for job, samples in order.items():
        start, spans = bounds[-1], []
        for sample, seed in samples:
            ids.extend(sample.input_ids)
            labels.extend(sample.labels)
            pos.extend(range(len(sample)))
            spans.append((bounds[-1], bounds[-1] + len(sample), seed))
            bounds.append(bounds[-1] + len(sample))
        segments.append(Segment(job, start, bounds[-1], tuple(spans)))
    return Microbatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        layout=PackedLayout.build([b - a for a, b in zip(bounds[:-1], bounds[1:])]),
        segments=segments,
    )


def token_losses(model: torch.nn.Module, mb: Microbatch) -> torch.Tensor:
    """Cross-entropy of every token of `mb` ([T], fp32, zero where the label is ignored)."""
    mask = mb.labels != IGNORE_INDEX
    targets = torch.where(mask, mb.labels, torch.zeros_like(mb.labels))
    # megatron's GPTModel returns per-token loss [b, s] when given labels.
    losses = model(mb.input_ids, mb.position_ids, None, labels=targets, packed_seq_params=mb.packed_seq_params())
    return (losses.float() * mask)[0]
