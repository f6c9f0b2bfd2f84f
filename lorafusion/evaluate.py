"""Mean loss of a base model (optionally with one PEFT adapter) over a JSONL dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafusion.batching import build_microbatch, token_losses
from lorafusion.config import DTYPES
from lorafusion.data import IGNORE_INDEX, Sample, load_dataset, load_tokenizer

__all__ = ["EvalResult", "evaluate", "evaluate_samples"]


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean cross-entropy over the loss tokens (completion / assistant tokens where the data has them)."""
    tokens: int
    """Number of loss tokens."""


def _chunks(samples: list[Sample], capacity: int) -> list[list[Sample]]:
    """Consecutive samples, each chunk at most `capacity` tokens (a longer sample goes alone)."""
    chunks, current, used = [], [], 0
    for sample in samples:
        if current and used + len(sample) > capacity:
            chunks.append(current)
            current, used = [], 0
        current.append(sample)
        used += len(sample)
    if current:
        chunks.append(current)
    return chunks


@torch.no_grad()
def evaluate_samples(
    model: torch.nn.Module, samples: list[Sample], *, job: str | None, batch=None, capacity: int = 4096
) -> EvalResult:
    """Evaluate with `job`'s adapter (its segments set on the shared `batch`) or the bare model (job None)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for chunk in _chunks(samples, capacity):
            mb = build_microbatch([(job or "", s) for s in chunk]).to(device)
            if batch is not None and job is not None:
                batch.segments = mb.segments
            total += float(token_losses(model, mb).double().sum())
            count += int((mb.labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
        if batch is not None:
            batch.segments = []
    return EvalResult(loss=total / max(count, 1), tokens=count)


def evaluate(
    base_model: str | Path,
    adapter: str | Path | None,
    dataset: str | Path,
    *,
    max_seq_len: int = 4096,
    overflow: str = "reject",
    max_tokens_per_microbatch: int = 4096,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    fields: dict[str, str] | None = None,
) -> EvalResult:
    """Loss of `base_model` + `adapter` (a PEFT adapter folder, or None for the base model) on `dataset`.

    device: where to compute (default: the first CUDA GPU when torch sees one, else the CPU); dtype: as
    run.dtype ('auto' = bfloat16 where the device multiplies it natively, else float32); dataset and fields: as a
    job's eval_dataset and fields (a DatasetDict folder is read as `folder:split`)."""
    from lorafusion.adapters.attach import ModelAdapters
    from lorafusion.adapter_io import read_peft_adapter
    from lorafusion.adapters.shira.switch import switched
    from lorafusion.models import build_model, read_architecture
    from lorafusion.models.builder import resolve_dtype, warn_if_slow_on_cpu

    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r}; choose one of {['auto', *DTYPES]}")
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} but torch sees no CUDA GPU; leave device unset or pass 'cpu'")
    read_architecture(base_model)
    samples = load_dataset(dataset, load_tokenizer(base_model), max_seq_len=max_seq_len, overflow=overflow,
                           truncate_hint="pass overflow='truncate' (lorafusion eval: --overflow truncate)",
                           fields=fields)
    loaded = read_peft_adapter(adapter) if adapter is not None else None
    compute = resolve_dtype(dtype, device)
    if device.type == "cpu":
        warn_if_slow_on_cpu(compute)
    model, arch = build_model(base_model, dtype=compute)
    model.to(device)
    if loaded is None:
        return evaluate_samples(model, samples, job=None, capacity=max_tokens_per_microbatch)
    adapters = ModelAdapters(model, arch)  # adapters live on the model's device
    adapters.add_job("eval", loaded[0], seed=0)
    adapters.load_peft_state_dict("eval", loaded[1], where=str(adapter))
    if loaded[0].type == "shira":  # this model is ours alone: its weights take the sparse ΔW for the evaluation
        with switched(adapters, ["eval"]):
            return evaluate_samples(model, samples, job=None, capacity=max_tokens_per_microbatch)
    return evaluate_samples(model, samples, job="eval", batch=adapters.batch, capacity=max_tokens_per_microbatch)
