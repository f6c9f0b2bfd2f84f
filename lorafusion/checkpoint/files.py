"""A checkpoint's files: naming and listing the folders, writing them under the commit protocol, reading and
verifying them, pruning. The format itself is described in lorafusion/checkpoint/__init__.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorafusion.checkpoint.durable import atomic_file, atomic_write_text, fsync_path

__all__ = [
    "CHECKPOINTS_DIR", "CHECKPOINT_MANIFEST", "checkpoint_dir", "complete_checkpoints", "latest_checkpoint",
    "begin_checkpoint", "write_stage_shard", "write_driver_state", "finalize_checkpoint", "read_manifest",
    "read_stage_state", "read_driver_state", "prune_checkpoints",
]

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MANIFEST = "manifest.json"
"""Written last inside a checkpoint folder: a folder without it is not a checkpoint."""
MANIFEST_FORMAT = "lorafusion-checkpoint/2"
V1_MANIFEST_FORMAT = "lorafusion-checkpoint/1"
"""Written by lorafusion before checkpoints were named by step: folders named by the window counter, which the
manifest's "step" held."""
SHARD_FORMAT = "lorafusion-stage-shard/1"
DRIVER_FILE = "driver.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REPLACED_STEP_DIR = re.compile(r"^\.step-(\d+)\.old$")
"""A complete checkpoint moved aside while the same step is saved again (finalize_checkpoint)."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Where the complete checkpoint taken after `step` optimizer steps (summed over the jobs) lives."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def _written_by_v1(folder: Path) -> bool:
    """Whether an older lorafusion wrote it (named by its window counter: it sorts before any newer one)."""
    try:
        return json.loads((folder / CHECKPOINT_MANIFEST).read_text()).get("format") == V1_MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):  # damaged: read_manifest says so when it is chosen
        return False


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(number in the name, folder) of every checkpoint whose manifest was written, oldest first: by step, with
    the ones an older lorafusion named by its window counter before all others (a run resumed from one of those
    only writes newer ones)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    # A step saved again and interrupted between its two renames: the old one, moved aside, stands.
    for pattern in (_STEP_DIR, _REPLACED_STEP_DIR):
        for folder in root.iterdir():
            match = pattern.match(folder.name)
            if match and folder.is_dir() and (folder / CHECKPOINT_MANIFEST).is_file():
                found.setdefault(int(match.group(1)), folder)
    return sorted(found.items(), key=lambda item: (not _written_by_v1(item[1]), item[0]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in output_dir, or None; partial ones (no manifest) are ignored."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def _staging(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def _shard_name(stage: int) -> str:
    return f"stage-{stage}.safetensors"


def _job_dir(ckpt_dir: str | Path, job: str) -> Path:
    return Path(ckpt_dir) / "jobs" / job


def _fix(ckpt_dir: Path) -> str:
    return (f"the checkpoint is damaged: delete '{ckpt_dir}' to resume from the previous checkpoint, or set "
            "run.overwrite=true to start over")


def begin_checkpoint(output_dir: str | Path, step: int) -> Path:
    """An empty staging folder for the checkpoint of `step` (left-overs of an earlier, crashed attempt are removed)."""
    staging = _staging(checkpoint_dir(output_dir, step))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_stage_shard(ckpt_dir: str | Path, stage: int, states: dict[str, dict]) -> list[Path]:
    """Write each job's `StageWorker.job_state(job)` of pipeline stage `stage` to jobs/<job>/stage-<stage>.safetensors.

    Only data-parallel rank 0 of a stage calls this: the replicas of a stage hold identical state.
    """
    written = []
    for job, state in states.items():
        tensors = {f"param/{name}": t.contiguous() for name, t in state["params"].items()}
        for name, per_key in state["optimizer"].items():
            tensors.update({f"optim/{name}/{key}": t.contiguous() for key, t in per_key.items()})
        metadata = {"format": SHARD_FORMAT, "job": job, "stage": str(stage), "step_count": str(state["step_count"]),
                    "params": json.dumps(list(state["params"]))}
        folder = _job_dir(ckpt_dir, job)
        folder.mkdir(parents=True, exist_ok=True)
        written.append(atomic_file(folder / _shard_name(stage),
                                     lambda tmp: save_file(tensors, str(tmp), metadata=metadata)))
    return written


def write_driver_state(ckpt_dir: str | Path, job: str, record: dict[str, Any]) -> Path:
    """Write the driver's record of `job` (JSON types only) to jobs/<job>/driver.json."""
    folder = _job_dir(ckpt_dir, job)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2)
    return atomic_write_text(folder / DRIVER_FILE, text)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_files(jobs: dict[str, dict]) -> list[str]:
    files = []
    for job, entry in jobs.items():
        files.append(f"jobs/{job}/{DRIVER_FILE}")
        files += [f"jobs/{job}/{_shard_name(s)}" for s in range(entry["stages"])]
    return files


