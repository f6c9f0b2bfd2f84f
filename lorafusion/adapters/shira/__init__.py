from lorafusion.adapters.shira.config import SHiRAConfig
from lorafusion.adapters.shira.layer import SHiRALayer, shira_support

__all__ = ["SHiRAConfig", "SHiRALayer", "shira_support"]
