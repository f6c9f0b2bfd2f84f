"""What `lf.fit` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["JobResult", "FitResult"]


@dataclass(kw_only=True)
class JobResult:
    """One job's outcome."""

    name: str
    steps: int
    """Optimizer steps taken."""
    tokens: int
    """Tokens processed (all tokens of its samples)."""
    final_loss: float | None
    """Loss of the last global batch (mean over its loss tokens)."""
    adapter_path: str | None
    """<output_dir>/<job>/adapter, or None if the job failed."""
    status: str = "finished"
    """'finished' or 'failed'."""
    error: str | None = None
    """Why the job failed, when it did."""
    eval_loss: float | None = None
    """Final evaluation loss, when the job has an eval_dataset."""


@dataclass(kw_only=True)
class FitResult:
    jobs: dict[str, JobResult] = field(default_factory=dict)
    output_dir: str = ""
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    """Real (unpadded) tokens per second over the whole fit."""

    def __getitem__(self, name: str) -> JobResult:
        return self.jobs[name]
