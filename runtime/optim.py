"""Per-job optimisation: AdamW on the job's own parameters, its LR schedule and gradient clipping."""

from __future__ import annotations

import math

import torch

from lorafusion.config import JobSpec

__all__ = ["lr_at", "JobOptimizer"]


def lr_at(spec: JobSpec, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    peak = spec.learning_rate
    if step < spec.warmup_steps:
        return peak * (step + 1) / spec.warmup_steps
    if spec.lr_schedule == "constant":
        return peak
    # Decay reaches min_lr_ratio·peak after the last step, so the last step still learns.
    decay_steps = max(total_steps - spec.warmup_steps, 1)
    progress = min((step - spec.warmup_steps) / decay_steps, 1.0)
    floor = spec.min_lr_ratio
    if spec.lr_schedule == "linear":
        return peak * (1.0 - (1.0 - floor) * progress)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class JobOptimizer:
    """AdamW for one job; the gradient norm is the job's own (never mixed with other jobs').

    The step runs over all the job's tensors at once: torch's fused AdamW on CUDA, its foreach (multi-tensor)
    AdamW elsewhere, so its cost does not grow with one kernel launch per parameter."""

    def __init__(self, spec: JobSpec, params: list[torch.nn.Parameter], total_steps: int) -> None:
        self.spec, self.params, self.total_steps = spec, params, total_steps
        self.step_count = 0
        self.fused = bool(params) and params[0].device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=spec.learning_rate, betas=spec.adam_betas, eps=spec.adam_eps,
            weight_decay=spec.weight_decay, **({"fused": True} if self.fused else {"foreach": True}),
        )

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def grad_norm_sq(self, exclude: list[torch.nn.Parameter] = ()) -> torch.Tensor:
        """Squared L2 norm of this job's gradients held here (but those of `exclude`), an fp64 scalar on their
        device (no host sync; summed across stages by the caller)."""
        skip = {id(p) for p in exclude}
        grads = [p.grad for p in self.params if p.grad is not None and id(p) not in skip]
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        norms = torch._foreach_norm(grads)
        return torch.stack(norms).double().pow(2).sum()

    def step(self, total_norm: float) -> float:
        """Clip to max_grad_norm using `total_norm`, apply one AdamW step, zero the gradients; returns the LR."""
        lr = lr_at(self.spec, self.step_count, self.total_steps)
        if self.spec.max_grad_norm is not None and total_norm > self.spec.max_grad_norm:
            factor = self.spec.max_grad_norm / (total_norm + 1e-6)
            torch._foreach_mul_(self._grads(), factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return lr

    def reset_state(self, params: list[torch.nn.Parameter]) -> None:
        """Forget the AdamW state (moments and bias-correction count) of `params`: their next step is a first step.
        The job's LR schedule position (step_count) is unchanged."""
        for param in params:
            self.optimizer.state.pop(param, None)

    def state_dict(self) -> dict:
        """{"step_count", "state": one {name: tensor} per parameter (order of `params`)}, tensors cloned to CPU.

        The LR schedule position is `step_count`; the AdamW hyper-parameters come from the JobSpec.
        """
        state = [
            {key: value.detach().to("cpu").clone() for key, value in self.optimizer.state.get(p, {}).items()}
            for p in self.params
        ]
        return {"step_count": self.step_count, "state": state}

    def load_state_dict(self, state: dict, where: str = "optimizer state") -> None:
        """Restore `state_dict()` output exactly; moment tensors go to their parameter's device."""
        count, per_param = state.get("step_count"), state.get("state")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{where}: step_count={count!r} must be an integer ≥ 0")
        if not isinstance(per_param, list) or len(per_param) != len(self.params):
            got = len(per_param) if isinstance(per_param, list) else per_param
            raise ValueError(f"{where}: holds state for {got} parameters, this job has {len(self.params)}")
        restored = {}
        for i, (param, saved) in enumerate(zip(self.params, per_param)):
            restored[param] = {key: self._placed(param, key, value, f"{where}: parameter #{i} '{key}'")
                               for key, value in saved.items()}
        self.optimizer.state.clear()
        self.optimizer.state.update({p: s for p, s in restored.items() if s})
        self.step_count = count

    def _placed(self, param: torch.nn.Parameter, key: str, value: torch.Tensor, where: str) -> torch.Tensor:
        # AdamW keeps `step` as a float tensor, on the CPU for foreach and beside the parameter when fused; the
        # moments live beside the parameter.
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: expected a tensor, got {type(value).__name__}")
        if key == "step":
            return value.detach().to(param.device if self.fused else "cpu", torch.float32).clone()
        if value.shape != param.shape:
            raise ValueError(f"{where}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        return value.detach().to(param.device, param.dtype).clone()
