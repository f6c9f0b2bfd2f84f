"""Adapters on disk in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Writes are atomic: files go to a temporary sibling folder that replaces the target in one rename, so a
crash never leaves a half-written adapter where a complete one was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from lorafusion.adapters import AdapterConfig, adapter_config_from_dict, config_from_peft

__all__ = ["write_peft_adapter", "read_peft_adapter", "atomic_directory", "atomic_file", "atomic_write_text", "fsync_path"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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


def atomic_directory(target: Path, fill) -> Path:
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


def write_peft_adapter(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: AdapterConfig, *, base_model: str,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write one job's adapter so `PeftModel.from_pretrained(base, directory)` loads it; extra_files: other text
    files (name -> content) written into the same folder, in the same atomic replacement."""
    config = config.export_config()
    peft_fields = config.peft_config()
    payload = {
        **peft_fields,
        "base_model_name_or_path": str(Path(base_model).resolve()) if Path(base_model).exists() else str(base_model),
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "lorafusion_adapter": config.to_dict(),
    }

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_directory(Path(directory), fill)


def _config_from_peft(data: dict, path: Path) -> AdapterConfig:
    """Our own config when lorafusion wrote the adapter (it names the variant exactly), else PEFT's fields."""
    if isinstance(data, dict) and "lorafusion_adapter" in data:
        return adapter_config_from_dict(data["lorafusion_adapter"], where=str(path))
    return config_from_peft(data, str(path))


def read_peft_config(directory: str | Path) -> AdapterConfig:
    """The config of the adapter in `directory` (ValueError naming the file when it is missing or unsupported)."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"adapter '{directory}' has no {CONFIG_NAME}; point at a folder written by lorafusion or PEFT")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    return _config_from_peft(data, config_path)


def read_peft_adapter(directory: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors (keys without PEFT's adapter-name infix)."""
    directory = Path(directory)
    config = read_peft_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ValueError(f"adapter '{directory}' has no {WEIGHTS_NAME}; point at a folder written by lorafusion or PEFT")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
    return config, {key.replace(".default.", "."): value for key, value in tensors.items()}
