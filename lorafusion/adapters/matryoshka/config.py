"""MatryoshkaLoRA (Modoranu, Safaryan, Alistarh 2026): one adapter trained as the sum of its nested sub-adapters of
the train ranks, so that each of them works on its own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig
from lorafusion.validation import check_positive_int

__all__ = ["MatryoshkaLoRAConfig"]

_SCALES = {"none": lambda t: 1.0, "rank": lambda t: 1.0 / t, "sqrt": lambda t: 1.0 / math.sqrt(t)}


@dataclass(kw_only=True)
class MatryoshkaLoRAConfig(AdapterConfig):
    """Trains ΔW = Σ_{t ∈ train_ranks} scale(t) · B[:, :t] A[:t], written as the authors' 'diag' form with its
    fixed diagonal P: ΔW = B diag(P) A, P[i] = Σ_{t ∈ train_ranks, t > i} scale(t) (their Algorithm 1; the sum has no
    1/|T|, unlike their 'binary' form, which is not offered). At evaluation and in the export the adapter is used at
    `export_rank`: scale(t) · B[:, :t] A[:t], a plain LoRA of rank t with alpha t·scale(t).
    Init as the authors' code (IST-DASLab/MatryoshkaLoRA): Kaiming-uniform of their A [in, rank], whose fan-in is
    the rank, so our A [rank, in] is uniform in ±1/√rank (not PEFT's ±1/√in); B [out, rank] zero."""

    type: ClassVar[str] = "matryoshka"
    train_ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """The nested ranks trained together, increasing; the largest is the adapter's rank."""
    scale: str = "none"
    """scale(t) of the rank-t sub-adapter, the authors' names: 'none' (1), 'rank' (1/t), 'sqrt' (1/√t)."""
    export_rank: int | None = None
    """Train rank used at evaluation and written to the PEFT export (a plain LoRA of this rank); default: the
    largest."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ranks = self.train_ranks
        if not isinstance(ranks, (list, tuple)) or not ranks:
            raise ValueError(f"adapter.train_ranks={ranks!r} must be a non-empty list of ranks, "
                             "e.g. train_ranks: [4, 8, 16]")
        for t in ranks:
            check_positive_int("adapter.train_ranks", t, "[4, 8, 16]")
        if any(b <= a for a, b in zip(ranks, ranks[1:])):
            raise ValueError(f"adapter.train_ranks={list(ranks)} must be strictly increasing, "
                             f"e.g. train_ranks: {sorted(set(ranks))}")
        self.train_ranks = list(ranks)
        if not isinstance(self.scale, str) or self.scale not in _SCALES:
            raise ValueError(f"adapter.scale={self.scale!r} is not one of {list(_SCALES)}, e.g. scale: none")
        if self.export_rank is None:
            self.export_rank = self.rank
        check_positive_int("adapter.export_rank", self.export_rank, str(self.rank))
        if self.export_rank not in self.train_ranks:
            raise ValueError(f"adapter.export_rank={self.export_rank!r} is not a train rank; use one of "
                             f"{self.train_ranks}")

    @property
    def rank(self) -> int:
        """The adapter's rank: the largest train rank."""
        return self.train_ranks[-1]

    def scale_of(self, t: int) -> float:
        """scale(t) of the rank-t sub-adapter."""
        return _SCALES[self.scale](t)

    def export_config(self) -> AdapterConfig:
        t = self.export_rank
        return LoRAConfig(rank=t, alpha=t * self.scale_of(t), dropout=self.dropout,
                          target_modules=list(self.target_modules))