def finalize_checkpoint(ckpt_dir: str | Path, *, step: int, windows: int, config: dict[str, Any],
                        jobs: dict[str, dict], stream: dict[str, Any] | None = None,
                        rounds: dict[str, int] | None = None) -> Path:
    """Write the manifest that marks the staged checkpoint complete, then rename it into place; returns its path.

    `step`: the optimizer steps of all jobs together (the folder's name); `windows`: the driver's windows completed;
    `config` is the run's `run_manifest` record; `jobs` maps each job to {"status", "stages": number of shards}
    (0 for a failed job); `stream`, when given, the driver's planning state that a resume must continue with
    (kept as the manifest's "stream"); `rounds`, when given, each federated group's last aggregated round (the
    manifest's "federation_rounds"). RuntimeError if a stage or the driver did not write its file.
    """
    staging = Path(ckpt_dir)
    final = checkpoint_dir(staging.parent.parent, step)
    if staging != _staging(final):
        raise RuntimeError(f"finalize_checkpoint: '{staging}' is not the staging folder of step {step} "
                           f"('{_staging(final)}'); start it with begin_checkpoint")
    files = {}
    for rel in _expected_files(jobs):
        path = staging / rel
        if not path.is_file():
            raise RuntimeError(f"checkpoint step {step}: '{path}' was not written; a stage or the driver failed "
                               "before finalize_checkpoint")
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "windows": windows, "config": config, "jobs": jobs,
                "files": files}
    if stream is not None:
        manifest["stream"] = stream
    if rounds is not None:
        manifest["federation_rounds"] = rounds
    atomic_write_text(staging / CHECKPOINT_MANIFEST, json.dumps(manifest, indent=2))
    for folder in [*(p for p in staging.rglob("*") if p.is_dir()), staging]:  # the files' directory entries too
        fsync_path(folder)
    if final.exists():  # the same step saved again (e.g. at the end right after a periodic save)
        # Moved aside, not deleted, until the new one is in place: a crash between the two renames leaves the old
        # one as `.step-<N>.old`, which complete_checkpoints still finds.
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fsync_path(final.parent)
        os.replace(staging, final)
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_path(final.parent)
    return final


def read_manifest(ckpt_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's manifest; with `verify`, every file it lists is checked against its size and sha256.

    One written by an older lorafusion (format 1) is read as format 2 without "step": its "step" was the
    window counter, returned as "windows"."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / CHECKPOINT_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file '{path}' cannot be read ({err}); {_fix(ckpt_dir)}") from err
    if not isinstance(manifest, dict) or manifest.get("format") not in (MANIFEST_FORMAT, V1_MANIFEST_FORMAT):
        raise ValueError(f"checkpoint file '{path}' is not a {MANIFEST_FORMAT} manifest; {_fix(ckpt_dir)}")
    if manifest["format"] == V1_MANIFEST_FORMAT and "step" in manifest:
        manifest = {key: value for key, value in manifest.items() if key != "step"} | {"windows": manifest["step"]}
    for key in ("windows", "config", "jobs", "files"):
        if key not in manifest:
            raise ValueError(f"checkpoint file '{path}' has no '{key}'; {_fix(ckpt_dir)}")
    if verify:
        for rel, expected in manifest["files"].items():
            _verify_file(ckpt_dir, rel, expected)
    return manifest


