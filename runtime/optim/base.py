"""What every per-job optimizer shares: the LR schedule (lorafusion/schedule.py), the job's own gradient norm and
clipping, the step counter, and checkpointable state held per parameter.

A job has one optimizer per pipeline stage (and replica), over the job's parameters that stage holds. The stage
runner sums the squared norm over the stages (`grad_norm_sq`), then calls `step(total_norm)`: the raw gradients
are clipped to the job's max_grad_norm first, so clipping means the same for every method (it bounds what enters
its moments), and then the method updates the parameters (`_update`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafusion.config import JobSpec
from lorafusion.schedule import lr_at

__all__ = ["JobOptimizer", "FactorPair", "FactorGroup", "FactorOptimizer"]


class JobOptimizer:
    """One job's optimizer over its parameters on one stage; the gradient norm is the job's own (never mixed with
    other jobs'). Subclasses implement `_update(lr)` and the per-parameter state (`_param_states`,
    `_load_param_states`)."""

    def __init__(self, spec: JobSpec, params: list[torch.nn.Parameter], total_steps: int) -> None:
        self.spec, self.params, self.total_steps = spec, params, total_steps
        self.step_count = 0

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
        """Clip the raw gradients to max_grad_norm using `total_norm`, apply one step of the method, drop the
        gradients; returns the LR."""
        lr = lr_at(self.spec, self.step_count, self.total_steps)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.spec.max_grad_norm is not None and total_norm > self.spec.max_grad_norm and grads:
            torch._foreach_mul_(grads, self.spec.max_grad_norm / (total_norm + 1e-6))
        self._update(lr)
        for p in self.params:
            p.grad = None
        self.step_count += 1
        return lr

    def _update(self, lr: float) -> None:
        """Move the parameters by one step at learning rate `lr` from their (clipped) .grad."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of optimizer state this stage holds for the job once it has stepped (for the run's memory report)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """{"step_count", "state": one {key: tensor} per parameter (order of `params`)}, tensors cloned to CPU.

        The LR schedule position is `step_count`; the hyper-parameters come from the JobSpec.
        """
        state = [{key: value.detach().to("cpu").clone() for key, value in per_param.items()}
                 for per_param in self._param_states()]
        return {"step_count": self.step_count, "state": state}

    def load_state_dict(self, state: dict, where: str = "optimizer state") -> None:
        """Restore `state_dict()` output exactly; state tensors go to their parameter's device."""
        count, per_param = state.get("step_count"), state.get("state")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{where}: step_count={count!r} must be an integer ≥ 0")
        if not isinstance(per_param, list) or len(per_param) != len(self.params):
            got = len(per_param) if isinstance(per_param, list) else per_param
            raise ValueError(f"{where}: holds state for {got} parameters, this job has {len(self.params)}")
        for i, saved in enumerate(per_param):
            for key, value in saved.items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{where}: parameter #{i} '{key}': expected a tensor, got {type(value).__name__}")
        self._load_param_states(per_param, where)
        self.step_count = count

    def reset_state(self, params: list[torch.nn.Parameter]) -> None:
        """Forget the state of `params` (a variant re-factorised them, e.g. LoRA-Squeeze's annealing): their next
        step is a first step. The job's LR schedule position (step_count) is unchanged."""
        raise NotImplementedError

    def _param_states(self) -> list[dict[str, torch.Tensor]]:
        """The live state of each parameter, in the order of `params` ({} for a parameter without state)."""
        raise NotImplementedError

    def _load_param_states(self, per_param: list[dict[str, torch.Tensor]], where: str) -> None:
        """Replace the state by `per_param` (as `_param_states` gives it; tensors checked to be tensors)."""
        raise NotImplementedError


@dataclass
class FactorPair:
    """One module's LoRA factors and the state a factor method keeps for them (fp32, beside the parameters)."""

    a: torch.nn.Parameter
    """A [r, K]."""
    b: torch.nn.Parameter
    """B [N, r]."""
    state_a: dict[str, torch.Tensor] = field(default_factory=dict)
    """State checkpointed under A's name."""
    state_b: dict[str, torch.Tensor] = field(default_factory=dict)
    """State checkpointed under B's name."""

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_A [r, K], g_B [N, r]); zeros for a factor without a gradient."""
        return (self.a.grad if self.a.grad is not None else torch.zeros_like(self.a),
                self.b.grad if self.b.grad is not None else torch.zeros_like(self.b))


@dataclass
class FactorGroup:
    """The pairs of one shape, stepped together: their factors, gradients and state as batches over the pairs, so
    a step costs a fixed number of (batched) ops per shape, not per module. The state lives here, stacked
    [P, ...]; each pair's state dicts hold views of it (what is checkpointed per parameter)."""

    pairs: list[FactorPair]
    state_a: dict[str, torch.Tensor]
    """State kept under A's names, [P, ...]."""
    state_b: dict[str, torch.Tensor]
    """State kept under B's names, [P, ...]."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [P, r, K], B [P, N, r]): copies, outside autograd; `write_back` stores them."""
        with torch.no_grad():
            return torch.stack([p.a for p in self.pairs]), torch.stack([p.b for p in self.pairs])

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_A [P, r, K], g_B [P, N, r]); zeros for a factor without a gradient."""
        grads = [p.grads() for p in self.pairs]
        return torch.stack([g for g, _ in grads]), torch.stack([g for _, g in grads])

    def write_back(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Store the stepped A [P, r, K] and B [P, N, r] into the pairs' parameters (in place on the parameters
        themselves, not their .data, so their version counters move and packed copies of them are rebuilt)."""
        with torch.no_grad():
            torch._foreach_copy_([p.a for p in self.pairs] + [p.b for p in self.pairs],
                                 list(a.unbind(0)) + list(b.unbind(0)))


