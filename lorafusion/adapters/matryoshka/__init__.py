from lorafusion.adapters.matryoshka.config import MatryoshkaLoRAConfig
from lorafusion.adapters.matryoshka.layer import MatryoshkaLoRALayer

__all__ = ["MatryoshkaLoRAConfig", "MatryoshkaLoRALayer"]
