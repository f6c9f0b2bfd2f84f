from lorafusion.adapters.lorasqueeze.svd import dense_svd, factor_svd, randomized_svd, svd_method

__all__ = ["dense_svd", "factor_svd", "randomized_svd", "svd_method"]
