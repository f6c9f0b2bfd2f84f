"""`lorafusion.fit`: validate, plan rounds of packed microbatches, train every job, export adapters.

Each round takes every active job's next global batch and packs all those samples together; a job
steps as soon as the backward of its last microbatch in the round is done.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from lorafusion.batching import build_microbatch
from lorafusion.config import JobSpec, RunConfig
from lorafusion.data import Sample
from lorafusion.prepare import RUN_MANIFEST, PreparedJob, PreparedRun, prepare_run
from lorafusion.result import FitResult, JobResult
from runtime.progress import MetricsWriter, Progress
from runtime.worker import StageWorker
from scheduler import first_fit_decreasing

__all__ = ["fit", "plan_round"]


def plan_round(
    batches: dict[str, list[Sample]], capacity: int, seeds: dict[str, list[int]]
) -> list[list[tuple[str, Sample, int]]]:
    """Pack the round's samples (every job's current global batch) into microbatches of ≤ capacity tokens.

    Items are (job, sample, dropout seed); `seeds[job][i]` is the seed of the job's i-th sample, so
    masks follow the sample, not the microbatch it lands in.
    """
    items = [(job, s, seed) for job, samples in batches.items() for s, seed in zip(samples, seeds[job])]
    bins = first_fit_decreasing([len(item[1]) for item in items], capacity)
    return [[items[i] for i in b] for b in bins]


def _start_output(prepared: PreparedRun) -> None:
    out = Path(prepared.run.output_dir)
    if out.exists() and prepared.run.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"run": prepared.run.to_dict(), "jobs": [j.spec.to_dict() for j in prepared.jobs]}
    (out / RUN_MANIFEST).write_text(json.dumps(manifest, indent=2))


class _JobState:
    def __init__(self, job: PreparedJob, output_dir: str) -> None:
        self.job = job
        self.metrics = MetricsWriter(output_dir, job.name)
        self.step = 0
        self.tokens = 0
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self.error is None and self.step < self.job.total_steps


class _Trainer:
    def __init__(self, prepared: PreparedRun) -> None:
        self.prepared = prepared
        self.worker = StageWorker(prepared)
        self.states = {j.name: _JobState(j, prepared.run.output_dir) for j in prepared.jobs}
        self.progress = Progress({j.name: j.total_steps for j in prepared.jobs},
                                 every=prepared.run.log_every_steps, enabled=prepared.run.progress)
        self.start = time.perf_counter()
        self.total_tokens = 0

    def run(self) -> None:
        while any(s.active for s in self.states.values()):
            self._round([s for s in self.states.values() if s.active])
        for state in self.states.values():
            if state.error is None and state.job.eval_samples is not None and state.eval_loss is None:
                self._evaluate(state)

    def _round(self, states: list[_JobState]) -> None:
        batches = {s.job.name: s.job.global_batch(s.step) for s in states}
        weights = {name: 1.0 / max(sum(s.num_loss_tokens for s in samples), 1) for name, samples in batches.items()}
        seeds = {s.job.name: s.job.dropout_seeds(s.step) for s in states}
        plan = plan_round(batches, self.prepared.run.max_tokens_per_microbatch, seeds)
        last_bin = {item[0]: i for i, items in enumerate(plan) for item in items}  # later bins overwrite
        loss_sums = dict.fromkeys(batches, 0.0)
        for i, items in enumerate(plan):
            for job, total in self.worker.forward_backward(build_microbatch(items), weights).items():
                loss_sums[job] += total
            for name in [n for n, last in last_bin.items() if last == i]:
                self._finish_step(self.states[name], batches[name], loss_sums[name] * weights[name])

    def _finish_step(self, state: _JobState, samples: list[Sample], loss: float) -> None:
        name = state.job.name
        if not math.isfinite(loss):
            state.error = f"loss became {loss} at step {state.step + 1}; the job was stopped"
            self.worker.remove_job(name)  # its adapter and optimizer go; the other jobs carry on
            self.progress.note(f"  {name}: FAILED — {state.error}")
            return
        grad_norm, lr = self.worker.step(name)
        tokens = sum(len(s) for s in samples)
        state.step += 1
        state.tokens += tokens
        state.last_loss = loss
        self.total_tokens += tokens
        elapsed = time.perf_counter() - self.start
        state.metrics.write({"step": state.step, "loss": loss, "lr": lr, "tokens": tokens,
                             "grad_norm": grad_norm, "time_s": round(elapsed, 3)})
        self.progress.step(name, state.step, loss, lr, self.total_tokens / max(elapsed, 1e-9))
        every = state.job.spec.eval_every_steps
        if state.job.eval_samples is not None and every and state.step % every == 0:
            self._evaluate(state)

    def _evaluate(self, state: _JobState) -> None:
        result = self.worker.evaluate(state.job.name, state.job.eval_samples)
        state.eval_loss = result.loss
        state.metrics.write({"step": state.step, "eval_loss": result.loss, "eval_tokens": result.tokens})
        self.progress.eval(state.job.name, state.step, result.loss)

    def result(self) -> FitResult:
        out = Path(self.prepared.run.output_dir)
        jobs = {}
        for name, state in self.states.items():
            path = None
            if state.error is None:
                path = self.worker.export(name, str(out / name / "adapter"))
            jobs[name] = JobResult(
                name=name, steps=state.step, tokens=state.tokens, final_loss=state.last_loss, adapter_path=path,
                status="finished" if state.error is None else "failed", error=state.error, eval_loss=state.eval_loss,
            )
        wall = time.perf_counter() - self.start
        return FitResult(jobs=jobs, output_dir=str(out), wall_time_s=wall, tokens_per_s=self.total_tokens / max(wall, 1e-9))


def fit(jobs: list[JobSpec], run: RunConfig) -> FitResult:
    """Train `jobs` together on one copy of the base model (see lorafusion.fit)."""
    prepared = prepare_run(jobs, run)
    _start_output(prepared)
    trainer = _Trainer(prepared)
    trainer.progress.note(f"training {len(prepared.jobs)} job(s) on {prepared.run.base_model}")
    trainer.run()
    result = trainer.result()
    for job in result.jobs.values():
        if job.adapter_path:
            trainer.progress.note(f"  {job.name}: adapter → {job.adapter_path}")
    return result
