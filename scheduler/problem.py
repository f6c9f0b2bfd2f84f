"""Problem and plan dataclasses of the scheduler, in integer units (tokens, microbatch positions).

A job is the token lengths of the samples of its global batches. A plan is an ordered stream of
microbatches; a microbatch holds samples of several jobs, at most one global batch of each. Inside a
microbatch each job's tokens are padded up to a multiple of `pad_multiple` (kernel tile rows: one
tile never mixes two adapters), and the padded sum must fit `capacity_tokens`.
"""

from __future__ import annotations

import numbers
from collections import Counter
from dataclasses import dataclass, field

from scheduler.cost import CostBudget

__all__ = [
    "Job",
    "Microbatch",
    "Plan",
    "PlanStats",
    "SampleRef",
    "Item",
    "PackingProblem",
    "SolverParams",
    "Packing",
    "pad_up",
    "padded_size",
    "batch_spans",
    "waste_fraction",
    "validate_problem",
    "validate_limits",
    "positive_int",
    "packing_problem",
]

SampleRef = tuple[str, int, int]
"""(job name, global batch index, sample index within that global batch)."""


def pad_up(tokens: int, pad_multiple: int) -> int:
    """`tokens` rounded up to a multiple of `pad_multiple`."""
    return -(-tokens // pad_multiple) * pad_multiple


def waste_fraction(real_tokens: int, num_microbatches: int, capacity_tokens: int) -> float:
    """Share of the stream's capacity (no-ops included) not holding real tokens."""
    return 1.0 - real_tokens / (num_microbatches * capacity_tokens) if num_microbatches else 0.0


def batch_spans(microbatches: list[Microbatch], start: int = 0,
                spans: dict[tuple[str, int], list[int]] | None = None) -> dict[tuple[str, int], list[int]]:
    """(job, global batch) -> [first, last] stream position of the microbatches holding it. Positions count
    from `start`; `spans`, when given, is extended in place (a stream of windows) and returned."""
    spans = {} if spans is None else spans
    for pos, mb in enumerate(microbatches, start=start):
        for job, g, _ in mb.samples:
            spans.setdefault((job, g), [pos, pos])[1] = pos
    return spans


def padded_size(tokens_per_job: dict[str, int], pad_multiple: int) -> int:
    """Padded tokens of one microbatch: each job's tokens padded separately, then summed."""
    return sum(pad_up(t, pad_multiple) for t in tokens_per_job.values())


@dataclass
class Job:
    """One fine-tuning job as the scheduler sees it."""

    name: str
    """Unique job name."""
    global_batches: list[list[int]]
    """global_batches[g][i]: token length of sample i of global batch first_global_batch + g (one
    optimizer step per global batch)."""
    first_global_batch: int = 0
    """Index of global_batches[0] in the job's whole run (its step); a window planner gives each job only
    the global batches of one window, and sample refs carry the absolute index."""

    def __post_init__(self) -> None:
        self.validate()
        self.global_batches = [[int(n) for n in batch] for batch in self.global_batches]  # numpy ints too

    def validate(self) -> None:
        """Raise ValueError naming the job, global batch and sample of a malformed entry."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Job name {self.name!r} must be a non-empty string")
        first = self.first_global_batch
        if isinstance(first, bool) or not isinstance(first, numbers.Integral) or first < 0:
            raise ValueError(f"job {self.name!r} first_global_batch={first!r} must be an integer ≥ 0 (its step)")
        if len(self.global_batches) == 0:
            raise ValueError(f"job {self.name!r} has no global batches; give it at least one or leave it out")
        for g, batch in enumerate(self.global_batches):
            if not hasattr(batch, "__len__"):
                raise ValueError(f"job {self.name!r} global batch {first + g} is {batch!r}, not a list of sample lengths")
            if len(batch) == 0:
                raise ValueError(f"job {self.name!r} global batch {first + g} is empty; every global batch needs a sample")
            for i, length in enumerate(batch):
                if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length <= 0:
                    raise ValueError(
                        f"job {self.name!r} global batch {first + g} sample {i} has length {length!r}; "
                        "lengths are positive integer token counts"
                    )


@dataclass
class Microbatch:
    """One pipeline slot: the samples it runs, or a no-op that only keeps a job's steps apart."""

    samples: list[SampleRef]
    """(job, global batch, sample) of each sample, grouped by job."""
    is_noop: bool = False
    """True for an empty slot inserted so a job's next global batch starts after its optimizer step."""


@dataclass
class PlanStats:
    """Summary of a plan; tokens are per microbatch, summed over the plan."""

    num_microbatches: int
    """Microbatches in the stream, no-ops included."""
    num_noops: int
    """No-op microbatches among them."""
    real_tokens: int
    """Sum of all sample lengths."""
    padded_tokens: int
    """Sum over microbatches of the padded size (each job's tokens rounded up to pad_multiple)."""
    waste_fraction: float
    """1 - real_tokens / (num_microbatches * capacity_tokens): capacity left unused by padding, slack and no-ops."""
    groups: list[list[str]]
    """Job names of each group; a group's global batches are packed together."""
    solve_times_s: list[float] = field(default_factory=list)
    """Wall time of each (global batch, group) packing, greedy and CP-SAT together."""
    solver_statuses: list[str] = field(default_factory=list)
    """Outcome of each packing: a CP-SAT status name, or GREEDY_OPTIMAL when greedy met the lower bound."""

    @property
    def status_counts(self) -> dict[str, int]:
        """How many packings ended with each status."""
        return dict(Counter(self.solver_statuses))


@dataclass
class Plan:
    """The microbatch stream, in execution order, and its statistics."""

    microbatches: list[Microbatch]
    stats: PlanStats


@dataclass(frozen=True)
class Item:
    """One sample inside a packing problem."""

    job: str
    global_batch: int
    sample: int
    length: int
    """Tokens."""

    @property
    def ref(self) -> SampleRef:
        return (self.job, self.global_batch, self.sample)


@dataclass(frozen=True)
class PackingProblem:
    """Pack `items` into as few bins as possible; each job's tokens in a bin are padded to pad_multiple."""

    items: tuple[Item, ...]
    capacity_tokens: int
    pad_multiple: int
    budget: CostBudget | None = None
    """A cost capacity each bin must also respect (None: tokens only)."""

    @property
    def jobs(self) -> list[str]:
        """Job names in order of first appearance."""
        return list(dict.fromkeys(item.job for item in self.items))

    @property
    def capacity_blocks(self) -> int:
        """Capacity in padded blocks of pad_multiple tokens."""
        return self.capacity_tokens // self.pad_multiple


@dataclass(frozen=True)
class SolverParams:
    """CP-SAT settings of each (global batch, group) solve."""

    time_limit_s: float = 1.0
    """Per (global batch, group) solve; CP-SAT deterministic time when `deterministic`, else wall time.
    Deterministic "seconds" took 1.5-3x as long in wall time on a 2-core AMD EPYC runner (64 samples)."""
    num_workers: int = 1
    """CP-SAT search threads. 1 by default: with deterministic=True, 2 workers (interleaved search) took
    0.5-1.3 s of CPU where 1 worker took 0.015-0.06 s, both proving the same optimum, on a 24- and a
    28-sample (global batch, group) of the hetero workload of benchmarks/bench_scheduler.py (2-core EPYC)."""
    seed: int = 0
    """CP-SAT random seed."""
    deterministic: bool = True
    """Same input, same plan (interleaved search, deterministic time limit); False: wall-clock limit,
    free-running portfolio, usually better packings per second but not reproducible."""

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s={self.time_limit_s!r} must be > 0 seconds, e.g. 1.0")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers={self.num_workers!r} must be a positive integer, e.g. 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")


