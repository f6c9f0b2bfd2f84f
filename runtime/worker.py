"""The training engine of one pipeline stage: its chunk of the frozen model, every job's adapter on those
layers, each job's optimizer for them; forward and backward of packed microbatches.

A single-stage run holds the whole model in one StageWorker; a pipelined run has one per stage actor,
each running the same code (runtime/stage.py drives it over the microbatch stream).
"""

from __future__ import annotations

import torch

from lorafusion.adapters.attach import ModelAdapters
from lorafusion.batching import Microbatch, token_losses
from lorafusion.adapter_io import read_peft_adapter
from lorafusion.config import JobSpec, RunConfig
from lorafusion.models import build_model
from lorafusion.models.builder import resolve_dtype, warn_if_slow_on_cpu
from lorafusion.models.recompute import apply_recompute
from lorafusion.ops import native
from lorafusion.ops.utils import resolve_backend
from runtime.comm import StagePlace
from runtime.federation import restore_folds
from runtime.optim import JobOptimizer, build_optimizer

__all__ = ["StageWorker", "local_device"]


def local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class StageWorker:
    """Holds one model chunk, every job's adapter on it and each job's optimizer for those parameters."""

    def __init__(
        self,
        run: RunConfig,
        jobs: list[tuple[JobSpec, int]],
        place: StagePlace = StagePlace(),
        layers: tuple[int, int] | None = None,
    ) -> None:
        """jobs: (spec, total optimizer steps) of every job; layers: this chunk's [start, end), None = all."""
        self.run, self.place = run, place
        self.device = local_device()
        native.configure(run.native_ops, self.device)  # 'on' without a build fails here, before any training
        self.dtype = resolve_dtype(run.dtype, self.device)
        if self.device.type == "cpu":
            warn_if_slow_on_cpu(self.dtype)
        self.model, self.arch = build_model(run.base_model, dtype=self.dtype, pre_process=place.is_first,
                                            post_process=place.is_last, layers=layers, attention=run.attention)
        self.model.to(self.device).train()
        self.adapters = ModelAdapters(self.model, self.arch, kernels=self.run.kernels)
        apply_recompute(self.model, run.recompute, self.adapters.batch)
        self.optimizers: dict[str, JobOptimizer] = {}
        for spec, total_steps in jobs:
            self.adapters.add_job(spec.name, spec.adapter, seed=spec.seed)
            if spec.init_adapter is not None:  # a resume then overwrites it with the checkpoint's state
                self.adapters.load_peft_state_dict(spec.name, read_peft_adapter(spec.init_adapter)[1],
                                                   where=f"job '{spec.name}': init_adapter '{spec.init_adapter}'")
            self.optimizers[spec.name] = build_optimizer(spec, self.adapters.named_parameters(spec.name), total_steps)
        if self.device.type == "cuda" and resolve_backend(run.kernels, self.device) == "triton":
            self._choose_tiles()

    def _choose_tiles(self) -> None:
        """Tile choices of the fused kernels for every adapted layer shape, made now, before training, and kept in
        <output_dir>/tiles/stage<s>.json: a resumed run reads them back and computes with the same tiles."""
        from pathlib import Path

        from lorafusion.ops.fused_lora import tune_tiles
        from lorafusion.ops.utils import load_tiles, save_tiles

        path = Path(self.run.output_dir) / "tiles" / f"stage{self.place.stage}.json"
        if path.is_file():
            load_tiles(path)
        shapes = {(wrapper.weight.shape[0], wrapper.weight.shape[1],
                   sum(wrapper.factors(job, self.dtype).a.shape[0] for job in self.optimizers))
                  for sites in self.adapters.layers.values() for wrapper in sites.values() if len(wrapper.adapters)}
        tune_tiles(sorted(shapes), self.run.max_tokens_per_microbatch, self.dtype, self.device)
        save_tiles(path)

    def hidden_shape(self, mb: Microbatch) -> tuple[int, int, int]:
        """Shape of the activations between stages for `mb`: [tokens, 1, hidden]."""
        return (mb.input_ids.shape[1], 1, self.arch.hidden_size)

    @property
    def hidden_dtype(self) -> torch.dtype:
        return self.dtype

    def forward(
        self, mb: Microbatch, loss_weight: dict[str, float] | None, hidden_in: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run this chunk on `mb` (already on the device); `hidden_in` is the previous stage's output.

        Returns (what the backward needs, per-job sums): on the last stage the weighted loss (each job's
        token losses times 1 / its loss tokens in its global batch) and each job's weighted loss sum (fp64
        scalars on the device: nothing waits for the device here); on other stages the hidden states [T, 1, H]
        to send on, and no sums. Without `loss_weight` (evaluation) the sums are each job's unweighted
        token-loss sum and nothing is kept for a backward.
        """
        if hidden_in is not None:
            self.model.set_input_tensor(hidden_in)
        self.adapters.batch.segments = mb.segments
        try:
            if not self.place.is_last:
                out = self.model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.packed_seq_params())
                return out, {}
            losses = token_losses(self.model, mb)  # [T]
        finally:
            self.adapters.batch.segments = []
        weights = torch.zeros_like(losses)
        for seg in mb.segments:
            weights[seg.start:seg.end] = loss_weight[seg.job] if loss_weight is not None else 1.0
        weighted = losses * weights
        sums = {}
        for seg in mb.segments:  # build_microbatch gives each job one segment
            total = weighted[seg.start:seg.end].detach().double().sum()
            sums[seg.job] = sums[seg.job] + total if seg.job in sums else total
        return weighted.sum(), sums

    def backward(
        self, out: torch.Tensor, grad_out: torch.Tensor | None, hidden_in: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Backward of one forward's output; returns the gradient for the previous stage (None on stage 0)."""
        if grad_out is None:
            out.backward()
        elif out.requires_grad:
            torch.autograd.backward(out, grad_tensors=grad_out)
        if hidden_in is None:
            return None
        return hidden_in.grad if hidden_in.grad is not None else torch.zeros_like(hidden_in)

    def forward_backward(self, mb: Microbatch, loss_weight: dict[str, float]) -> dict[str, float]:
        """Forward and backward of one microbatch on a single-stage worker, gradients collected into .grad;
        each job's weighted loss sum."""
        out, sums = self.forward(mb.to(self.device), loss_weight)
        self.backward(out, None, None)
        for job in sums:
            self.adapters.collect_grads(job)
        return {job: float(total) for job, total in sums.items()}

    def collect_grads(self, job: str) -> None:
        """Put the job's gradients of its microbatches since its last step into its parameters' .grad."""
        self.adapters.collect_grads(job)

    def grad_norm_sq(self, job: str, exclude: list[torch.nn.Parameter] = ()) -> torch.Tensor:
        return self.optimizers[job].grad_norm_sq(exclude)

    def shared_parameters(self, job: str) -> list[torch.nn.Parameter]:
        """The job's trainable tensors shared by all its layers: every pipeline stage holds a copy."""
        return self.adapters.shared_parameters(job)

    def transform_grads(self, job: str) -> None:
        """The job's variant's gradient hooks, on its complete gradients (before their norm)."""
        self.adapters.transform_grads(job)

    def step(self, job: str, total_norm: float) -> float:
        """One optimizer step of `job` clipped by its global gradient norm, then its variant's after-step hooks (and
        the reset of the optimizer state of the parameters they re-parametrised); returns the learning rate."""
        lr = self.optimizers[job].step(total_norm)
        self.optimizers[job].reset_state(self.adapters.after_step(job, self.optimizers[job].step_count))
        return lr

    def peft_state_dict(self, job: str) -> dict[str, torch.Tensor]:
        """This chunk's part of the job's adapter, under PEFT names (global layer numbers)."""
        return self.adapters.peft_state_dict(job)

    def _named_job_parameters(self, job: str) -> dict[str, torch.nn.Parameter]:
        """The job's parameters held here, in the optimizer's order, named independently of the pipeline cut
        (see ModelAdapters.named_parameters)."""
        return self.adapters.named_parameters(job)

    def job_state(self, job: str) -> dict:
        """This stage's share of `job`'s training state, on CPU: {"step_count", "params": {name: tensor},
        "optimizer": {name: {key: tensor}}} (raw trainable tensors, exact for every variant; the optimizer's state
        per parameter: AdamW's "step", "exp_avg", "exp_avg_sq", or a factor method's, see runtime/optim)."""
        named = self._named_job_parameters(job)
        optim = self.optimizers[job].state_dict()
        frozen = self.adapters.named_parameters(job, frozen=True)  # trainable ones and the job's frozen state
        return {
            "step_count": optim["step_count"],
            "params": {name: p.detach().to("cpu").clone() for name, p in frozen.items()},
            "optimizer": {**{name: {} for name in frozen}, **dict(zip(named, optim["state"]))},
        }

    def load_job_state(self, job: str, state: dict, where: str = "checkpoint") -> None:
        """Restore `job` from `job_state` output; `state` may also hold other stages' tensors (they are ignored)."""
        named = self._named_job_parameters(job)
        restore_folds(self.adapters, job, state["params"])  # FLoRA's folded rounds: shapes the checkpoint decides
        every = self.adapters.named_parameters(job, frozen=True)
        missing = [name for name in every if name not in state["params"] or name not in state["optimizer"]]
        if missing:
            raise ValueError(
                f"{where}: job '{job}' has no saved state for {len(missing)} of this stage's parameters "
                f"(first: '{missing[0]}'); the checkpoint is from a different adapter config, from an older "
                "lorafusion that named adapter parameters by their megatron module path, or damaged"
            )
        with torch.no_grad():
            for name, param in every.items():
                saved = state["params"][name]
                if saved.shape != param.shape:
                    raise ValueError(f"{where}: job '{job}' parameter '{name}' has shape {tuple(saved.shape)}, "
                                     f"expected {tuple(param.shape)}; the checkpoint is from a different adapter config")
                param.copy_(saved)
        self.optimizers[job].load_state_dict(
            {"step_count": state["step_count"], "state": [state["optimizer"][name] for name in named]},
            where=f"{where}: job '{job}' optimizer",
        )
        for layer in self.adapters.init_pass_layers(job):  # the checkpoint holds the initialised state
            layer.finish_init_pass(None)

    def init_pass_gradients(self, job: str) -> list[torch.Tensor]:
        """The base-weight gradients the job's init-pass layers summed over the init pass (this replica's share)."""
        return [layer.probe_grad() for layer in self.adapters.init_pass_layers(job)]

    def finish_init_pass(self, job: str, grads: list[torch.Tensor]) -> None:
        """Initialise the job's init-pass layers from their gradients summed over every replica."""
        for layer, grad in zip(self.adapters.init_pass_layers(job), grads):
            layer.finish_init_pass(grad)

    def remove_job(self, job: str) -> None:
        self.adapters.remove_job(job)
        self.optimizers.pop(job, None)
