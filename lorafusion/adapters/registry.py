"""Adapter variants by name: `register_adapter(name=..., config_cls=..., layer_cls=..., shared_cls=...)`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lorafusion.adapters.base import AdapterConfig, AdapterLayer, JobShared

__all__ = ["AdapterVariant", "register_adapter", "get_variant", "adapter_config_from_dict", "registered_names",
           "config_from_peft"]


@dataclass(frozen=True, kw_only=True)
class AdapterVariant:
    name: str
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer]
    shared_cls: type[JobShared] | None = None
    """The job's tensors shared by all its layers (None: the layers hold everything)."""


_REGISTRY: dict[str, AdapterVariant] = {}


def register_adapter(
    *,
    name: str,
    config_cls: type[AdapterConfig],
    layer_cls: type[AdapterLayer],
    shared_cls: type[JobShared] | None = None,
) -> None:
    if name in _REGISTRY:
        raise ValueError(f"adapter type '{name}' is already registered; pick another name")
    if config_cls.type != name:
        raise ValueError(f"{config_cls.__name__}.type is '{config_cls.type}', expected '{name}'")
    if layer_cls.compute not in ("factors", "delta"):
        raise ValueError(f"{layer_cls.__name__}.compute is '{layer_cls.compute}'; use 'factors' or 'delta'")
    _REGISTRY[name] = AdapterVariant(name=name, config_cls=config_cls, layer_cls=layer_cls, shared_cls=shared_cls)


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
    known = {f.name for f in fields(variant.config_cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for type '{kind}'; known fields: {sorted(known)}")
    try:
        return variant.config_cls(**data)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def config_from_peft(data: dict[str, Any], where: str) -> AdapterConfig:
    """The config of a PEFT adapter_config.json: the one registered variant that reads it (ValueError otherwise)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    found = [c for c in (v.config_cls.from_peft(data, where) for v in _REGISTRY.values()) if c is not None]
    if not found:
        known = sorted({t for v in _REGISTRY.values() for t in v.config_cls.peft_types})
        raise ValueError(f"{where}: peft_type={data.get('peft_type')!r} is not supported; lorafusion reads "
                         f"{known} adapters")
    if len(found) > 1:
        raise ValueError(f"{where}: read as {[c.type for c in found]} by several variants; report this as a bug")
    return found[0]
