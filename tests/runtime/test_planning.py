"""Prepared jobs -> scheduler windows -> the runtime's items: every sample once, with its own dropout seed."""

from __future__ import annotations

import pytest

import lorafusion as lf
from lorafusion.prepare import prepare_run
from runtime.planning import format_run_plan, last_microbatch, plan_windows, scheduler_jobs, window_items
from scheduler import WindowPlanner, verify_windows, window_global_batches

LIMITS = dict(capacity_tokens=256, pipeline_depth=2, pad_multiple=1)


@pytest.fixture(scope="module")
def prepared(train_checkpoint, examples_data, tmp_path_factory):
    jobs = [
        lf.JobSpec(name=name, dataset=str(examples_data / f"{data}.jsonl"), adapter=lf.LoRAConfig(rank=2),
                   global_batch_size=gbs, learning_rate=1e-3, max_steps=steps, seed=i)
        for i, (name, data, gbs, steps) in enumerate([("greet", "greet", 4, 3), ("arith", "arith", 3, 5),
                                                      ("rev", "reverse", 2, 2)])
    ]
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path_factory.mktemp("out") / "run"),
                       max_tokens_per_microbatch=256, progress=False)
    return prepare_run(jobs, run).jobs


def test_scheduler_jobs_take_the_window_of_each_active_job(prepared):
    by_name = {job.name: job for job in prepared}
    jobs = scheduler_jobs(prepared, {"greet": range(2, 3), "arith": range(1, 3)})  # rev inactive
    assert [(job.name, job.first_global_batch, len(job.global_batches)) for job in jobs] == [
        ("greet", 2, 1), ("arith", 1, 2)]
    assert jobs[1].global_batches[1] == [len(s) for s in by_name["arith"].global_batch(2)]
    assert scheduler_jobs(prepared, {"rev": range(2, 2)}) == []  # finished: an empty range is left out


@pytest.mark.parametrize("steps, match", [
    ({"nope": range(0, 1)}, "steps names job 'nope'"),
    ({"greet": range(-1, 1)}, r"steps\['greet'\]=range\(-1, 1\)"),
    ({"greet": range(2, 4)}, r"steps\['greet'\]=range\(2, 4\) .* within 0..3"),  # greet has 3 steps in all
    ({"greet": range(0, 3, 2)}, r"steps\['greet'\]=range\(0, 3, 2\) must be a range of consecutive steps"),
    ({"greet": 0}, r"steps\['greet'\]=0 must be a range"),
])
def test_bad_window_request(prepared, steps, match):
    with pytest.raises(ValueError, match=match):
        scheduler_jobs(prepared, steps)


def test_windows_map_back_to_every_sample_with_its_seed(prepared):
    by_name = {job.name: job for job in prepared}
    planner = WindowPlanner(**LIMITS, time_limit_s=0.05)
    step = {job.name: 0 for job in prepared}
    windows, jobs_per_window, seen = [], [], []
    while jobs := scheduler_jobs(prepared, {job.name: range(step[job.name], min(step[job.name] + 2, job.total_steps))
                                            for job in prepared}):
        window = planner.next_window(jobs)
        windows.append(window)
        jobs_per_window.append(jobs)
        items = window_items(window, prepared)
        assert [not mb for mb in items] == [mb.is_noop for mb in window.microbatches]
        for mb, planned in zip(window.microbatches, items):
            assert sum(len(sample) for _, sample, _ in planned) <= LIMITS["capacity_tokens"]
            for (name, g, i), (item_name, sample, seed) in zip(mb.samples, planned):
                assert item_name == name
                assert sample == by_name[name].global_batch(g)[i]
                assert seed == by_name[name].dropout_seeds(g)[i]
                seen.append((name, g, i))
        for (name, g), position in last_microbatch(window).items():
            assert position == max(p for p, mb in enumerate(window.microbatches)
                                   if any(ref[:2] == (name, g) for ref in mb.samples))
        for job in jobs:
            step[job.name] += len(job.global_batches)
    verify_windows(windows, jobs_per_window, **LIMITS)
    expected = [(job.name, g, i) for job in prepared for g in range(job.total_steps)
                for i in range(job.spec.global_batch_size)]
    assert sorted(seen) == sorted(expected)


def test_plan_windows_summarises_the_run(prepared):
    planner = WindowPlanner(**LIMITS, time_limit_s=0.05)
    run_plan = plan_windows(prepared, planner, steps_per_window=1, stages=2)
    assert len(run_plan.windows) == max(job.total_steps for job in prepared)
    assert sum(w.real_tokens for w in run_plan.windows) == sum(
        len(s) for job in prepared for g in range(job.total_steps) for s in job.global_batch(g))
    assert 0 <= run_plan.bubble_fraction < 1 and run_plan.makespan > 0
    table = format_run_plan(run_plan)
    assert table.splitlines()[0].split()[:3] == ["window", "mbs", "no-ops"]
    assert table.splitlines()[-2].split()[0] == "total"
    assert len(plan_windows(prepared, WindowPlanner(**LIMITS), steps_per_window=2, stages=2,
                            max_windows=1).windows) == 1
    with pytest.raises(ValueError, match="steps_per_window=0 must be a positive integer"):
        plan_windows(prepared, planner, steps_per_window=0, stages=2)


def test_plan_windows_sizes_windows_as_the_fit(prepared):
    # Without steps_per_window each window takes scheduler.window_global_batches of its first round, as lf.fit.
    first = plan_windows(prepared, WindowPlanner(**LIMITS, time_limit_s=0.05), stages=2, max_windows=1).windows[0]
    size = window_global_batches(sum(len(s) for job in prepared for s in job.global_batch(0)),
                                 LIMITS["capacity_tokens"], 2)
    assert size > 1
    assert first.real_tokens == sum(len(s) for job in prepared for g in range(min(size, job.total_steps))
                                    for s in job.global_batch(g))
