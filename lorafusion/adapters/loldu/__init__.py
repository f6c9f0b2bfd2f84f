from lorafusion.adapters.loldu.config import LoLDUConfig
from lorafusion.adapters.loldu.layer import LoLDULayer, ldu_factors

__all__ = ["LoLDUConfig", "LoLDULayer", "ldu_factors"]
