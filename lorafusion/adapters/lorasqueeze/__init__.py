from lorafusion.adapters.lorasqueeze.config import LoRASqueezeConfig
from lorafusion.adapters.lorasqueeze.layer import LoRASqueezeLayer
from lorafusion.adapters.lorasqueeze.svd import dense_svd, factor_svd, randomized_svd, svd_method

__all__ = ["LoRASqueezeConfig", "LoRASqueezeLayer", "dense_svd", "factor_svd", "randomized_svd", "svd_method"]
