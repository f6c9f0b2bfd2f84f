"""Bad input to the scheduler: every error names the value (job, global batch, sample, length) and the fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scheduler
from scheduler import Job, plan
from scheduler.problem import SolverParams, pad_up, padded_size, waste_fraction

ROOT = Path(__file__).resolve().parents[2]
PLAN_ARGS = dict(capacity_tokens=64, pipeline_depth=2, pad_multiple=8, time_limit_s=0.05)


def _assert_names(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} missing from the error message: {message}"


@pytest.mark.parametrize(
    "global_batches, words",
    [
        ([], ["'a'", "no global batches", "at least one"]),
        ([[3], []], ["'a'", "global batch 1 is empty"]),
        ([[3, 0]], ["'a'", "global batch 0 sample 1", "length 0", "positive integer"]),
        ([[3], [-2]], ["global batch 1 sample 0", "length -2"]),
        ([[2.5]], ["sample 0", "2.5"]),
        ([[True]], ["sample 0", "True"]),
        ([5], ["global batch 0 is 5", "not a list of sample lengths"]),
    ],
)
def test_malformed_job(global_batches, words):
    with pytest.raises(ValueError) as err:
        Job("a", global_batches)
    _assert_names(err, *words)


@pytest.mark.parametrize("name", ["", None, 3])
def test_job_name_must_be_a_non_empty_string(name):
    with pytest.raises(ValueError) as err:
        Job(name, [[1]])
    _assert_names(err, "name", repr(name))


def test_sample_longer_than_capacity_after_padding():
    # 65 tokens pad to 72 > 64; the message says which sample, its length, and what to change.
    jobs = [Job("a", [[10]]), Job("b", [[10, 20], [30, 65]])]
    with pytest.raises(ValueError) as err:
        plan(jobs, **PLAN_ARGS)
    _assert_names(err, "job 'b'", "global batch 1", "sample 1", "65 tokens", "72 after padding",
                  "capacity_tokens=64", "raise capacity_tokens to at least 72", "truncate")


def test_sample_that_fits_only_without_padding_is_rejected():
    with pytest.raises(ValueError) as err:
        plan([Job("a", [[60]])], capacity_tokens=60, pipeline_depth=1, pad_multiple=16)
    _assert_names(err, "60 tokens", "64 after padding", "capacity_tokens=60")


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(capacity_tokens=0), ["capacity_tokens=0", "positive integer"]),
        (dict(capacity_tokens=-64), ["capacity_tokens=-64"]),
        (dict(capacity_tokens=64.0), ["capacity_tokens=64.0"]),
        (dict(pipeline_depth=0), ["pipeline_depth=0", "pipeline stages"]),
        (dict(pipeline_depth=True), ["pipeline_depth=True"]),
        (dict(pad_multiple=0), ["pad_multiple=0", "or 1 for no padding"]),
        (dict(pad_multiple=-8), ["pad_multiple=-8"]),
        (dict(pad_multiple=128), ["pad_multiple=128 > capacity_tokens=64"]),
        (dict(time_limit_s=0), ["time_limit_s=0", "> 0"]),
        (dict(num_workers=0), ["num_workers=0", "positive integer"]),
        (dict(seed=1.5), ["seed=1.5", "integer"]),
    ],
)
def test_bad_parameters(overrides, words):
    with pytest.raises(ValueError) as err:
        plan([Job("a", [[10]])], **{**PLAN_ARGS, **overrides})
    _assert_names(err, *words)


def test_duplicate_job_names():
    with pytest.raises(ValueError) as err:
        plan([Job("a", [[10]]), Job("b", [[5]]), Job("a", [[7]])], **PLAN_ARGS)
    _assert_names(err, "duplicate job name 'a'", "unique")


def test_no_jobs():
    with pytest.raises(ValueError) as err:
        plan([], **PLAN_ARGS)
    _assert_names(err, "no jobs", "at least one Job")


def test_not_a_job():
    with pytest.raises(ValueError) as err:
        plan([{"name": "a", "global_batches": [[1]]}], **PLAN_ARGS)
    _assert_names(err, "not a scheduler.Job", "Job(name=")


def test_job_mutated_after_construction_is_checked_again():
    job = Job("a", [[10]])
    job.global_batches.append([])
    with pytest.raises(ValueError) as err:
        plan([job], **PLAN_ARGS)
    _assert_names(err, "'a'", "global batch 1 is empty")


def test_lengths_may_be_numpy_integers():
    job = Job("a", [np.array([3, 4], dtype=np.int64)])
    assert job.global_batches == [[3, 4]] and type(job.global_batches[0][0]) is int


def test_solver_params_defaults_are_valid():
    assert SolverParams().time_limit_s == 1.0


def test_padding_arithmetic():
    assert [pad_up(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert padded_size({"a": 9, "b": 1}, 8) == 24  # each job padded on its own: 16 + 8
    assert waste_fraction(real_tokens=48, num_microbatches=2, capacity_tokens=32) == 0.25
    assert waste_fraction(0, 0, 32) == 0.0


def test_public_names():
    assert set(scheduler.__all__) >= {"Job", "Microbatch", "Plan", "plan", "verify", "first_fit_decreasing"}


def test_scheduler_never_imports_torch():
    # The test process already has torch (tests/conftest.py), so look from a fresh interpreter.
    code = "import sys, scheduler, scheduler.cpsat, scheduler.order, scheduler.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for path in (ROOT / "scheduler").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), re.MULTILINE), path.name
