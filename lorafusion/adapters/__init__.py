"""Adapter variants (one folder each) and the multi-adapter linear layer that runs many jobs at once."""

from lorafusion.adapters.base import TARGET_MODULES, AdapterConfig, AdapterLayer
from lorafusion.adapters.lora import LoRAConfig, LoRALayer, RsLoRAConfig, lora_peft_config
from lorafusion.adapters.registry import (
    adapter_config_from_dict,
    get_variant,
    register_adapter,
    registered_names,
)

register_adapter(name="lora", config_cls=LoRAConfig, layer_cls=LoRALayer, peft_config=lora_peft_config)
register_adapter(name="rslora", config_cls=RsLoRAConfig, layer_cls=LoRALayer, peft_config=lora_peft_config)

__all__ = [
    "TARGET_MODULES",
    "AdapterConfig",
    "AdapterLayer",
    "LoRAConfig",
    "RsLoRAConfig",
    "adapter_config_from_dict",
    "get_variant",
    "register_adapter",
    "registered_names",
]
