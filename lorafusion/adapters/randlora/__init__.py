from lorafusion.adapters.randlora.config import RandLoRAConfig
from lorafusion.adapters.randlora.layer import RandLoRALayer, RandLoRAShared

__all__ = ["RandLoRAConfig", "RandLoRALayer", "RandLoRAShared"]
