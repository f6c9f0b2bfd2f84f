"""The verifier: a hand-built valid plan passes; each kind of violation is named."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import pytest

from scheduler import Job, Microbatch, Plan, verify
from scheduler.problem import PlanStats

JOBS = [Job("a", [[3, 4], [5]]), Job("b", [[6]])]
LIMITS = dict(capacity_tokens=16, pipeline_depth=2, pad_multiple=4)


def _valid_plan() -> Plan:
    # mb 0: a's 7 tokens pad to 8, b's 6 to 8: 16 = capacity. mb 1 keeps a's global batches 2 apart.
    microbatches = [
        Microbatch([("a", 0, 0), ("a", 0, 1), ("b", 0, 0)]),
        Microbatch([], is_noop=True),
        Microbatch([("a", 1, 0)]),
    ]
    stats = PlanStats(num_microbatches=3, num_noops=1, real_tokens=18, padded_tokens=24,
                      waste_fraction=1 - 18 / 48, groups=[["a", "b"]])
    return Plan(microbatches, stats)


def test_valid_plan_passes():
    verify(_valid_plan(), JOBS, **LIMITS)


def _mutate(change: Callable[[Plan], None]) -> Plan:
    plan = copy.deepcopy(_valid_plan())
    change(plan)
    return plan


VIOLATIONS = {
    "duplicate": (lambda p: p.microbatches[2].samples.append(("b", 0, 0)),
                  "job 'b' global batch 0 sample 0 is in microbatches 0 and 2"),
    "missing": (lambda p: p.microbatches[0].samples.remove(("b", 0, 0)),
                r"1 samples are in no microbatch, first .*\('b', 0, 0\)"),
    "unknown sample": (lambda p: p.microbatches[2].samples.append(("a", 1, 9)),
                       "job 'a' global batch 1 sample 9, which does not exist"),
    "unknown job": (lambda p: p.microbatches[2].samples.append(("c", 0, 0)), "job 'c'.*does not exist"),
    "mixed global batches": (lambda p: p.microbatches[0].samples.append(p.microbatches[2].samples.pop()),
                             "microbatch 0 mixes global batches 0 and 1 of job 'a'"),
    "no-op with samples": (lambda p: setattr(p.microbatches[0], "is_noop", True),
                           "microbatch 0 is a no-op holding samples"),
    "empty microbatch": (lambda p: setattr(p.microbatches[1], "is_noop", False),
                         "microbatch 1 is empty but not marked is_noop"),
    "too close": (lambda p: p.microbatches.pop(1),
                  "job 'a' global batch 1 starts at microbatch 1, 1 after its global batch 0 ended at "
                  "microbatch 0; pipeline_depth=2"),
    "out of order": (lambda p: p.microbatches.reverse(), "job 'a' global batch 1 starts at microbatch 0, -2 after"),
    "stats count": (lambda p: setattr(p.stats, "num_microbatches", 2),
                    "plan.stats.num_microbatches=2 but the microbatches give 3"),
    "stats no-ops": (lambda p: setattr(p.stats, "num_noops", 0), "plan.stats.num_noops=0"),
    "stats padded": (lambda p: setattr(p.stats, "padded_tokens", 18), "plan.stats.padded_tokens=18 .* give 24"),
    "stats waste": (lambda p: setattr(p.stats, "waste_fraction", 0.5), "plan.stats.waste_fraction=0.5"),
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_violation_is_named(name):
    change, message = VIOLATIONS[name]
    with pytest.raises(ValueError, match=message):
        verify(_mutate(change), JOBS, **LIMITS)


def test_over_capacity():
    with pytest.raises(ValueError, match="microbatch 0 has 16 padded tokens > capacity_tokens=15"):
        verify(_valid_plan(), JOBS, **{**LIMITS, "capacity_tokens": 15})


def test_padding_is_per_job():
    # With pad 8, a's 7 tokens and b's 6 tokens each take 8: 16 still fits; with pad 5 they take 10 + 10.
    plan = _valid_plan()
    plan.stats = dataclasses.replace(plan.stats, padded_tokens=16 + 8)
    verify(plan, JOBS, **{**LIMITS, "pad_multiple": 8})
    with pytest.raises(ValueError, match="microbatch 0 has 20 padded tokens > capacity_tokens=16"):
        verify(plan, JOBS, **{**LIMITS, "pad_multiple": 5})


def test_a_deeper_pipeline_needs_more_distance():
    with pytest.raises(ValueError, match="pipeline_depth=3 needs ≥ 3"):
        verify(_valid_plan(), JOBS, **{**LIMITS, "pipeline_depth": 3})


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="pipeline_depth=0"):
        verify(_valid_plan(), JOBS, **{**LIMITS, "pipeline_depth": 0})
