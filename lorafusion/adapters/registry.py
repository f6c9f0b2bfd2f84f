"""Adapter variants by name: `register_adapter(name=..., config_cls=..., layer_cls=..., peft_config=...)`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from lorafusion.adapters.base import AdapterConfig, AdapterLayer

__all__ = ["AdapterVariant", "register_adapter", "get_variant", "adapter_config_from_dict", "registered_names"]


@dataclass(frozen=True, kw_only=True)
class AdapterVariant:
    name: str
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer]
    peft_config: Callable[[AdapterConfig], dict[str, Any]]
    """Builds the PEFT adapter_config.json fields (peft_type, r, ...) for an exported adapter."""


_REGISTRY: dict[str, AdapterVariant] = {}


def register_adapter(
    *,
    name: str,
    config_cls: type[AdapterConfig],
    layer_cls: type[AdapterLayer],
    peft_config: Callable[[AdapterConfig], dict[str, Any]],
) -> None:
    if name in _REGISTRY:
        raise ValueError(f"adapter type '{name}' is already registered; pick another name")
    if config_cls.type != name:
        raise ValueError(f"{config_cls.__name__}.type is '{config_cls.type}', expected '{name}'")
    _REGISTRY[name] = AdapterVariant(name=name, config_cls=config_cls, layer_cls=layer_cls, peft_config=peft_config)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def get_variant(name: str) -> AdapterVariant:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown adapter type '{name}'; known types: {registered_names()}")
    return _REGISTRY[name]


def adapter_config_from_dict(data: dict[str, Any], where: str = "adapter") -> AdapterConfig:
    """`{type: lora, rank: 16, ...}` → the variant's config (ValueError naming the bad key)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping like {{type: lora, rank: 16}}, got {data!r}")
    data = dict(data)
    kind = data.pop("type", "lora")
    try:
        variant = get_variant(kind)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    known = {f.name for f in fields(variant.config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for type '{kind}'; known fields: {sorted(known)}")
    return variant.config_cls(**data)
