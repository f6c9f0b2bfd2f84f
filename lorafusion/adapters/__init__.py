"""Adapter variants (one folder each, one registry line each) and the multi-adapter linear layer that runs many
jobs at once."""

from lorafusion.adapters.base import TARGET_MODULES, AdapterConfig, AdapterLayer, JobShared
from lorafusion.adapters.dora import DoRAConfig, DoRALayer
from lorafusion.adapters.lora import LoRAConfig, LoRALayer, RsLoRAConfig
from lorafusion.adapters.loraga import LoRAGAConfig, LoRAGALayer
from lorafusion.adapters.lorasb import LoRASBConfig, LoRASBLayer
from lorafusion.adapters.lorasqueeze import LoRASqueezeConfig, LoRASqueezeLayer
from lorafusion.adapters.randlora import RandLoRAConfig, RandLoRALayer, RandLoRAShared
from lorafusion.adapters.registry import (
    adapter_config_from_dict,
    config_from_peft,
    get_variant,
    register_adapter,
    registered_names,
)
from lorafusion.adapters.shira import SHiRAConfig, SHiRALayer
from lorafusion.adapters.unilora import UniLoRAConfig, UniLoRALayer, UniLoRAShared
from lorafusion.adapters.vera import VeRAConfig, VeRALayer, VeRAShared
from lorafusion.adapters.dylora import DyLoRAConfig, DyLoRALayer, DyLoRAShared
from lorafusion.adapters.matryoshka import MatryoshkaLoRAConfig, MatryoshkaLoRALayer
from lorafusion.adapters.blocklora import BlockLoRAConfig, BlockLoRALayer
from lorafusion.adapters.paca import PaCAConfig, PaCALayer
from lorafusion.adapters.loldu import LoLDUConfig, LoLDULayer
from lorafusion.adapters.hydra import HydraConfig, HydraLayer
from lorafusion.adapters.tera import TeRAConfig, TeRALayer, TeRAShared

register_adapter(name="lora", config_cls=LoRAConfig, layer_cls=LoRALayer)
register_adapter(name="rslora", config_cls=RsLoRAConfig, layer_cls=LoRALayer)
register_adapter(name="dora", config_cls=DoRAConfig, layer_cls=DoRALayer)
register_adapter(name="loraga", config_cls=LoRAGAConfig, layer_cls=LoRAGALayer)
register_adapter(name="vera", config_cls=VeRAConfig, layer_cls=VeRALayer, shared_cls=VeRAShared)
register_adapter(name="randlora", config_cls=RandLoRAConfig, layer_cls=RandLoRALayer, shared_cls=RandLoRAShared)
register_adapter(name="shira", config_cls=SHiRAConfig, layer_cls=SHiRALayer)
register_adapter(name="unilora", config_cls=UniLoRAConfig, layer_cls=UniLoRALayer, shared_cls=UniLoRAShared)
register_adapter(name="lorasb", config_cls=LoRASBConfig, layer_cls=LoRASBLayer)
register_adapter(name="dylora", config_cls=DyLoRAConfig, layer_cls=DyLoRALayer, shared_cls=DyLoRAShared)
register_adapter(name="matryoshka", config_cls=MatryoshkaLoRAConfig, layer_cls=MatryoshkaLoRALayer)
register_adapter(name="blocklora", config_cls=BlockLoRAConfig, layer_cls=BlockLoRALayer)
register_adapter(name="lorasqueeze", config_cls=LoRASqueezeConfig, layer_cls=LoRASqueezeLayer)
register_adapter(name="paca", config_cls=PaCAConfig, layer_cls=PaCALayer)
register_adapter(name="loldu", config_cls=LoLDUConfig, layer_cls=LoLDULayer)
register_adapter(name="hydra", config_cls=HydraConfig, layer_cls=HydraLayer)
register_adapter(name="tera", config_cls=TeRAConfig, layer_cls=TeRALayer, shared_cls=TeRAShared)

__all__ = [
    "TARGET_MODULES",
    "AdapterConfig",
    "AdapterLayer",
    "DoRAConfig",
    "JobShared",
    "LoRAConfig",
    "LoRAGAConfig",
    "LoRASBConfig",
    "LoRASqueezeConfig",
    "RandLoRAConfig",
    "RsLoRAConfig",
    "SHiRAConfig",
    "UniLoRAConfig",
    "VeRAConfig",
    "DyLoRAConfig",
    "MatryoshkaLoRAConfig",
    "BlockLoRAConfig",
    "adapter_config_from_dict",
    "config_from_peft",
    "get_variant",
    "register_adapter",
    "registered_names",
    "PaCAConfig",
    "LoLDUConfig",
    "HydraConfig",
    "TeRAConfig",
]
