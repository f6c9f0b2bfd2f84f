"""1F1B pipeline simulator: makespan and bubble fraction of a microbatch stream on S stages.

Each stage runs the non-interleaved 1F1B order over the whole stream without a flush between
optimizer steps: stage s does min(S - 1 - s, M) warm-up forwards, then alternates one forward and one
backward, then drains the backwards. An op starts when its stage is free and its inputs exist:

    F(i, s) after F(i, s - 1)                    (activations from the previous stage)
    B(i, s) after B(i, s + 1), and after F(i, S - 1) on the last stage
    F(i, s) after B(k, s) for every job j in microbatch i whose previous global batch ended in
            microbatch k (j's optimizer step on stage s needs that backward; the step itself is free)

Bubble fraction of a stage: its idle time between the start of its first op and the end of its last
op, over that span (what a stage's own timestamps measure). `bubble_fraction` is the mean over stages,
`max_bubble_fraction` the worst stage. A no-op microbatch keeps its place in the order at zero cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.cost import CostModel
from scheduler.problem import Job, Microbatch, batch_spans, padded_size

__all__ = ["Simulation", "simulate_1f1b", "simulate_plan", "stage_order", "microbatch_lengths",
           "microbatch_padded_tokens", "token_imbalance"]


@dataclass
class Simulation:
    """Result of `simulate_1f1b`; times in the unit of the costs given."""

    makespan: float
    """End of the last op on any stage (the stream starts at 0)."""
    bubble_fraction: float
    """Mean over stages of idle time / (last end - first start) of that stage."""
    max_bubble_fraction: float
    """The same for the stage with the most idle time."""
    stage_busy: list[float]
    """Sum of op times of each stage."""
    stage_span: list[float]
    """Last end - first start of each stage."""


def stage_order(num_microbatches: int, stages: int, stage: int) -> list[tuple[str, int]]:
    """The 1F1B op order of `stage`: ("F", i) and ("B", i) for microbatch i."""
    warmup = min(stages - 1 - stage, num_microbatches)
    order = [("F", i) for i in range(warmup)]
    for t in range(num_microbatches - warmup):
        order += [("F", warmup + t), ("B", t)]
    order += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
    return order


def _step_dependencies(microbatches: list[Microbatch]) -> list[list[int]]:
    """deps[i]: microbatches whose backward must finish before microbatch i's forward (optimizer steps)."""
    last = {key: end for key, (_, end) in batch_spans(microbatches).items()}
    deps: list[list[int]] = []
    for i, mb in enumerate(microbatches):
        before = {last[(job, g - 1)] for job, g, _ in mb.samples if (job, g - 1) in last}
        deps.append(sorted(k for k in before if k < i))
    return deps


def _check_costs(name: str, costs: list[float], count: int) -> None:
    if len(costs) != count:
        raise ValueError(f"{name} has {len(costs)} entries for {count} microbatches; give one per microbatch")
    for i, c in enumerate(costs):
        if not c >= 0:
            raise ValueError(f"{name}[{i}]={c!r} must be a time ≥ 0")


