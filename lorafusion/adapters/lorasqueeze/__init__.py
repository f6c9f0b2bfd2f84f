from lorafusion.adapters.lorasqueeze.config import LoRASqueezeConfig
from lorafusion.adapters.lorasqueeze.layer import LoRASqueezeLayer

__all__ = ["LoRASqueezeConfig", "LoRASqueezeLayer"]
