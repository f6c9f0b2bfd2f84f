"""Writes that survive a crash: a file or folder is filled under a temporary name, flushed to disk, and renamed
into place, so a reader sees the old content or the new, never half of one (the commit protocol of
lorafusion/checkpoint/__init__.py; exported adapters, run.json and run_metrics.json use it too)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["fsync_path", "atomic_file", "atomic_write_text", "atomic_directory"]


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)`, flush it to disk, then rename over `path`: readers see the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(text))


def atomic_directory(target: Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_dir)`, flush its files and entries to disk, then move tmp_dir to `target`, replacing any
    previous content; the previous content is deleted only once the new one is in place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    for path in tmp.rglob("*"):
        fsync_path(path)
    fsync_path(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target