def _verify_file(ckpt_dir: Path, rel: str, expected: dict) -> None:
    path = ckpt_dir / rel
    if not path.is_file():
        raise ValueError(f"checkpoint file '{path}' is missing; {_fix(ckpt_dir)}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise ValueError(f"checkpoint file '{path}' has {size} bytes, the manifest says {expected['bytes']}; "
                         f"{_fix(ckpt_dir)}")
    if _sha256(path) != expected["sha256"]:
        raise ValueError(f"checkpoint file '{path}' does not match its sha256 in the manifest; {_fix(ckpt_dir)}")


def _read_shard(path: Path, job: str, ckpt_dir: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        names = json.loads(meta["params"])
        step_count = int(meta["step_count"])
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        raise ValueError(f"checkpoint file '{path}' cannot be read ({err!r}); {_fix(ckpt_dir)}") from err
    if meta.get("format") != SHARD_FORMAT or meta.get("job") != job:
        raise ValueError(f"checkpoint file '{path}' is not a {SHARD_FORMAT} shard of job '{job}'; {_fix(ckpt_dir)}")
    optimizer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, tensor in tensors.items():
        if key.startswith("optim/"):
            name, state_key = key[len("optim/"):].rsplit("/", 1)
            optimizer.setdefault(name, {})[state_key] = tensor
    params = {name: tensors[f"param/{name}"] for name in names if f"param/{name}" in tensors}
    if len(params) != len(names) or set(optimizer) != set(names):
        raise ValueError(f"checkpoint file '{path}' lists parameters it does not hold; {_fix(ckpt_dir)}")
    return {"step_count": step_count, "params": params, "optimizer": optimizer}


def read_stage_state(ckpt_dir: str | Path, job: str, manifest: dict[str, Any]) -> dict:
    """`job`'s state merged over all its stage shards, in `StageWorker.load_job_state`'s format.

    Shards are keyed by global layer, so a run resumed with a different number of pipeline stages still
    finds every parameter: each stage takes its own from the merged state.
    """
    ckpt_dir = Path(ckpt_dir)
    merged: dict[str, Any] = {"step_count": None, "params": {}, "optimizer": {}}
    for stage in range(manifest["jobs"][job]["stages"]):
        path = _job_dir(ckpt_dir, job) / _shard_name(stage)
        shard = _read_shard(path, job, ckpt_dir)
        if merged["step_count"] not in (None, shard["step_count"]):
            raise ValueError(f"checkpoint file '{path}': job '{job}' is at optimizer step {shard['step_count']} "
                             f"on stage {stage} but {merged['step_count']} on stage 0; {_fix(ckpt_dir)}")
        overlap = {name for name in set(merged["params"]) & set(shard["params"])  # a job-wide tensor each stage holds
                   if not (name.startswith("shared.") and torch.equal(merged["params"][name], shard["params"][name]))}
        if overlap:
            raise ValueError(f"checkpoint file '{path}' repeats parameter '{sorted(overlap)[0]}' of an earlier "
                             f"stage; {_fix(ckpt_dir)}")
        merged["step_count"] = shard["step_count"]
        merged["params"].update(shard["params"])
        merged["optimizer"].update(shard["optimizer"])
    return merged


def read_driver_state(ckpt_dir: str | Path, job: str) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    path = _job_dir(ckpt_dir, job) / DRIVER_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file '{path}' cannot be read ({err}); {_fix(ckpt_dir)}") from err
    if not isinstance(record, dict) or record.get("job") != job:
        raise ValueError(f"checkpoint file '{path}' is not the driver record of job '{job}'; {_fix(ckpt_dir)}")
    return record


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and any partial left-overs; returns what went.
    Called only once a new checkpoint is complete and flushed, so the one it succeeds is never deleted first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    complete = [path for _, path in complete_checkpoints(output_dir)]
    doomed = complete[:-keep] if keep > 0 else complete
    if root.is_dir():
        doomed += [p for p in root.iterdir()
                   if p.is_dir() and p not in complete and p.name.startswith((".step-", "step-"))]
    for path in doomed:
        # Manifest first: if the deletion is interrupted, a half-deleted folder is never taken as complete.
        (path / CHECKPOINT_MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path)
    return doomed
