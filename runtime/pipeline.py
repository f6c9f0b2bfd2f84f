"""Pipeline layout and schedule, as pure functions: which layers each stage holds, and 1F1B op order.

1F1B on stage i of S over n microbatches: S - 1 - i warm-up forwards, then one forward and one backward
alternately, then the remaining backwards. On stage 0 the forward of microbatch b therefore runs after the
backward of microbatch b - S: a job whose next global batch starts ≥ S microbatches after the last one of
its previous batch finds its optimizer step done on every stage (the scheduler's distance rule).
"""

from __future__ import annotations

__all__ = ["split_layers", "OneFOneB", "one_f_one_b", "bubble_fraction"]


def split_layers(num_layers: int, stages: int, layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """Each stage's decoder layers [start, end): balanced by count (earlier stages take the extra layers),
    or exactly `layers_per_stage` when given."""
    if stages > num_layers:
        raise ValueError(
            f"run.pipeline_stages={stages} exceeds the model's {num_layers} layers; every stage needs at least "
            f"one layer, so use at most {num_layers} stages"
        )
    if layers_per_stage is None:
        base, extra = divmod(num_layers, stages)
        layers_per_stage = [base + (1 if s < extra else 0) for s in range(stages)]
    elif len(layers_per_stage) != stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
        raise ValueError(
            f"run.stage_layers={layers_per_stage} must list {stages} positive layer counts (one per pipeline "
            f"stage) summing to the model's {num_layers} layers"
        )
    bounds, start = [], 0
    for count in layers_per_stage:
        bounds.append((start, start + count))
        start += count
    return bounds


class OneFOneB:
    """1F1B of one stage over an open-ended microbatch stream that arrives window by window.

    The op order is that of `one_f_one_b` over the whole stream, however the stream is cut into windows: a
    window that is not drained ends where the next op would be the forward of a microbatch not yet received,
    so its last forwards' backwards (at most S - 1 - stage of them) open the next window instead of a flush.
    Every stage cut at the same microbatch still exchanges activations and gradients in stream order, so
    stage i's sends wait only for stage i ± 1's next window, never for an op it must do first.
    """

    def __init__(self, stage: int, stages: int) -> None:
        self.warmup = stages - 1 - stage
        self.next_forward = 0
        self.next_backward = 0

    @property
    def in_flight(self) -> int:
        """Microbatches forwarded on this stage whose backward has not run yet."""
        return self.next_forward - self.next_backward

    def ops(self, received: int, drain: bool) -> list[tuple[str, int]]:
        """The next ops ("F", i) / ("B", i) once microbatches 0..received-1 have arrived; `drain`: also every
        backward still owed (a flush: the stream may then start again from microbatch 0 in a new OneFOneB)."""
        ops = []
        while True:
            if self.next_forward < received and self.in_flight <= self.warmup:
                ops.append(("F", self.next_forward))
                self.next_forward += 1
            elif self.in_flight > self.warmup or (drain and self.in_flight > 0):
                ops.append(("B", self.next_backward))
                self.next_backward += 1
            else:
                return ops


def one_f_one_b(stage: int, stages: int, num_microbatches: int) -> list[tuple[str, int]]:
    """The op order of `stage` over `num_microbatches`, drained at the end: ("F", i) forward of microbatch i,
    ("B", i) its backward."""
    return OneFOneB(stage, stages).ops(num_microbatches, drain=True)


def bubble_fraction(busy_s: float, span_s: float) -> float:
    """Idle share of a stage between the start of its first op and the end of its last one."""
    return max(0.0, 1.0 - busy_s / span_s) if span_s > 0 else 0.0
