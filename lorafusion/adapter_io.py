"""Adapters on disk in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

This is the export format (what a user loads with PEFT), not a run checkpoint (lorafusion/checkpoint/, which
holds optimizer state and progress for a resume). Writes are atomic (lorafusion/checkpoint/durable.py): files go
to a temporary sibling folder, flushed to disk, that replaces the target in one rename, so a crash never leaves a
half-written adapter where a complete one was.

A variant whose update no PEFT adapter holds exactly (`config.svd_export_rank` set: TeRA) exports two things in
one folder: the PEFT files hold the truncated-SVD plain LoRA of that rank (PEFT loads it as any LoRA), and
`lorafusion_native.json` + `lorafusion_native.safetensors` hold the variant's own config and tensors, which
lorafusion reads back instead of the LoRA (exactly what was trained). `export_report.json` gives each module's
relative error ‖ΔW − B A‖_F / ‖ΔW‖_F of the LoRA.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorafusion.adapters import AdapterConfig, adapter_config_from_dict, config_from_peft
from lorafusion.adapters.base import EXPORT_ERROR_KEY
from lorafusion.checkpoint.durable import atomic_directory

__all__ = ["write_peft_adapter", "read_peft_adapter", "read_peft_config"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
NATIVE_CONFIG_NAME = "lorafusion_native.json"
NATIVE_WEIGHTS_NAME = "lorafusion_native.safetensors"
NATIVE_FORMAT = "lorafusion-native/1"
REPORT_NAME = "export_report.json"
_LORA_KEYS = (".lora_A.weight", ".lora_B.weight")

logger = logging.getLogger(__name__)


def write_peft_adapter(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: AdapterConfig, *, base_model: str,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write one job's adapter so `PeftModel.from_pretrained(base, directory)` loads it (`tensors` as
    ModelAdapters.peft_state_dict gives them: for a truncated-SVD export, the variant's own tensors, the LoRA and
    each module's error, split here into the native files, the PEFT files and the report); extra_files: other text
    files (name -> content) written into the same folder, in the same atomic replacement."""
    native_config, exported = config, config.export_config()
    base_path = str(Path(base_model).resolve()) if Path(base_model).exists() else str(base_model)
    payload = {
        **exported.peft_config(),
        "base_model_name_or_path": base_path,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "lorafusion_adapter": exported.to_dict(),
    }
    native, errors = {}, {}
    if native_config.svd_export_rank is not None:
        native, tensors, errors = _split_svd_export(tensors)

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if native_config.svd_export_rank is not None:
            save_file({k: v.contiguous() for k, v in native.items()}, str(tmp / NATIVE_WEIGHTS_NAME),
                      metadata={"format": "pt"})
            (tmp / NATIVE_CONFIG_NAME).write_text(json.dumps(
                {"format": NATIVE_FORMAT, "adapter": native_config.to_dict(), "base_model_name_or_path": base_path},
                indent=2))
            (tmp / REPORT_NAME).write_text(json.dumps(_report(native_config, errors), indent=2))

    path = atomic_directory(Path(directory), fill)
    if errors:
        logger.info("%s: %s exported as a rank-%d LoRA for PEFT, largest relative error %.3g (per module in %s)",
                    path, native_config.type, native_config.svd_export_rank, max(errors.values()), REPORT_NAME)
    return path


def _split_svd_export(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[str, float]]:
    """(the variant's own tensors, the truncated LoRA's, {module: relative error}) of a truncated-SVD export."""
    native, lora, errors = {}, {}, {}
    for key, value in tensors.items():
        if key.endswith(_LORA_KEYS):
            lora[key] = value
        elif key.endswith(f".{EXPORT_ERROR_KEY}"):
            errors[key[:-len(EXPORT_ERROR_KEY) - 1]] = float(value)
        else:
            native[key] = value
    return native, lora, errors


def _report(config: AdapterConfig, errors: dict[str, float]) -> dict:
    return {"variant": config.type, "export_rank": config.svd_export_rank,
            "max_relative_error": max(errors.values(), default=0.0), "relative_error": errors}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _native_config(directory: Path) -> AdapterConfig | None:
    """The variant's own config when the folder holds lorafusion's native files (see the module docstring)."""
    path = directory / NATIVE_CONFIG_NAME
    if not path.is_file():
        return None
    data = _read_json(path)
    found = data.get("format") if isinstance(data, dict) else data
    if found != NATIVE_FORMAT or "adapter" not in data:
        raise ValueError(f"{path}: not a {NATIVE_FORMAT} file (format={found!r}); remove it to read the folder's "
                         "PEFT adapter alone")
    return adapter_config_from_dict(data["adapter"], where=str(path))


def _config_from_peft(data: dict, path: Path) -> AdapterConfig:
    """Our own config when lorafusion wrote the adapter (it names the variant exactly), else PEFT's fields."""
    if isinstance(data, dict) and "lorafusion_adapter" in data:
        return adapter_config_from_dict(data["lorafusion_adapter"], where=str(path))
    return config_from_peft(data, str(path))


def read_peft_config(directory: str | Path) -> AdapterConfig:
    """The config of the adapter in `directory` (ValueError naming the file when it is missing or unsupported)."""
    native = _native_config(Path(directory))
    if native is not None:
        return native
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"adapter '{directory}' has no {CONFIG_NAME}; point at a folder written by lorafusion or PEFT")
    return _config_from_peft(_read_json(config_path), config_path)


def read_peft_adapter(directory: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors (keys without PEFT's adapter-name infix); lorafusion's native files when
    the folder has them."""
    directory = Path(directory)
    config = read_peft_config(directory)
    native = (directory / NATIVE_CONFIG_NAME).is_file()
    weights_path = directory / (NATIVE_WEIGHTS_NAME if native else WEIGHTS_NAME)
    if not weights_path.is_file():
        raise ValueError(f"adapter '{directory}' has no {weights_path.name}; point at a folder written by lorafusion "
                         "or PEFT")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
    return config, {key.replace(".default.", "."): value for key, value in tensors.items()}
