from lorafusion.adapters.paca.config import PaCAConfig
from lorafusion.adapters.paca.layer import PaCALayer

__all__ = ["PaCAConfig", "PaCALayer"]
