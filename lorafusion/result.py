"""What `lf.fit` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["JobResult", "FitResult", "FitInterrupted"]


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
    first_loss: float | None = None
    """Loss of the job's first global batch (from its metrics.jsonl), for the summary."""


@dataclass(kw_only=True)
class FitResult:
    jobs: dict[str, JobResult] = field(default_factory=dict)
    output_dir: str = ""
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    """Real (unpadded) tokens per second over the whole fit."""
    already_complete: bool = False
    """The output directory held this run finished already: nothing was trained, the results are its own."""

    def __getitem__(self, name: str) -> JobResult:
        return self.jobs[name]

    def summary(self) -> str:
        """What a fit says at its end: the run's totals, then one line per job (loss first → last, its adapter)."""
        if self.already_complete:
            head = f"{self.output_dir} already holds this run, complete: nothing to train ({len(self.jobs)} jobs)"
        else:
            head = f"{len(self.jobs)} jobs, {self.wall_time_s:.1f} s, {self.tokens_per_s:.0f} tokens/s"
        width = max((len(name) for name in self.jobs), default=4)
        lines = [head]
        for job in self.jobs.values():
            if job.status != "finished":
                lines.append(f"  {job.name:<{width}} FAILED after {job.steps} steps: {job.error}")
                continue
            first = "?" if job.first_loss is None else f"{job.first_loss:.3f}"
            last = "?" if job.final_loss is None else f"{job.final_loss:.3f}"
            lines.append(f"  {job.name:<{width}} loss {first} → {last}   adapter: {job.adapter_path}")
        return "\n".join(lines)


class FitInterrupted(KeyboardInterrupt):
    """A fit stopped by SIGINT/SIGTERM after writing a checkpoint; running it again resumes there."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.message, self.signum = message, signum

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum
