"""Federated LoRA: the jobs of one `JobSpec.federation.group` are its clients; every `aggregate_every_steps` of
their optimizer steps (and after the last) the runtime combines their adapters as `method` says, and every client
continues from the result.

This module holds the config, the checks across a group's clients and the aggregation maths as pure functions on
one adapted module's tensors (the runtime applies them on every pipeline stage to that stage's layers,
runtime/federation.py). Row convention as everywhere: A [r, K], B [N, r], ΔW = s·B A; p_k are the clients'
normalised weights.

- fedavg (FedIT): Ā = Σ p_k A_k, B̄ = Σ p_k B_k.
- flora (FLoRA, Wang et al. 2024): the stack A = cat_k(p_k A_k), B = cat_k(s_k B_k) (rank Σ r_k, scale 1) gives
  exactly ΔW = Σ p_k s_k B_k A_k; it is folded into a frozen offset the clients add (the paper merges it into
  the base weight, which we never modify), and each client restarts from a fresh adapter.
- fedsb (Fed-SB, Singhal et al. 2025): LoRA-SB clients share A and B, so R̄ = Σ p_k R_k is exact:
  s·B R̄ A = Σ p_k s·B R_k A.
- lorafair (LoRA-FAIR, Bian et al. 2025): Ā, B̄ as fedavg, plus the correction ΔB that minimises
  ‖(B̄ + ΔB)Ā − Σ p_k B_k A_k‖² + λ‖ΔB‖² (the paper's residual with its λ‖ΔB‖ term; the exact solver is our
  [GUESS], see docs/variants.md).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lorafusion.adapters.lora import kaiming_a
from lorafusion.validation import is_number

__all__ = ["METHODS", "FederationConfig", "check_groups", "client_weights", "fedavg", "flora_stack", "fedsb_mean",
           "lorafair", "flora_reinit_a", "LORAFAIR_RIDGE"]

METHODS = ("fedavg", "flora", "fedsb", "lorafair")
# Adapter types each method aggregates: fedavg, lorafair and flora combine plain factors; Fed-SB needs LoRA-SB's R.
_METHOD_TYPES = {"fedavg": ("lora", "rslora"), "flora": ("lora", "rslora"), "lorafair": ("lora", "rslora"),
                 "fedsb": ("lorasb",)}
_GROUP = re.compile(r"^[A-Za-z0-9_.-]+$")

LORAFAIR_RIDGE = 1e-6
"""λ of LoRA-FAIR's correction, relative to the mean eigenvalue of ĀĀᵀ (λ = LORAFAIR_RIDGE·tr(ĀĀᵀ)/r): large
enough that a rank-deficient Ā (clients that all started from one A and barely moved) gives a finite ΔB, small
enough that the solution is the least-squares one to fp32 precision otherwise."""


@dataclass(kw_only=True)
class FederationConfig:
    """`JobSpec.federation`: this job is one client of a federated group."""

    group: str
    """Name of the group, [A-Za-z0-9_.-]; its aggregated adapter is written to <output_dir>/<group>/adapter."""
    aggregate_every_steps: int
    """Optimizer steps of local training between aggregations (a round); the last round may be shorter (the
    clients are also aggregated after their last step). Every client of a group gives the same value."""
    method: str = "fedavg"
    """'fedavg' (FedIT), 'flora' (stacking), 'fedsb' (Fed-SB, lorasb clients) or 'lorafair' (residual-corrected
    averaging); every client of a group gives the same method."""
    weight: float | None = None
    """This client's aggregation weight (> 0; the group's weights are normalised to sum to 1). Default: the
    client's training sample count n_k, as FedIT and FLoRA weigh clients; for 'fedsb' equal weights, as Fed-SB's
    mean. Give it on every client of a group or on none."""

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not _GROUP.match(self.group) or set(self.group) == {"."}:
            raise ValueError(f"federation.group={self.group!r} is invalid; use letters, digits, '_', '.', '-' "
                             "(e.g. group: hospitals)")
        every = self.aggregate_every_steps
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"federation.aggregate_every_steps={every!r} must be a positive integer (local steps per "
                             "round), e.g. aggregate_every_steps: 10")
        if self.method not in METHODS:
            raise ValueError(f"federation.method={self.method!r}; choose one of {list(METHODS)}")
        if self.weight is not None and (not is_number(self.weight) or self.weight <= 0):
            raise ValueError(f"federation.weight={self.weight!r} must be a finite number > 0, or null for the "
                             "method's default (the client's sample count; equal weights for fedsb)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_groups(jobs: list) -> dict[str, list]:
    """The federated groups of `jobs` (JobSpec list): group -> its clients, in job order. ValueError naming the job
    and field when a group has one client, its clients disagree on the round or method, mix weights and
    defaults, or hold adapters the method cannot combine."""
    groups: dict[str, list] = {}
    for job in jobs:
        if job.federation is not None:
            groups.setdefault(job.federation.group, []).append(job)
    names = {job.name for job in jobs}
    for group, clients in groups.items():
        first = clients[0]
        if group in names:
            raise ValueError(f"job '{first.name}': federation.group={group!r} is also a job's name, and both would "
                             f"write <output_dir>/{group}/adapter; rename the group")
        if len(clients) < 2:
            raise ValueError(f"job '{first.name}': federation.group={group!r} has only this one client; a group needs "
                             "at least two jobs with the same federation.group (or remove `federation`)")
        for job in clients[1:]:
            for name in ("aggregate_every_steps", "method"):
                mine, theirs = getattr(job.federation, name), getattr(first.federation, name)
                if mine != theirs:
                    raise ValueError(f"job '{job.name}': federation.{name}={mine!r} but job '{first.name}' of group "
                                     f"'{group}' has {theirs!r}; every client of a group uses the same {name}")
        given = [job.federation.weight is not None for job in clients]
        if any(given) and not all(given):
            job = clients[given.index(False)]
            raise ValueError(f"job '{job.name}': federation.weight=None but other clients of group '{group}' give "
                             "one; give a weight on every client of the group or on none")
        for job in clients:
            _check_adapter(job, first, group)
    return groups


def _check_adapter(job, first, group: str) -> None:
    """The client's adapter can be combined with the group's first client's under the group's method."""
    method, adapter = first.federation.method, job.adapter
    owner = f"job '{job.name}'"
    if adapter.type not in _METHOD_TYPES[method]:
        raise ValueError(f"{owner}: federation.method={method!r} aggregates {list(_METHOD_TYPES[method])} adapters, "
                         f"but this job's adapter.type is {adapter.type!r}; change the adapter or the method")
    if adapter.type != first.adapter.type or adapter.target_modules != first.adapter.target_modules:
        raise ValueError(f"{owner}: adapter ({adapter.type}, {adapter.target_modules}) differs from job "
                         f"'{first.name}' of group '{group}' ({first.adapter.type}, {first.adapter.target_modules}); "
                         "every client of a group adapts the same modules with the same adapter type")
    if method == "flora":
        if adapter.dropout != 0:
            raise ValueError(f"{owner}: adapter.dropout={adapter.dropout} with federation.method='flora'; FLoRA folds "
                             "each round into an offset that must see the undropped input, as the paper's merged "
                             "weight does: set adapter.dropout: 0")
        return
    mine, theirs = adapter.to_dict(), first.adapter.to_dict()
    differ = sorted(k for k in mine if k != "dropout" and mine[k] != theirs.get(k))
    if differ:
        raise ValueError(f"{owner}: adapter differs from job '{first.name}' of group '{group}' in {differ} (this "
                         f"job: {[mine[k] for k in differ]}, theirs: {[theirs.get(k) for k in differ]}); "
                         f"federation.method={method!r} averages factors of one shape, so the clients need the same "
                         "adapter config (only 'flora' stacks different ranks)")


def client_weights(method: str, given: list[float | None], samples: list[int]) -> list[float]:
    """p_k of the clients: their `weight`s, else their sample counts (fedsb: equal), normalised to sum to 1."""
    if all(w is not None for w in given):
        raw = [float(w) for w in given]
    elif method == "fedsb":
        raw = [1.0] * len(given)
    else:
        raw = [float(n) for n in samples]
    total = sum(raw)
    return [w / total for w in raw]


def fedavg(a: list[torch.Tensor], b: list[torch.Tensor], p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FedIT: (Ā [r, K], B̄ [N, r]) = (Σ p_k A_k, Σ p_k B_k)."""
    return sum(w * x for w, x in zip(p, a)), sum(w * x for w, x in zip(p, b))


