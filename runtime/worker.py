"""The training engine: one stage's loop over packed microbatches and per-job optimizer steps.

The single-process fit runs one StageWorker holding the whole model; the Ray runtime runs the same
worker in each stage actor.
"""

from __future__ import annotations

import torch

from lorafusion.adapters.attach import ModelAdapters
from lorafusion.batching import Microbatch, token_losses
from lorafusion.checkpoint import write_peft_adapter
from lorafusion.config import DTYPES
from lorafusion.data import Sample
from lorafusion.evaluate import EvalResult, evaluate_samples
from lorafusion.models import build_model
from lorafusion.prepare import PreparedRun
from runtime.optim import JobOptimizer

__all__ = ["StageWorker"]


class StageWorker:
    """Holds the frozen base model, every job's adapter and optimizer; runs microbatches and steps."""

    def __init__(self, prepared: PreparedRun) -> None:
        self.run = prepared.run
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.model, self.arch = build_model(self.run.base_model, dtype=DTYPES[self.run.dtype])
        self.model.to(self.device).train()
        self.adapters = ModelAdapters(self.model, self.arch, kernels=self.run.kernels)
        self.optimizers: dict[str, JobOptimizer] = {}
        for job in prepared.jobs:
            self.adapters.add_job(job.name, job.spec.adapter, seed=job.spec.seed)
            self.optimizers[job.name] = JobOptimizer(job.spec, self.adapters.parameters(job.name), job.total_steps)

    def forward_backward(self, mb: Microbatch, loss_weight: dict[str, float]) -> dict[str, float]:
        """Run one microbatch; each job's token losses are weighted by 1 / (its loss tokens in its global batch).

        Returns each job's summed (unweighted) token loss in this microbatch.
        """
        mb = mb.to(self.device)
        self.adapters.batch.segments = mb.segments
        losses = token_losses(self.model, mb)  # [T]
        weights = torch.zeros_like(losses)
        for seg in mb.segments:
            weights[seg.start:seg.end] = loss_weight[seg.job]
        (losses * weights).sum().backward()
        self.adapters.batch.segments = []
        # One host transfer for all jobs' sums (build_microbatch gives each job one segment).
        sums = torch.stack([losses[s.start:s.end].detach().double().sum() for s in mb.segments]).tolist()
        return {seg.job: total for seg, total in zip(mb.segments, sums)}

    def step(self, job: str) -> tuple[float, float]:
        """One optimizer step of `job`; returns (gradient norm before clipping, learning rate)."""
        opt = self.optimizers[job]
        norm = opt.grad_norm_sq() ** 0.5
        return norm, opt.step(norm)

    def evaluate(self, job: str, samples: list[Sample]) -> EvalResult:
        return evaluate_samples(self.model, samples, job=job, batch=self.adapters.batch,
                                capacity=self.run.max_tokens_per_microbatch)

    def export(self, job: str, directory: str) -> str:
        tensors = self.adapters.peft_state_dict(job)
        write_peft_adapter(directory, tensors, self.adapters.configs[job], base_model=self.run.base_model)
        return directory

    def remove_job(self, job: str) -> None:
        self.adapters.remove_job(job)
        self.optimizers.pop(job, None)
