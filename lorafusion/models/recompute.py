"""Activation recompute: keep fewer activations for the backward and compute them again there.

- 'selective': each layer's core attention (the per-sample attention over q, k, v) is recomputed; its inputs stay.
- 'full': each decoder layer keeps only its input hidden states and runs again, adapters included, in the backward.

torch.utils.checkpoint (non-reentrant) reruns the wrapped forward. The rerun sees the adapter segments of the
microbatch it belongs to, not of whichever microbatch ran last (1F1B keeps several in flight): the wrapper
captures them at the forward. Dropout masks are counter-based (adapters.dropout), so the rerun draws the same.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafusion.config import RECOMPUTE_MODES

__all__ = ["apply_recompute"]


def _checkpointed(module: nn.Module, batch) -> None:
    """Make `module`'s forward a checkpointed call that reruns with the adapter batch's segments of its forward."""
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        segments = batch.segments if batch is not None else None

        def run(*inner_args, **inner_kwargs):
            if batch is None:
                return forward(*inner_args, **inner_kwargs)
            current, batch.segments = batch.segments, segments
            try:
                return forward(*inner_args, **inner_kwargs)
            finally:
                batch.segments = current

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    module.forward = wrapped


def apply_recompute(model: nn.Module, mode: str, batch=None) -> None:
    """Set `mode` (RECOMPUTE_MODES) on a GPTModel or pipeline chunk whose adapters share the AdapterBatch `batch`."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"run.recompute={mode!r}; choose one of {list(RECOMPUTE_MODES)}")
    if mode == "none":
        return
    for layer in model.decoder.layers:
        _checkpointed(layer.self_attention.core_attention if mode == "selective" else layer, batch)
