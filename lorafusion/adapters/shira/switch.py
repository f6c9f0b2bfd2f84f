"""Switching SHiRA adapters into a model's base weights and back: evaluation and serving then run the bare base
model's forward, with no dense ΔW and no adapter branch, and the weights get their exact bits back afterwards.

`switched(adapters, jobs)` is the one entry point; it adds each listed job's sparse values into the frozen weight
they adapt (several jobs' deltas on one entry add up) and restores the saved entries on exit. Per weight this is
one `sparse_switch` / `sparse_restore` of csrc/ where the native ops are built for the weight's device, else the
torch index ops below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from lorafusion.adapters.multi import job_key
from lorafusion.ops import native

__all__ = ["restore_entries", "switch_entries", "switched"]


def switch_entries(weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weight.view(-1)[index] += values in place; returns the entries' previous values [m], for `restore_entries`.

    Each addition is float(w) + float(v) rounded once to the weight's dtype; an index listed several times (jobs
    whose supports overlap) takes its additions one after another in list order, as if each job were switched
    in turn. Native and torch paths give the same bits."""
    if native.enabled(weight.device):
        saved = torch.empty(index.numel(), dtype=weight.dtype, device=weight.device)  # [m]
        native.sparse_switch(weight, index, values.contiguous(), saved)
        return saved
    flat = weight.view(-1)
    saved = flat[index]  # [m], a copy
    if index.numel() == 0:
        return saved
    # the k-th time an index appears in the list (0 for its first): one pass per k, each over distinct entries
    order = torch.sort(index, stable=True).indices
    position = torch.arange(index.numel(), device=index.device)
    starts = torch.ones_like(index, dtype=torch.bool)
    starts[1:] = index[order][1:] != index[order][:-1]
    repeat = torch.empty_like(position)
    repeat[order] = position - torch.cummax(torch.where(starts, position, 0), 0).values
    for k in range(int(repeat.max()) + 1):
        pick = repeat == k
        entries = index[pick]
        flat[entries] = (flat[entries].float() + values[pick].float()).to(flat.dtype)
    return saved


def restore_entries(weight: torch.Tensor, index: torch.Tensor, saved: torch.Tensor) -> None:
    """weight.view(-1)[index] = saved: the exact bits `switch_entries` returned."""
    if native.enabled(weight.device):
        native.sparse_restore(weight, index, saved)
    else:
        weight.view(-1)[index] = saved


def _weight_deltas(adapters, jobs: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(base weight [N, K], flat indices [m], values [m]) per adapted weight, the listed jobs' supports joined."""
    for job in jobs:
        if job not in adapters.configs:
            raise ValueError(f"job {job!r} has no adapter on this model; choose from {sorted(adapters.configs)}")
        if adapters.configs[job].type != "shira":
            raise ValueError(f"job {job!r} has a {adapters.configs[job].type!r} adapter; only SHiRA adapters switch "
                             "into the base weights (evaluate the others through their adapter layers)")
    deltas = []
    for sites in adapters.layers.values():
        for wrapper in sites.values():
            indices, values = [], []
            held = [wrapper.adapters[job_key(job)] for job in jobs if job_key(job) in wrapper.adapters]
            for layers in held:
                for target, layer in layers.items():
                    rows = wrapper.out_rows[target][layer.rows]  # [nnz], rows of the base weight
                    indices.append(rows * wrapper.weight.shape[1] + layer.cols)
                    values.append(layer.shira_weight.detach())
            if indices:
                deltas.append((wrapper.weight, torch.cat(indices), torch.cat(values)))
    return deltas


@contextlib.contextmanager
def switched(adapters, jobs: Sequence[str]) -> Iterator[None]:
    """Inside the block, the base weights of `adapters` (a ModelAdapters) hold W + Σ ΔW of the listed SHiRA jobs,
    so a forward without any job's segments computes with those adapters; on exit (also after an exception) every
    entry gets its exact bits from before. ValueError for a job that is not a SHiRA job of this model."""
    deltas = _weight_deltas(adapters, list(jobs))
    done = []
    try:
        with torch.no_grad():
            for weight, index, values in deltas:
                done.append((weight, index, switch_entries(weight, index, values)))
        yield
    finally:
        with torch.no_grad():
            for weight, index, saved in reversed(done):
                restore_entries(weight, index, saved)
