"""Federated groups in a fit: the driver's round bookkeeping (`Federation`) and the per-stage aggregation
(`aggregate_on_stage`), which applies lorafusion.federation's maths to the clients' layers a stage holds.

Rounds. A client's round ends at each multiple of its group's `aggregate_every_steps` and at its last step (the
group's clients have the same step count). The driver plans a client no further than its round's end, drains the
pipeline when one reaches it (as for a checkpoint), and holds it there until every live client of its group is
there too; then every actor aggregates the group's layers it holds, before any evaluation or checkpoint of that
drain. A checkpoint keeps each group's last aggregated round (`Federation.done`), not only the clients' steps: one
written when a client had just failed while its partner waited at a round's end (Ctrl-C before the next drain)
holds that round unaggregated, and the resumed fit aggregates the partner alone as the uninterrupted one would. The
tensors (FLoRA's folded offset, the clients' adapters, their reset optimizer moments) are the clients' own
checkpointed state.

Every actor holds identical client tensors (replicas: the same steps; stages: their own layers), and the
aggregation is deterministic, so actors agree without exchanging anything.

Optimizer moments. The papers' code (FedIT/Shepherd, FLoRA, Fed-SB) builds a fresh optimizer for every client in
every round, so after an aggregation each client's AdamW moments and bias-correction counts start again; its
learning-rate schedule goes on over its whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafusion.adapters.attach import SITES
from lorafusion.adapters.lora import LoRAConfig
from lorafusion.adapters.multi import job_key
from lorafusion.adapter_io import write_peft_adapter
from lorafusion.federation import (
    check_groups, client_weights, fedavg, fedsb_mean, flora_reinit_a, flora_stack, lorafair,
)

__all__ = ["GroupRound", "Federation", "aggregate_on_stage", "init_pass_sets", "restore_folds", "folded_state_dict"]


@dataclass(frozen=True)
class GroupRound:
    """One aggregation, identical for every actor."""

    group: str
    method: str
    clients: list[str]
    """The group's live clients (a failed one no longer counts)."""
    weights: list[float]
    """Their p_k, normalised over `clients`."""
    step: int
    """The clients' step count at the round's end (seeds FLoRA's re-initialisation)."""