class FactorOptimizer(JobOptimizer):
    """A method that steps each module's (lora_A, lora_B) pair together (LoRA-Pro, AltLoRA), batched over the pairs
    of one shape (`FactorGroup`). Its state is allocated up front (zeros, which the methods' first steps treat as
    "no history"), so it is the same before and after a resume and `state_bytes` is what the job holds from its
    first step on."""

    def __init__(self, spec: JobSpec, named: dict[str, torch.nn.Parameter], total_steps: int) -> None:
        super().__init__(spec, list(named.values()), total_steps)
        self.pairs = _pair_factors(named, spec.name)
        self.scale = spec.adapter.scaling
        by_shape: dict[tuple, list[FactorPair]] = {}
        for pair in self.pairs:
            key = (tuple(pair.a.shape), tuple(pair.b.shape), pair.a.dtype, pair.a.device)
            by_shape.setdefault(key, []).append(pair)
        self.groups = [self._new_group(pairs) for pairs in by_shape.values()]
        self._state_of = {id(p.a): p.state_a for p in self.pairs} | {id(p.b): p.state_b for p in self.pairs}

    def _new_group(self, pairs: list[FactorPair]) -> FactorGroup:
        first_a, first_b = self._new_state(pairs[0])
        group = FactorGroup(pairs, {k: v.new_zeros(len(pairs), *v.shape) for k, v in first_a.items()},
                            {k: v.new_zeros(len(pairs), *v.shape) for k, v in first_b.items()})
        for i, pair in enumerate(pairs):
            pair.state_a = {k: v[i] for k, v in group.state_a.items()}
            pair.state_b = {k: v[i] for k, v in group.state_b.items()}
        return group

    def _new_state(self, pair: FactorPair) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Zero state for one pair: (kept under A's name, kept under B's name)."""
        raise NotImplementedError

    def _update(self, lr: float) -> None:
        for group in self.groups:
            self._step_group(group, lr)

    def _step_group(self, group: FactorGroup, lr: float) -> None:
        """One step of the method for every pair of `group`, from their (clipped) gradients."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self._param_states() for t in state.values())

    def reset_state(self, params: list[torch.nn.Parameter]) -> None:
        reset = {id(p) for p in params}
        with torch.no_grad():
            for pair in self.pairs:  # a pair's state is one history of both factors: reset together, to zeros
                if id(pair.a) in reset or id(pair.b) in reset:
                    for value in (*pair.state_a.values(), *pair.state_b.values()):
                        value.zero_()

    def _param_states(self) -> list[dict[str, torch.Tensor]]:
        return [self._state_of[id(p)] for p in self.params]

    def _load_param_states(self, per_param: list[dict[str, torch.Tensor]], where: str) -> None:
        for i, (live, saved) in enumerate(zip(self._param_states(), per_param)):
            if set(saved) != set(live):
                raise ValueError(f"{where}: parameter #{i} has state {sorted(saved)}, a {self.spec.optimizer.type} "
                                 f"optimizer keeps {sorted(live)}; the checkpoint is from another optimizer config")
            for key, value in saved.items():
                if value.shape != live[key].shape:
                    raise ValueError(f"{where}: parameter #{i} '{key}' has shape {tuple(value.shape)}, expected "
                                     f"{tuple(live[key].shape)}")
        with torch.no_grad():
            for live, saved in zip(self._param_states(), per_param):
                for key, value in saved.items():
                    live[key].copy_(value)


def _pair_factors(named: dict[str, torch.nn.Parameter], job: str) -> list[FactorPair]:
    """One FactorPair per module from the job's trainable parameters '<module>.lora_A' / '<module>.lora_B'."""
    pairs, unpaired = [], [name for name in named if not name.endswith((".lora_A", ".lora_B"))]
    for name, a in named.items():
        if name.endswith(".lora_A"):
            partner = name[: -len("lora_A")] + "lora_B"
            if partner not in named:
                unpaired.append(name)
                continue
            pairs.append(FactorPair(a=a, b=named[partner]))
    if unpaired or 2 * len(pairs) != len(named):
        raise ValueError(f"job '{job}': a factor optimizer steps (lora_A, lora_B) pairs, but the adapter also trains "
                         f"{sorted(set(unpaired)) or 'unpaired factors'}; use optimizer {{type: adamw}}")
    return pairs