def flora_stack(a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float],
                p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stack at scale 1: A [Σr_k, K] = cat_k(p_k A_k), B [N, Σr_k] = cat_k(s_k B_k), so that
    B A = Σ p_k s_k B_k A_k exactly (only A carries p_k, as the authors' code weighs it)."""
    return torch.cat([w * x for w, x in zip(p, a)]), torch.cat([s * x for s, x in zip(scales, b)], dim=1)


def fedsb_mean(r: list[torch.Tensor], p: list[float]) -> torch.Tensor:
    """Fed-SB: R̄ [r, r] = Σ p_k R_k (exact for clients that share A and B)."""
    return sum(w * x for w, x in zip(p, r))


def lorafair(a: list[torch.Tensor], b: list[torch.Tensor], p: list[float],
             ridge: float = LORAFAIR_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-FAIR: (Ā [r, K], B̄' [N, r]) with B̄' = B̄ + ΔB, ΔB = argmin ‖(B̄ + ΔB)Ā − Σ p_k B_k A_k‖² + λ‖ΔB‖²
    = E Āᵀ (ĀĀᵀ + λI)⁻¹ with E = Σ p_k B_k A_k − B̄Ā. E Āᵀ is formed from the factors (Σ p_k B_k (A_k Āᵀ) − B̄ ĀĀᵀ),
    never as a dense [N, K]. ΔB = 0 is a candidate, so B̄'Ā is never further from the ideal than FedIT's B̄Ā."""
    a_bar, b_bar = fedavg(a, b, p)
    a64, b64 = a_bar.double(), b_bar.double()
    gram = a64 @ a64.t()  # [r, r]
    e_at = sum(w * (bk.double() @ (ak.double() @ a64.t())) for w, ak, bk in zip(p, a, b)) - b64 @ gram  # [N, r]
    lam = ridge * float(torch.trace(gram)) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    delta = torch.linalg.solve(gram + lam * eye, e_at.t()).t()  # [N, r]; (ĀĀᵀ + λI) is symmetric
    return a_bar, (b64 + delta).to(b_bar.dtype)


def flora_reinit_a(seed: int, round_step: int, layer_index: int, target: str, rank: int,
                   in_features: int) -> torch.Tensor:
    """A client's fresh A [rank, K] after the round that ended at its step `round_step`: Kaiming-uniform (PEFT's
    LoRA init) from a generator seeded by (job seed, round, global layer, module), so every stage and replica
    draws the same and a resumed run draws it again; B restarts at zero."""
    digest = hashlib.sha256(f"flora/{seed}/{round_step}/{layer_index}/{target}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return kaiming_a(rank, in_features, generator)

