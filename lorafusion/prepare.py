"""Everything checked and tokenised before training starts: one bad input fails here, nothing written yet."""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from lorafusion.adapters.dropout import mix_seed
from lorafusion.config import JobSpec, RunConfig, check_jobs
from lorafusion.data import Sample, SampleStream, TextTokenizer, load_dataset, load_tokenizer
from lorafusion.models.hf import Architecture, HFWeights, read_architecture

__all__ = [
    "PreparedJob", "PreparedRun", "prepare_run", "check_output_dir", "RUN_MANIFEST", "CHECKPOINTS_DIR",
    "CHECKPOINT_MANIFEST", "RESUME_FREE_RUN_FIELDS", "run_manifest", "read_run_manifest", "config_differences",
    "complete_checkpoints",
]

RUN_MANIFEST = "run.json"
CHECKPOINTS_DIR = "checkpoints"
"""<output_dir>/checkpoints/step-<global counter>/, one folder per checkpoint."""
CHECKPOINT_MANIFEST = "manifest.json"
"""Written last inside a checkpoint folder: a folder without it is not a checkpoint."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REPLACED_STEP_DIR = re.compile(r"^\.step-(\d+)\.old$")
"""A complete checkpoint moved aside while the same counter is saved again (runtime/checkpointing.py)."""

# RunConfig fields a resumed run may change: they steer logging, output bookkeeping and parallelism (which
# DESIGN promise 2 makes invisible; checkpoint shards are keyed by global layer, not by stage), not the
# training state. Every other run field and every job field must match the checkpointed run.
RESUME_FREE_RUN_FIELDS = frozenset({
    "output_dir", "progress", "log_every_steps", "overwrite", "resume", "checkpoint_every_steps",
    "keep_checkpoints", "pipeline_stages", "data_parallel", "balance_pipeline", "loggers", "checkpoint_every_s",
})


@dataclass
class PreparedJob:
    spec: JobSpec
    samples: list[Sample]
    stream: SampleStream
    total_steps: int
    eval_samples: list[Sample] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def global_batch(self, step: int) -> list[Sample]:
        return [self.samples[i] for i in self.stream.batch(step)]

    def dropout_seeds(self, step: int) -> list[int]:
        """Dropout seed of each sample of global batch `step`, from the job's seed and the sample's place."""
        return [mix_seed(self.spec.seed, step, i) for i in range(self.spec.global_batch_size)]


@dataclass
class PreparedRun:
    run: RunConfig
    arch: Architecture
    tokenizer: TextTokenizer
    jobs: list[PreparedJob]


def _max_seq_len(job: JobSpec, run: RunConfig) -> int:
    limit = job.max_seq_len or run.max_tokens_per_microbatch
    if limit > run.max_tokens_per_microbatch:
        raise ValueError(
            f"job '{job.name}': max_seq_len={limit} exceeds run.max_tokens_per_microbatch="
            f"{run.max_tokens_per_microbatch}; lower max_seq_len or raise max_tokens_per_microbatch"
        )
    return limit


def _prepare_job(job: JobSpec, run: RunConfig, tokenizer: TextTokenizer) -> PreparedJob:
    limit = _max_seq_len(job, run)
    # the setting that sets the limit: the job's own max_seq_len, or else the microbatch capacity
    limit_name = "max_seq_len" if job.max_seq_len is not None else "run.max_tokens_per_microbatch"
    samples = load_dataset(job.dataset, tokenizer, max_seq_len=limit, overflow=job.overflow, name=job.name,
                           limit_name=limit_name, fields=job.fields, default_split="train")
    stream = SampleStream(num_samples=len(samples), global_batch_size=job.global_batch_size, seed=job.seed)
    if job.max_steps is not None:
        total = job.max_steps
    else:
        total = stream.steps_for_epochs(job.num_epochs if job.num_epochs is not None else 1)
    eval_samples = None
    if job.eval_dataset is not None:
        eval_samples = load_dataset(job.eval_dataset, tokenizer, max_seq_len=limit, overflow=job.overflow,
                                    name=job.name, limit_name=limit_name, fields=job.fields)
    return PreparedJob(spec=job, samples=samples, stream=stream, total_steps=total, eval_samples=eval_samples)


def _inside(path: str | Path, directory: Path) -> bool:
    resolved = Path(path).resolve()
    return resolved == directory or directory in resolved.parents


def run_manifest(run: RunConfig, jobs: list[JobSpec]) -> dict[str, Any]:
    """The content of <output_dir>/run.json (and of each checkpoint's config record), as JSON types."""
    return json.loads(json.dumps({"run": run.to_dict(), "jobs": [j.to_dict() for j in jobs]}))


def read_run_manifest(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / RUN_MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err}); set run.overwrite=true to start over in this output_dir, "
                         "or choose a new output_dir") from err
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict) or not isinstance(data.get("jobs"), list):
        raise ValueError(f"{path}: is not a lorafusion run manifest ({{run: {{...}}, jobs: [...]}}); set "
                         "run.overwrite=true to start over in this output_dir, or choose a new output_dir")
    return data


def _defaults(cls: type) -> dict[str, Any]:
    """The JSON form of each field's default: a record written before a field existed held that value."""
    found = {}
    for f in fields(cls):
        if f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            continue
        found[f.name] = json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))
    return found


