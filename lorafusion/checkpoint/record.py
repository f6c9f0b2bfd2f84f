"""The run record (<output_dir>/run.json, and each checkpoint manifest's "config") and what a resume may change:
which settings must match the saved run, and whether an output_dir may be written, resumed or must be refused."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from lorafusion.checkpoint.durable import atomic_write_text
from lorafusion.checkpoint.files import complete_checkpoints
from lorafusion.config import JobSpec, RunConfig

__all__ = ["RUN_MANIFEST", "RESUME_FREE_RUN_FIELDS", "run_manifest", "write_run_manifest", "read_run_manifest",
           "config_differences", "check_output_dir"]

RUN_MANIFEST = "run.json"

# RunConfig fields a resumed run may change: they steer logging, output bookkeeping and parallelism (which
# DESIGN promise 2 makes invisible; checkpoint shards are keyed by global layer, not by stage), not the
# training state. Every other run field and every job field must match the checkpointed run.
RESUME_FREE_RUN_FIELDS = frozenset({
    "output_dir", "progress", "log_every_steps", "overwrite", "resume", "checkpoint_every_steps",
    "keep_checkpoints", "pipeline_stages", "data_parallel", "balance_pipeline", "loggers", "checkpoint_every_s",
})


def run_manifest(run: RunConfig, jobs: list[JobSpec]) -> dict[str, Any]:
    """The content of <output_dir>/run.json (and of each checkpoint's config record), as JSON types."""
    return json.loads(json.dumps({"run": run.to_dict(), "jobs": [j.to_dict() for j in jobs]}))


def write_run_manifest(run: RunConfig, jobs: list[JobSpec]) -> Path:
    """Write <output_dir>/run.json (atomically) for a fit that starts or resumes."""
    return atomic_write_text(Path(run.output_dir) / RUN_MANIFEST, json.dumps(run_manifest(run, jobs), indent=2))


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


def _inside(path: str | Path, directory: Path) -> bool:
    resolved = Path(path).resolve()
    return resolved == directory or directory in resolved.parents


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
