from lorafusion.adapters.loraga.config import LoRAGAConfig
from lorafusion.adapters.loraga.layer import LoRAGALayer, gradient_init

__all__ = ["LoRAGAConfig", "LoRAGALayer", "gradient_init"]