def _field_differences(prefix: str, saved: dict, now: dict, defaults: dict, free: frozenset = frozenset()) -> list[str]:
    def before(key: str) -> Any:
        return saved.get(key, defaults.get(key, "(absent)"))

    return [
        f"{prefix}{key}: {before(key)!r} before, {now.get(key, '(absent)')!r} now"
        for key in sorted(set(saved) | set(now))
        if key not in free and before(key) != now.get(key, "(absent)")
    ]


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two `run_manifest` records in fields a resume must keep, one line per field."""
    diffs = _field_differences("run.", saved.get("run", {}), now.get("run", {}), _defaults(RunConfig),
                               RESUME_FREE_RUN_FIELDS)
    saved_jobs = {j.get("name"): j for j in saved.get("jobs", []) if isinstance(j, dict)}
    now_jobs = {j["name"]: j for j in now.get("jobs", [])}
    for name in sorted(set(saved_jobs) - set(now_jobs), key=str):
        diffs.append(f"job '{name}': in the saved run, not in this one")
    for name in sorted(set(now_jobs) - set(saved_jobs)):
        diffs.append(f"job '{name}': in this run, not in the saved one")
    for name in [n for n in now_jobs if n in saved_jobs]:
        diffs += _field_differences(f"job '{name}' ", saved_jobs[name], now_jobs[name], _defaults(JobSpec))
    if not diffs and list(saved_jobs) != list(now_jobs):  # job order decides packing order
        diffs.append(f"job order: {list(saved_jobs)} before, {list(now_jobs)} now")
    return diffs


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(global counter, folder) of every checkpoint whose manifest was written, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = {}
    for folder in root.iterdir():
        match = _STEP_DIR.match(folder.name)
        if match and folder.is_dir() and (folder / CHECKPOINT_MANIFEST).is_file():
            found[int(match.group(1))] = folder
    for folder in root.iterdir():  # a counter saved again, interrupted between its two renames: the old one stands
        match = _REPLACED_STEP_DIR.match(folder.name)
        if match and folder.is_dir() and (folder / CHECKPOINT_MANIFEST).is_file():
            found.setdefault(int(match.group(1)), folder)
    return sorted(found.items())


def _check_resumable(out: Path, run: RunConfig, jobs: list[JobSpec]) -> bool:
    """True when `out` holds this very run (same settings) with a complete checkpoint to resume from."""
    if not run.resume or not (out / RUN_MANIFEST).is_file() or not complete_checkpoints(out):
        return False
    diffs = config_differences(read_run_manifest(out), run_manifest(run, jobs))
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ValueError(
            f"run.output_dir '{out}' already holds another run (run.json) whose settings differ, so it cannot be "
            f"resumed: {shown}. Use the saved settings to resume, set run.overwrite=true to replace it, or choose "
            "a new output_dir"
        )
    return True


def check_output_dir(run: RunConfig, jobs: list[JobSpec]) -> None:
    """Refuse an output_dir that holds anything (another run, or unrelated files) unless run.overwrite, or
    run.resume and it holds this run with a complete checkpoint; always refuse one that holds this run's own
    inputs (overwrite would delete them)."""
    out = Path(run.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run.output_dir '{out}' is a file; choose a directory path")
    inputs = [(f"job '{j.name}' dataset", p) for j in jobs for p in (j.dataset, j.eval_dataset) if p is not None]
    if Path(run.base_model).exists():  # a Hub id's snapshot is in the HF cache, not among the user's paths
        inputs.insert(0, ("base_model", run.base_model))
    for what, path in inputs:
        if _inside(path, out.resolve()):
            raise ValueError(
                f"run.output_dir '{out}' contains this run's {what} '{path}'; choose an output_dir outside the inputs"
            )
    if run.overwrite or not out.exists() or not any(out.iterdir()) or _check_resumable(out, run, jobs):
        return
    what = "another run (run.json)" if (out / RUN_MANIFEST).exists() else "files"
    hint = " with no complete checkpoint to resume from" if run.resume and what != "files" else ""
    raise ValueError(
        f"run.output_dir '{out}' already holds {what}{hint}; choose a new output_dir or set run.overwrite=true "
        "to replace it"
    )


def _check_adapter(job: JobSpec, arch: Architecture) -> None:
    """The job's adapter fits the model, and init_adapter's tensors are exactly an adapter of its config."""
    from lorafusion.adapters.attach import check_peft_adapter
    from lorafusion.checkpoint import read_peft_adapter

    try:
        job.adapter.check_model(job.adapter.target_shapes(arch))
    except ValueError as err:
        raise ValueError(f"job '{job.name}': {err}") from None
    if job.init_adapter is not None:
        _, tensors = read_peft_adapter(job.init_adapter)
        check_peft_adapter(job.adapter, tensors, arch, where=f"job '{job.name}': init_adapter '{job.init_adapter}'")


def prepare_run(jobs: list[JobSpec], run: RunConfig) -> PreparedRun:
    """Validate the whole run and tokenise every dataset; raises ValueError before anything is written."""
    check_jobs(jobs)
    arch = read_architecture(run.base_model)
    HFWeights(run.base_model).check(arch)  # missing or misshapen tensors fail now, not after writing
    tokenizer = load_tokenizer(run.base_model)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ValueError(
            f"tokenizer of '{run.base_model}' has {tokenizer.vocab_size} tokens but config.json vocab_size is "
            f"{arch.vocab_size}; the tokenizer does not belong to this checkpoint"
        )
    for job in jobs:
        _check_adapter(job, arch)
    prepared = [_prepare_job(job, run, tokenizer) for job in jobs]
    check_output_dir(run, jobs)
    return PreparedRun(run=run, arch=arch, tokenizer=tokenizer, jobs=prepared)
