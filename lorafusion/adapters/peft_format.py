"""Reading PEFT's adapter_config.json strictly: a field that would change what the adapter computes and that
lorafusion does not implement is an error naming it, never silently ignored."""

from __future__ import annotations

from typing import Any

from lorafusion.adapters.base import TARGET_MODULES

__all__ = ["peft_targets", "reject_unsupported", "peft_number"]

# PEFT fields shared by its tuners whose non-default values we do not implement, with their defaults.
_COMMON_DEFAULTS: dict[str, Any] = {
    "fan_in_fan_out": False,
    "bias": "none",
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
    "exclude_modules": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "lora_bias": False,
    "use_qalora": False,
    "megatron_config": None,
}


def reject_unsupported(data: dict[str, Any], where: str, extra: dict[str, Any] | None = None) -> None:
    """ValueError for the first field of `data` that differs from the value we support (default: PEFT's default)."""
    def empty(value: Any) -> bool:  # PEFT writes null, {} or false for "none of this"
        return value is None or value is False or (isinstance(value, (dict, list)) and not value)

    for key, supported in {**_COMMON_DEFAULTS, **(extra or {})}.items():
        value = data.get(key, supported)
        if value != supported and not (empty(value) and empty(supported)):
            raise ValueError(f"{where}: {key}={value!r} is not supported by lorafusion (it needs {key}={supported!r}); "
                             "retrain or convert the adapter without it")


def peft_targets(data: dict[str, Any], where: str) -> list[str]:
    """target_modules of a PEFT config as our HF target names ('all-linear' = every decoder linear)."""
    targets = data.get("target_modules")
    if targets == "all-linear":
        return list(TARGET_MODULES)
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"{where}: target_modules={targets!r} must be a list of module names such as "
                         f"['q_proj', 'v_proj'] (regular expressions are not supported)")
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown:
        raise ValueError(f"{where}: target_modules has {unknown}, which lorafusion cannot adapt; "
                         f"it adapts {list(TARGET_MODULES)}")
    return list(targets)


def peft_number(data: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key}={value!r} must be a number")
    return value