def simulate_1f1b(
    microbatches: list[Microbatch], fwd_cost: list[float], bwd_cost: list[float], stages: int
) -> Simulation:
    """Simulate the 1F1B schedule of `microbatches` on `stages` stages.

    fwd_cost[i], bwd_cost[i]: time of microbatch i's forward / backward on one stage (the model split
    into equal stages: a whole-model time divided by `stages`). Raises ValueError when the stream puts a
    job's next global batch too close to its previous one for this many stages (the fixed 1F1B order
    would wait forever for the optimizer step; `verify` with pipeline_depth ≥ stages rules this out).
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages={stages!r} must be a positive integer (pipeline stages)")
    count = len(microbatches)
    _check_costs("fwd_cost", fwd_cost, count)
    _check_costs("bwd_cost", bwd_cost, count)
    deps = _step_dependencies(microbatches)
    orders = [stage_order(count, stages, s) for s in range(stages)]
    end: dict[tuple[str, int, int], float] = {}  # (op, microbatch, stage) -> end time
    heads, free = [0] * stages, [0.0] * stages
    first_start: list[float | None] = [None] * stages
    done, total = 0, sum(map(len, orders))
    while done < total:
        progressed = False
        for s in range(stages):
            while heads[s] < len(orders[s]):
                op, i = orders[s][heads[s]]
                inputs = _inputs(op, i, s, stages, deps)
                if any(key not in end for key in inputs):
                    break
                start = max([free[s]] + [end[key] for key in inputs])
                free[s] = end[(op, i, s)] = start + (fwd_cost[i] if op == "F" else bwd_cost[i])
                if first_start[s] is None:
                    first_start[s] = start
                heads[s] += 1
                done += 1
                progressed = True
        if not progressed:
            raise ValueError(_deadlock_message(orders, heads, deps, stages))
    busy = [sum(fwd_cost) + sum(bwd_cost)] * stages
    span = [free[s] - (first_start[s] or 0.0) for s in range(stages)]
    bubbles = [max(0.0, 1.0 - b / t) if t > 0 else 0.0 for b, t in zip(busy, span)]  # max: float rounding
    return Simulation(makespan=max(free, default=0.0), bubble_fraction=sum(bubbles) / stages,
                      max_bubble_fraction=max(bubbles), stage_busy=busy, stage_span=span)


def _inputs(op: str, i: int, s: int, stages: int, deps: list[list[int]]) -> list[tuple[str, int, int]]:
    if op == "F":
        return ([("F", i, s - 1)] if s > 0 else []) + [("B", k, s) for k in deps[i]]
    return [("B", i, s + 1)] if s < stages - 1 else [("F", i, s)]


def _deadlock_message(orders: list[list[tuple[str, int]]], heads: list[int], deps: list[list[int]],
                      stages: int) -> str:
    s = next(s for s in range(stages) if heads[s] < len(orders[s]))
    op, i = orders[s][heads[s]]
    return (f"1F1B with {stages} stages cannot run this stream: stage {s} waits at {op}({i}), whose optimizer "
            f"step dependencies {deps[i]} come later in its order; plan with pipeline_depth ≥ {stages}")


def microbatch_lengths(microbatches: list[Microbatch], jobs: list[Job]) -> list[list[int]]:
    """Sample lengths of each microbatch ([] for a no-op); sample refs carry absolute global batches."""
    by_name = {job.name: job for job in jobs}
    return [[by_name[job].global_batches[g - by_name[job].first_global_batch][i] for job, g, i in mb.samples]
            for mb in microbatches]


def microbatch_padded_tokens(microbatches: list[Microbatch], lengths: list[list[int]], pad_multiple: int) -> list[int]:
    """Padded tokens of each microbatch (0 for a no-op): each job's tokens rounded up to pad_multiple, then
    summed; `lengths` are the microbatches' sample lengths (`microbatch_lengths`)."""
    padded = []
    for mb, mb_lengths in zip(microbatches, lengths):
        tokens: dict[str, int] = {}
        for (job, _, _), n in zip(mb.samples, mb_lengths):
            tokens[job] = tokens.get(job, 0) + n
        padded.append(padded_size(tokens, pad_multiple))
    return padded


def token_imbalance(lengths: list[list[int]]) -> float:
    """Max over mean of the real tokens of the non-empty microbatches (1.0 = perfectly even)."""
    tokens = [sum(mb) for mb in lengths if mb]
    return max(tokens) * len(tokens) / sum(tokens) if tokens else 1.0


def simulate_plan(
    microbatches: list[Microbatch], jobs: list[Job], cost_model: CostModel, stages: int, pad_multiple: int = 1,
    backward_ratio: float = 2.0,
) -> Simulation:
    """`simulate_1f1b` with costs from `cost_model` (padded tokens per job), split evenly over the stages;
    a backward costs `backward_ratio` forwards (2: the input and the adapter gradients)."""
    lengths = microbatch_lengths(microbatches, jobs)
    padded = microbatch_padded_tokens(microbatches, lengths, pad_multiple)
    fwd = [cost_model.cost(mb_lengths, p) / stages for mb_lengths, p in zip(lengths, padded)]
    return simulate_1f1b(microbatches, fwd, [backward_ratio * f for f in fwd], stages)