@dataclass
class Packing:
    """A solution of a PackingProblem: bins of item indices, and how it was found."""

    bins: list[list[int]]
    status: str
    solve_time_s: float


def positive_int(name: str, value: object, example: str) -> None:
    """Raise ValueError naming `name` unless `value` is an int > 0 (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. {example}")


def validate_problem(
    jobs: list[Job], capacity_tokens: int, pipeline_depth: int, pad_multiple: int, budget: CostBudget | None = None
) -> None:
    """Raise ValueError naming the bad parameter, job or sample before any planning starts."""
    validate_limits(capacity_tokens, pipeline_depth, pad_multiple)
    if not jobs:
        raise ValueError("no jobs to plan; give at least one Job")
    seen: set[str] = set()
    for job in jobs:
        if not isinstance(job, Job):
            raise ValueError(f"{job!r} is not a scheduler.Job; build jobs with Job(name=..., global_batches=...)")
        if job.name in seen:
            raise ValueError(f"duplicate job name {job.name!r}; job names must be unique")
        seen.add(job.name)
        job.validate()
        _check_lengths(job, capacity_tokens, pad_multiple, budget)


def validate_limits(capacity_tokens: int, pipeline_depth: int, pad_multiple: int) -> None:
    """Raise ValueError naming a bad capacity, pipeline depth or padding multiple."""
    positive_int("capacity_tokens", capacity_tokens, "4096")
    positive_int("pipeline_depth", pipeline_depth, "4 (pipeline stages x data-parallel)")
    positive_int("pad_multiple", pad_multiple, "128 (kernel tile rows) or 1 for no padding")
    if pad_multiple > capacity_tokens:
        raise ValueError(
            f"pad_multiple={pad_multiple} > capacity_tokens={capacity_tokens}; no sample would fit, "
            "lower pad_multiple or raise capacity_tokens"
        )


def _check_lengths(job: Job, capacity_tokens: int, pad_multiple: int, budget: CostBudget | None) -> None:
    for g, batch in enumerate(job.global_batches, start=job.first_global_batch):
        for i, length in enumerate(batch):
            padded = pad_up(length, pad_multiple)
            if padded > capacity_tokens:
                raise ValueError(
                    f"job {job.name!r} global batch {g} sample {i} has {length} tokens ({padded} after padding "
                    f"to a multiple of pad_multiple={pad_multiple}) > capacity_tokens={capacity_tokens}; "
                    f"raise capacity_tokens to at least {padded} or truncate the sample"
                )
            if budget is not None and not budget.fits(padded // pad_multiple, budget.item_units(length)):
                raise ValueError(
                    f"job {job.name!r} global batch {g} sample {i} of {length} tokens costs more than "
                    "capacity_cost on its own; raise capacity_cost to at least "
                    f"cost_model.cost([{length}]) or truncate the sample"
                )


def packing_problem(
    jobs: list[Job], round_index: int, capacity_tokens: int, pad_multiple: int, budget: CostBudget | None = None
) -> PackingProblem:
    """The samples of each job's `round_index`-th global batch (for the jobs that have one) as one problem.

    Items carry the absolute global batch index, first_global_batch + round_index.
    """
    items = tuple(
        Item(job.name, job.first_global_batch + round_index, i, length)
        for job in jobs
        if round_index < len(job.global_batches)
        for i, length in enumerate(job.global_batches[round_index])
    )
    return PackingProblem(items, capacity_tokens, pad_multiple, budget)