class Federation:
    """The driver's view of a fit's federated groups: when each client's round ends, which groups are due."""

    def __init__(self, prepared_jobs: list) -> None:
        jobs = {job.name: job for job in prepared_jobs}
        groups = check_groups([j.spec for j in prepared_jobs])
        self.groups = {g: [c.name for c in clients] for g, clients in groups.items()}
        self.specs = {name: jobs[name].spec for clients in self.groups.values() for name in clients}
        self.samples = {name: len(jobs[name].samples) for name in self.specs}
        self.done = dict.fromkeys(self.groups, 0)  # group -> step count of its last aggregated round
        for group, clients in self.groups.items():
            first = jobs[clients[0]]
            for name in clients[1:]:
                if jobs[name].total_steps != first.total_steps:
                    raise ValueError(
                        f"job '{name}': trains {jobs[name].total_steps} steps but job '{first.name}' of federated "
                        f"group '{group}' trains {first.total_steps}; the clients of a group run the same rounds, so "
                        f"give them the same max_steps (e.g. max_steps: {first.total_steps})")

    def every(self, job: str) -> int | None:
        spec = self.specs.get(job)
        return spec.federation.aggregate_every_steps if spec is not None else None

    def group_of(self, job: str) -> str | None:
        spec = self.specs.get(job)
        return spec.federation.group if spec is not None else None

    @staticmethod
    def ends_round(step: int, every: int, total: int) -> bool:
        return step > 0 and (step % every == 0 or step == total)

    def restore(self, states: dict, saved: dict[str, int] | None = None) -> None:
        """Each group's last aggregated round: `saved`, a checkpoint's record of it, when given; else (a fresh fit,
        or a checkpoint of an older lorafusion) from its clients' steps (`states`: job -> fit._JobState), the last
        round end its slowest live client reached."""
        if saved is not None:
            self.done.update(saved)
            return
        for group, clients in self.groups.items():
            live = [states[c] for c in clients if states[c].error is None]
            if not live:
                continue
            slowest = min(s.step for s in live)
            every, total = self.every(clients[0]), live[0].job.total_steps
            ends = [s for s in (slowest - slowest % every, slowest) if self.ends_round(s, every, total)]
            self.done[group] = max(ends, default=0)

    def due(self, states: dict) -> list[GroupRound]:
        """The groups whose live clients have all finished the same unaggregated round (after a drain, every
        planned step done); each is marked aggregated."""
        rounds = []
        for group, clients in self.groups.items():
            live = [c for c in clients if states[c].error is None]
            steps = {states[c].step for c in live}
            if len(steps) != 1:
                continue
            step = steps.pop()
            total = states[live[0]].job.total_steps
            if step <= self.done[group] or not self.ends_round(step, self.every(live[0]), total):
                continue
            spec = self.specs[live[0]].federation
            weights = client_weights(spec.method, [self.specs[c].federation.weight for c in live],
                                     [self.samples[c] for c in live])
            rounds.append(GroupRound(group=group, method=spec.method, clients=live, weights=weights, step=step))
            self.done[group] = step
        return rounds

    def write_exports(self, output_dir: str, states: dict, stage_group, base_model: str) -> dict[str, str]:
        """Each group's aggregated adapter in PEFT format at <output_dir>/<group>/adapter (group -> path): the
        adapter its clients hold after the last round (FLoRA: the stack of every round, as a rank-Σ LoRA at
        scale 1; Fed-SB: LoRA-SB's export). A group with no live client writes nothing."""
        paths = {}
        for group, clients in self.groups.items():
            live = [c for c in clients if states[c].error is None]
            if not live:
                continue
            config, tensors = self.export(live[0], stage_group)
            paths[group] = str(write_peft_adapter(Path(output_dir) / group / "adapter", tensors, config,
                                                  base_model=base_model))
        return paths

    def job_adapter(self, spec, stage_group) -> tuple:
        """(adapter config, PEFT tensors) a job exports: a FLoRA client its group's (after its last round it holds
        only the folded stack, its own B being zero), every other job its own adapter."""
        if spec.federation is not None and spec.federation.method == "flora":
            return self.export(spec.name, stage_group)
        return spec.adapter, stage_group.peft_state_dict(spec.name)

    def export(self, client: str, stage_group) -> tuple:
        """(adapter config, PEFT tensors) of the group adapter, read from one live client."""
        spec = self.specs[client]
        if spec.federation.method != "flora":
            return spec.adapter.export_config(), stage_group.peft_state_dict(client)
        tensors = stage_group.folded_state_dict(client)
        rank = next(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
        return LoRAConfig(rank=rank, alpha=float(rank), target_modules=list(spec.adapter.target_modules)), tensors


def _client_layers(adapters, job: str) -> dict[tuple[int, str], torch.nn.Module]:
    """(global layer, target) -> the job's adapter layer, for the layers this stage holds."""
    key = job_key(job)
    return {(index, target): sites[SITES[target][1]].adapters[key][target]
            for index, sites in sorted(adapters.layers.items()) for target in adapters.configs[job].target_modules}


@torch.no_grad()
def aggregate_on_stage(worker, rnd: GroupRound) -> None:
    """Aggregate the group's clients on this stage's layers, put the result into every client, restart their
    optimizer moments, and drop their cached factors."""
    present = [(c, w) for c, w in zip(rnd.clients, rnd.weights) if c in worker.optimizers]
    if not present:
        return
    clients = [c for c, _ in present]
    total = sum(w for _, w in present)
    p = [w / total for _, w in present]
    layers = {c: _client_layers(worker.adapters, c) for c in clients}
    for where in layers[clients[0]]:
        mine = [layers[c][where] for c in clients]
        if rnd.method == "flora":
            _flora(mine, p, [worker.optimizers[c].spec.seed for c in clients], rnd.step, *where)
        elif rnd.method == "fedsb":
            r = fedsb_mean([layer.lorasb_R for layer in mine], p)
            for layer in mine:
                layer.lorasb_R.copy_(r)
        else:
            combine = fedavg if rnd.method == "fedavg" else lorafair
            a, b = combine([layer.lora_A for layer in mine], [layer.lora_B for layer in mine], p)
            for layer in mine:
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
    for c in clients:
        optimizer = worker.optimizers[c]
        optimizer.reset_state(optimizer.params)  # AdamW's moments, or LoRA-Pro's / AltLoRA's state
        worker.adapters.drop_factors(c)


def _flora(layers: list, p: list[float], seeds: list[int], step: int, index: int, target: str) -> None:
    """Fold the round's stack into each client's frozen offset (in its own scale) and restart its A, B."""
    scales = [layer.config.scaling for layer in layers]
    a_stack, b_stack = flora_stack([layer.lora_A for layer in layers], [layer.lora_B for layer in layers], scales, p)
    for layer, scale, seed in zip(layers, scales, seeds):
        a_old, b_old = _fold(layer)
        layer.set_fold(torch.cat([a_old, a_stack]), torch.cat([b_old, b_stack / scale], dim=1))
        layer.lora_A.copy_(flora_reinit_a(seed, step, index, target, layer.config.rank, layer.in_features))
        layer.lora_B.zero_()


def _fold(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's folded offset (a [m, K], b [N, m] in its scale), empty (m = 0) before the first round."""
    if getattr(layer, "lora_A_fold", None) is not None:
        return layer.lora_A_fold, layer.lora_B_fold
    return layer.lora_A.new_zeros(0, layer.in_features), layer.lora_B.new_zeros(layer.out_features, 0)


def init_pass_sets(worker, jobs: list[str]) -> list[list[str]]:
    """The live `jobs` (those with a gradient init pass) in sets that share one init: the clients of a Fed-SB group
    together, so their A and B are the same (their init pass takes the gradient of all their first batches: the
    group's data, as one federated gradient round would give the server), every other job alone."""
    sets: dict[str, list[str]] = {}
    for job in jobs:
        if job not in worker.optimizers:
            continue
        federation = worker.optimizers[job].spec.federation
        shared = federation is not None and federation.method == "fedsb"
        sets.setdefault(f"group {federation.group}" if shared else f"job {job}", []).append(job)
    return list(sets.values())


def restore_folds(adapters, job: str, saved: dict[str, torch.Tensor]) -> None:
    """Give the job's layers the folded offsets a checkpoint holds (`saved`: job_state's params), with the saved
    shapes (they grow by a round's stack each round), before its parameters are loaded."""
    for (index, target), layer in _client_layers(adapters, job).items():
        name = f"layers.{index}.{target}.lora_A_fold"
        if name in saved:
            device = layer.lora_A.device
            layer.set_fold(saved[name].to(device), saved[f"layers.{index}.{target}.lora_B_fold"].to(device))


def folded_state_dict(adapters, job: str) -> dict[str, torch.Tensor]:
    """A FLoRA client's folded offset on this stage's layers as PEFT LoRA tensors at scale 1 (b times the
    client's scale): what its group exports."""
    tensors = {}
    for (index, target), layer in _client_layers(adapters, job).items():
        a, b = _fold(layer)
        module = f"base_model.model.model.layers.{index}.{SITES[target][2]}.{target}"
        tensors[f"{module}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{module}.lora_B.weight"] = (b.detach().float() * layer.config.scaling).cpu().contiguous()
    return tensors
