"""AdamW on every trainable tensor of the job (`optimizer: {type: adamw}`, the default)."""

from __future__ import annotations

import torch

from lorafusion.config import JobSpec
from runtime.optim.base import JobOptimizer

__all__ = ["AdamWOptimizer"]


class AdamWOptimizer(JobOptimizer):
    """torch's AdamW with the job's adam_betas, adam_eps and weight_decay.

    The step runs over all the job's tensors at once: torch's fused AdamW on CUDA, its foreach (multi-tensor)
    AdamW elsewhere, so its cost does not grow with one kernel launch per parameter."""

    def __init__(self, spec: JobSpec, params: list[torch.nn.Parameter], total_steps: int) -> None:
        super().__init__(spec, params, total_steps)
        self.fused = bool(params) and params[0].device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=spec.learning_rate, betas=spec.adam_betas, eps=spec.adam_eps,
            weight_decay=spec.weight_decay, **({"fused": True} if self.fused else {"foreach": True}),
        )

    def _update(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def state_bytes(self) -> int:
        """Two moments per parameter (exp_avg, exp_avg_sq), whether or not the first step has made them yet."""
        return sum(2 * p.numel() * p.element_size() for p in self.params)

    def reset_state(self, params: list[torch.nn.Parameter]) -> None:
        for param in params:
            self.optimizer.state.pop(param, None)

    def _param_states(self) -> list[dict[str, torch.Tensor]]:
        return [self.optimizer.state.get(p, {}) for p in self.params]

    def _load_param_states(self, per_param: list[dict[str, torch.Tensor]], where: str) -> None:
        restored = {}
        for i, (param, saved) in enumerate(zip(self.params, per_param)):
            restored[param] = {key: self._placed(param, key, value, f"{where}: parameter #{i} '{key}'")
                               for key, value in saved.items()}
        self.optimizer.state.clear()
        self.optimizer.state.update({p: s for p, s in restored.items() if s})

    def _placed(self, param: torch.nn.Parameter, key: str, value: torch.Tensor, where: str) -> torch.Tensor:
        # AdamW keeps `step` as a float tensor, on the CPU for foreach and beside the parameter when fused; the
        # moments live beside the parameter.
        if key == "step":
            return value.detach().to(param.device if self.fused else "cpu", torch.float32).clone()
        if value.shape != param.shape:
            raise ValueError(f"{where}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        return value.detach().to(param.device, param.dtype).clone()
