"""run.balance_pipeline: a pipelined stream planned at the capacity its 1F1B simulation finishes soonest.

The workload has bench_end_to_end's shape: one job (chat) holds most of the tokens, so at 2 stages the
distance rule leaves every third microbatch to the three small jobs; full microbatches alternate with light
ones and the stages wait on each other. Smaller microbatches spread chat over more of them.
"""

from __future__ import annotations

import importlib
import json

import pytest

import lorafusion as lf
from lorafusion.prepare import prepare_run
from scheduler import verify_windows
from tests.runtime.test_isolation import fit_adapters, max_rel_diff

fit_module = importlib.import_module("runtime.fit")
CAPACITY = 2048
NAMES = ("arith", "greet", "reverse", "chat")


def dominated_jobs(examples_data, steps: int = 4) -> list[lf.JobSpec]:
    return [lf.JobSpec(name=name, dataset=str(examples_data / f"{name}.jsonl"), adapter=lf.LoRAConfig(rank=2),
                       global_batch_size=8, learning_rate=1e-3, max_steps=steps, seed=i)
            for i, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def prepared(train_checkpoint, examples_data, tmp_path_factory):
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path_factory.mktemp("out") / "run"),
                       max_tokens_per_microbatch=CAPACITY, pipeline_stages=2, balance_pipeline=True, progress=False)
    return prepare_run(dominated_jobs(examples_data), run)


def test_a_dominated_stream_is_planned_at_a_smaller_capacity(prepared):
    run, jobs = prepared.run, prepared.jobs
    planner = fit_module.window_planner(run)
    steps = {job.name: range(0, 2) for job in jobs}
    planned, continued, choice = fit_module.balanced_window(jobs, steps, run, planner)
    full = fit_module.plan_window(jobs, steps, run, fit_module.window_planner(run))
    assert planner.position == 0, "the caller's planner must be left as it was"
    assert set(choice.simulated) == {2048, 1536, 1280, 1024}
    assert choice.capacity_tokens < CAPACITY and choice.gain >= fit_module._MIN_BALANCE_GAIN
    assert choice.simulated[choice.capacity_tokens] == min(choice.simulated.values())
    assert fit_module.simulated_makespan(full, run) == pytest.approx(choice.simulated[CAPACITY], rel=1e-6)
    assert planned.microbatches > full.microbatches  # the same samples in more, evener microbatches
    for slot in planned.window.slots[0]:
        assert sum(len(sample) for _, sample, _ in slot.items) <= choice.capacity_tokens
    # The stream goes on at the chosen capacity, and the distance rule holds across the window boundary.
    assert continued.limits["capacity_tokens"] == choice.capacity_tokens
    later = {job.name: range(2, 4) for job in jobs}
    second = fit_module.plan_window(jobs, later, run, continued)
    verify_windows([planned.plan, second.plan], [planned.jobs, second.jobs], capacity_tokens=choice.capacity_tokens,
                   pipeline_depth=2, pad_multiple=1)


def test_an_even_stream_keeps_the_full_capacity(prepared):
    """Four jobs of one distribution: full microbatches are already even, smaller ones only add overhead."""
    run = prepared.run
    reverse = next(job for job in prepared.jobs if job.name == "reverse")
    _, continued, choice = fit_module.balanced_window([reverse], {"reverse": range(0, 4)}, run,
                                                      fit_module.window_planner(run))
    assert len(choice.simulated) == 4  # every candidate was planned and simulated
    assert choice.capacity_tokens == CAPACITY and continued.limits["capacity_tokens"] == CAPACITY


@pytest.mark.usefixtures("ray_session")
def test_balanced_fit_trains_the_same_jobs(train_checkpoint, examples_data, tmp_path):
    """The fit records its choice and trains every job to the adapters of a 1-stage fit, up to the fp32
    rounding of gradient sums over a different packing (Adam amplifies it; ~1e-4 seen)."""
    jobs = dominated_jobs(examples_data, steps=3)
    single = fit_adapters(train_checkpoint, tmp_path / "single", jobs, CAPACITY)
    balanced = fit_adapters(train_checkpoint, tmp_path / "balanced", jobs, CAPACITY, pipeline_stages=2,
                            balance_pipeline=True)
    metrics = json.loads((tmp_path / "balanced" / "run_metrics.json").read_text())
    [choice] = metrics["capacity_choices"]  # one set of jobs, one choice
    assert choice["window"] == 0 and choice["jobs"] == sorted(NAMES)
    assert choice["capacity_tokens"] < CAPACITY
    for name in NAMES:
        worst, key = max_rel_diff(balanced[name]["tensors"], single[name]["tensors"])
        assert worst <= 1e-3, f"job {name}: balanced 2-stage vs 1 process differ by {worst:.3e} in {key}"
        assert [m["step"] for m in balanced[name]["metrics"]] == [1, 2, 3]
