"""Save and restore a whole fit: the driver saves between windows and resumes at start, in halves.

Each side has its own half, so the Ray driver can run the stage halves as actor methods:
save = `begin_checkpoint(output_dir, checkpoint_step(progress))` (driver) → `write_stage_shard(staging, stage,
stage_states(worker, progress))` (data-parallel rank 0 of every stage) → `commit_checkpoint` (driver); resume =
`open_checkpoint` (driver) → `restore_worker(worker, resumed)` (every actor); runtime/fit.py chains them.

Data position and RNG: a job's global batch `step` and its dropout seeds are pure functions of (seed, step,
sample index) (lorafusion/prepare.py), so the job's step is its whole data and RNG position. The driver
record still stores the next batch's sample indices and dropout seeds and the next LR, and a resume checks
that this run reproduces them: a dataset edited in place since the checkpoint fails here, not silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np

from lorafusion.checkpoint.durable import atomic_write_text
from lorafusion.checkpoint.files import (
    finalize_checkpoint, latest_checkpoint, prune_checkpoints, read_driver_state, read_manifest, read_stage_state,
    write_driver_state,
)
from lorafusion.checkpoint.record import config_differences, run_manifest
from lorafusion.schedule import lr_at

if TYPE_CHECKING:  # prepare imports this package (check_output_dir)
    from lorafusion.prepare import PreparedJob, PreparedRun

__all__ = [
    "JobProgress", "StreamState", "Resumed", "JobStates", "checkpoint_step", "stage_states",
    "commit_checkpoint", "open_checkpoint", "restore_worker", "trim_metrics",
]


class JobStates(Protocol):
    """What a stage worker (runtime/worker.py's StageWorker) offers a checkpoint: each job's state out and in."""

    def job_state(self, job: str) -> dict: ...

    def load_job_state(self, job: str, state: dict, where: str = ...) -> None: ...

    def remove_job(self, job: str) -> None: ...


@dataclass(kw_only=True)
class JobProgress:
    """What the driver knows about one job between windows."""

    step: int = 0
    """Optimizer steps taken (= the index of the job's next global batch and its LR schedule position)."""
    tokens: int = 0
    last_loss: float | None = None
    eval_loss: float | None = None
    error: str | None = None
    """Why the job failed; None while it trains or once it finished."""


def checkpoint_step(progress: Mapping[str, JobProgress]) -> int:
    """The step a checkpoint is named by: the optimizer steps every job has taken, summed (with one job, its step;
    a fit resumed from it says "N job steps already done")."""
    return sum(p.step for p in progress.values())


def _status(job: PreparedJob, progress: JobProgress) -> str:
    if progress.error is not None:
        return "failed"
    return "finished" if progress.step >= job.total_steps else "active"


def _data_sha256(job: PreparedJob) -> str:
    """Digest of the job's tokenised samples (ids and labels, in file order)."""
    digest = hashlib.sha256()
    for sample in job.samples:
        digest.update(np.asarray(sample.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(sample.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _position(job: PreparedJob, step: int) -> dict[str, Any]:
    """The checks stored with a job's progress: what this run must reproduce at the job's next step."""
    return {
        "next_lr": lr_at(job.spec, step, job.total_steps),
        "num_samples": len(job.samples),
        "data_sha256": _data_sha256(job),
        "next_sample_indices": [int(i) for i in job.stream.batch(step)],
        "next_dropout_seeds": job.dropout_seeds(step),
    }


def _driver_record(job: PreparedJob, progress: JobProgress) -> dict[str, Any]:
    return {
        "job": job.name, "status": _status(job, progress), "step": progress.step, "total_steps": job.total_steps,
        "tokens": progress.tokens, "last_loss": progress.last_loss, "eval_loss": progress.eval_loss,
        "error": progress.error, "position": _position(job, progress.step),
    }


def stage_states(worker: JobStates, progress: Mapping[str, JobProgress]) -> dict[str, dict]:
    """What one stage writes with `write_stage_shard`: the state of every job that has not failed."""
    return {name: worker.job_state(name) for name, p in progress.items() if p.error is None}


def commit_checkpoint(
    prepared: PreparedRun, staging: Path, windows: int, progress: Mapping[str, JobProgress], num_stages: int,
    stream: StreamState | None = None, rounds: Mapping[str, int] | None = None,
) -> Path:
    """The driver's half of a save, after every stage wrote its shard into `staging` (begun for
    `checkpoint_step(progress)`): the job records, the manifest (the checkpoint is then complete, with the driver's
    `windows` completed, `stream` when given, and `rounds`, each federated group's last aggregated round, when the
    run has groups) and pruning to run.keep_checkpoints. Returns the folder."""
    run = prepared.run
    for job in prepared.jobs:
        write_driver_state(staging, job.name, _driver_record(job, progress[job.name]))
    jobs = {job.name: {"status": _status(job, progress[job.name]),
                       "stages": num_stages if progress[job.name].error is None else 0} for job in prepared.jobs}
    path = finalize_checkpoint(staging, step=checkpoint_step(progress), windows=windows, jobs=jobs,
                               config=run_manifest(run, [job.spec for job in prepared.jobs]),
                               stream=None if stream is None else stream.record(),
                               rounds=dict(rounds) if rounds else None)
    prune_checkpoints(run.output_dir, run.keep_checkpoints)
    return path


def _check_position(job: PreparedJob, record: dict[str, Any], path: Path) -> None:
    saved, now = record["position"], _position(job, record["step"])
    if saved["num_samples"] != now["num_samples"]:
        raise ValueError(
            f"job '{job.name}': checkpoint '{path}' was taken with {saved['num_samples']} samples in dataset "
            f"'{job.spec.dataset}', it now has {now['num_samples']}; restore the dataset it was trained on, or set "
            "run.overwrite=true to start over"
        )
    for key, what in (("data_sha256", "tokenised samples"),
                      ("next_sample_indices", "samples of the next global batch"),
                      ("next_dropout_seeds", "dropout seeds"), ("next_lr", "learning rate")):
        if saved[key] != now[key]:
            raise ValueError(
                f"job '{job.name}': at step {record['step']} this run gives other {what} than checkpoint '{path}' "
                f"recorded ({str(now[key])[:60]} vs {str(saved[key])[:60]}); the dataset or the code changed since "
                "— restore them, or set run.overwrite=true to start over"
            )


_RECORD_KEYS = ("status", "step", "tokens", "last_loss", "eval_loss", "error", "position")


def _read_progress(job: PreparedJob, path: Path) -> JobProgress:
    record = read_driver_state(path, job.name)
    missing = [key for key in _RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"checkpoint file '{path / 'jobs' / job.name / 'driver.json'}' lacks {missing}; delete "
                         f"'{path}' to resume from the previous checkpoint, or set run.overwrite=true to start over")
    _check_position(job, record, path)
    return JobProgress(step=record["step"], tokens=record["tokens"], last_loss=record["last_loss"],
                       eval_loss=record["eval_loss"], error=record["error"])


@dataclass(frozen=True)
class StreamState:
    """What the driver's planning carries across a checkpoint: the capacity the stream is planned at and the
    set of jobs run.balance_pipeline chose it for (it is chosen again only when that set changes)."""

    capacity_tokens: int
    jobs: tuple[str, ...]
    layout: tuple[int, int]
    """(pipeline stages, data-parallel replicas) it was chosen for: a resume with another layout chooses again."""

    def record(self) -> dict[str, Any]:
        """The checkpoint manifest's "stream" (read back, and checked, by open_checkpoint)."""
        return {"capacity_tokens": self.capacity_tokens, "jobs": list(self.jobs), "layout": list(self.layout)}


@dataclass(kw_only=True)
class Resumed:
    """A checkpoint checked by the driver, ready for the stages to load."""

    path: Path
    windows: int
    """Driver windows completed when it was taken (run_metrics.json counts on from there)."""
    progress: dict[str, JobProgress]
    manifest: dict[str, Any]
    stream: StreamState | None = None
    """The capacity run.balance_pipeline had chosen, and for which jobs (None: none chosen yet)."""
    rounds: dict[str, int] | None = None
    """Each federated group's last aggregated round, as a step count (None: the run has no groups, or an older
    lorafusion wrote the checkpoint without them)."""


def open_checkpoint(prepared: PreparedRun) -> Resumed | None:
    """The driver's half of a resume: find the newest complete checkpoint, verify its files, settings and every
    job's data/LR position, and read the job progress. None when run.resume is off, run.overwrite is on, or
    there is no complete checkpoint. ValueError naming the file and the fix when it is damaged or from other
    settings."""
    run = prepared.run
    path = latest_checkpoint(run.output_dir) if run.resume and not run.overwrite else None
    if path is None:
        return None
    manifest = read_manifest(path)
    diffs = config_differences(manifest["config"], run_manifest(run, [job.spec for job in prepared.jobs]))
    if diffs:
        raise ValueError(f"checkpoint '{path}' was taken with other settings: {'; '.join(diffs)}. Use those "
                         "settings to resume, or set run.overwrite=true to start over")
    progress = {job.name: _read_progress(job, path) for job in prepared.jobs}
    return Resumed(path=path, windows=manifest["windows"], progress=progress, manifest=manifest,
                   stream=_read_stream(manifest.get("stream"), prepared, path),
                   rounds=_read_rounds(manifest.get("federation_rounds"), prepared, path))


def _read_stream(record: Any, prepared: PreparedRun, path: Path) -> StreamState | None:
    if record is None:
        return None
    names = {job.name for job in prepared.jobs}
    record = record if isinstance(record, dict) else {}
    capacity, jobs, layout = record.get("capacity_tokens"), record.get("jobs"), record.get("layout")
    if not (isinstance(capacity, int) and 0 < capacity <= prepared.run.max_tokens_per_microbatch
            and isinstance(jobs, list) and jobs and set(jobs) <= names
            and isinstance(layout, list) and len(layout) == 2 and all(isinstance(n, int) and n > 0 for n in layout)):
        raise ValueError(f"checkpoint '{path}' has a damaged \"stream\" record {record!r} in its manifest (expected "
                         f"capacity_tokens in 1..{prepared.run.max_tokens_per_microbatch}, a list of this run's job "
                         f"names and a [stages, replicas] layout); delete '{path}' to resume from the previous "
                         "checkpoint, or set run.overwrite=true to start over")
    return StreamState(capacity_tokens=capacity, jobs=tuple(jobs), layout=(layout[0], layout[1]))


def _read_rounds(record: Any, prepared: PreparedRun, path: Path) -> dict[str, int] | None:
    if record is None:
        return None
    totals = {job.spec.federation.group: job.total_steps for job in prepared.jobs if job.spec.federation is not None}
    if not (isinstance(record, dict) and set(record) == set(totals)
            and all(isinstance(record[g], int) and 0 <= record[g] <= totals[g] for g in totals)):
        raise ValueError(f"checkpoint '{path}' has a damaged \"federation_rounds\" record {record!r} in its manifest "
                         f"(expected each of this run's groups {sorted(totals)} with the step count of its last "
                         f"aggregated round); delete '{path}' to resume from the previous checkpoint, or set "
                         "run.overwrite=true to start over")
    return dict(record)


def restore_worker(worker: JobStates, resumed: Resumed) -> None:
    """A stage's half of a resume: load every live job's state from the shards, drop the failed jobs."""
    for name, progress in resumed.progress.items():
        if progress.error is not None:
            worker.remove_job(name)
            continue
        state = read_stage_state(resumed.path, name, resumed.manifest)
        if state["step_count"] != progress.step:
            raise ValueError(
                f"checkpoint '{resumed.path}': job '{name}' is at step {progress.step} in jobs/{name}/driver.json but "
                f"its optimizer shards are at step {state['step_count']}; delete '{resumed.path}' to resume from "
                "the previous checkpoint, or set run.overwrite=true to start over"
            )
        worker.load_job_state(name, state, where=f"checkpoint '{resumed.path}'")


def _record_step(line: str) -> float:
    """A metrics line's step; a line cut short by a crash counts as after every step (it is dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def trim_metrics(output_dir: str | Path, job: str, step: int) -> None:
    """Drop the records of <output_dir>/<job>/metrics.jsonl after optimizer step `step` (the resumed run
    writes them again); the file is replaced atomically."""
    path = Path(output_dir) / job / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _record_step(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
