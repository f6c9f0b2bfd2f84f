"""Fused LoRA kernels (Triton) and their pure-torch references.

`fused_lora_linear` is one adapter with PEFT shapes; `fused_multi_lora_linear` runs a microbatch whose
rows are split into per-adapter segments described by a `SegmentTable` (built once per microbatch).
The kernel entry points import triton on first use, so `import lorafusion.ops` works without it.
"""

from __future__ import annotations

import importlib

from lorafusion.ops.reference import lora_linear_addmm, lora_linear_reference, multi_lora_linear_reference
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import BACKENDS, pick_config, resolve_backend

_NEEDS_TRITON = {
    "FusedMultiLoRAFunction": "lorafusion.ops.fused_lora",
    "fused_lora_linear": "lorafusion.ops.fused_lora",
    "fused_multi_lora_linear": "lorafusion.ops.fused_lora",
    "layer_params": "lorafusion.ops.fused_lora",
    "dropout_keep_mask": "lorafusion.ops.fused_lora_dropout_xa",
}

__all__ = [
    "BACKENDS", "FusedMultiLoRAFunction", "LayerParams", "SegmentTable", "dropout_keep_mask", "fused_lora_linear",
    "fused_multi_lora_linear", "layer_params", "lora_linear_addmm", "lora_linear_reference",
    "multi_lora_linear_reference", "pick_config", "resolve_backend",
]


def __getattr__(name: str):
    if name in _NEEDS_TRITON:
        return getattr(importlib.import_module(_NEEDS_TRITON[name]), name)
    raise AttributeError(f"module 'lorafusion.ops' has no attribute {name!r}")
