"""run.balance_pipeline: a pipelined stream planned at the capacity its 1F1B simulation finishes soonest.

The workload has bench_end_to_end's shape: one job (chat) holds most of the tokens, so at 2 stages the
distance rule leaves every third microbatch to the three small jobs; full microbatches alternate with light
ones and the stages wait on each other. Smaller microbatches spread chat over more of them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lorafusion as lf
from lorafusion.checkpoint import CHECKPOINT_MANIFEST, CHECKPOINTS_DIR
from lorafusion.prepare import prepare_run
from runtime.planning import (MIN_BALANCE_GAIN, balanced_plan, format_run_plan, plan_windows, scheduler_jobs,
                              simulated_makespan, stream_window)
from runtime.windows import window_plan, window_planner
from scheduler import verify_windows
from tests.runtime.test_isolation import fit_adapters, max_rel_diff

CAPACITY = 2048
NAMES = ("arith", "greet", "reverse", "chat")


def dominated_jobs(examples_data, steps: int = 4) -> list[lf.JobSpec]:
    return [lf.JobSpec(name=name, dataset=str(examples_data / f"{name}.jsonl"), adapter=lf.LoRAConfig(rank=2),
                       global_batch_size=8, learning_rate=1e-3, max_steps=steps, seed=i)
            for i, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def prepared(train_checkpoint, examples_data, tmp_path_factory):
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path_factory.mktemp("out") / "run"),
                       max_tokens_per_microbatch=CAPACITY, pipeline_stages=2, balance_pipeline=True, progress=False,
                       dtype="float32")
    return prepare_run(dominated_jobs(examples_data), run)


def test_a_dominated_stream_is_planned_at_a_smaller_capacity(prepared):
    run, jobs = prepared.run, prepared.jobs
    planner = window_planner(run)
    steps = {job.name: range(0, 2) for job in jobs}
    window_jobs = scheduler_jobs(jobs, steps)
    plan, continued, choice = stream_window(window_jobs, planner, stages=2, balance=True)
    full = window_planner(run).next_window(window_jobs)
    assert planner.position == 0, "the caller's planner must be left as it was"
    assert choice.jobs == tuple(sorted(NAMES))
    assert set(choice.simulated) == {2048, 1536, 1280, 1024}
    assert choice.capacity_tokens < CAPACITY and choice.gain >= MIN_BALANCE_GAIN
    assert choice.simulated[choice.capacity_tokens] == min(choice.simulated.values())
    assert simulated_makespan(full, window_jobs, 2) == pytest.approx(choice.simulated[CAPACITY], rel=1e-6)
    planned = window_plan(jobs, steps, run, plan)
    assert planned.microbatches > window_plan(jobs, steps, run, full).microbatches  # more, evener ones
    for slot in planned.window.slots[0]:
        assert sum(len(sample) for _, sample, _ in slot.items) <= choice.capacity_tokens
    # The stream goes on at the chosen capacity while its set of jobs stays, and the distance rule holds across
    # the window boundary.
    assert continued.limits["capacity_tokens"] == choice.capacity_tokens
    later_jobs = scheduler_jobs(jobs, {job.name: range(2, 4) for job in jobs})
    second, after, again = stream_window(later_jobs, continued, stages=2, balance=True, chosen_for=choice.jobs)
    assert again is None and after is continued
    verify_windows([plan, second], [window_jobs, later_jobs], capacity_tokens=choice.capacity_tokens,
                   pipeline_depth=2, pad_multiple=1)
    # Another set of jobs is chosen for again; 1 stage or balance off never chooses.
    fewer = [job for job in window_jobs if job.name != "arith"]
    assert stream_window(fewer, window_planner(run), stages=2, balance=True,
                         chosen_for=choice.jobs)[2].jobs == ("chat", "greet", "reverse")
    for stages, balance in ((1, True), (2, False)):
        _, kept, none = stream_window(window_jobs, window_planner(run), stages=stages, balance=balance)
        assert none is None and kept.limits["capacity_tokens"] == CAPACITY


def test_an_even_stream_keeps_the_full_capacity(prepared):
    """Four jobs of one distribution: full microbatches are already even, smaller ones only add overhead."""
    reverse = next(job for job in prepared.jobs if job.name == "reverse")
    _, continued, choice = balanced_plan(scheduler_jobs([reverse], {"reverse": range(0, 4)}),
                                         window_planner(prepared.run), stages=2)
    assert len(choice.simulated) == 4  # every candidate was planned and simulated
    assert choice.capacity_tokens == CAPACITY and continued.limits["capacity_tokens"] == CAPACITY


def test_lorafusion_plan_shows_the_capacity_the_fit_would_choose(prepared):
    """plan_windows (`lorafusion plan`) balances as the fit does: the first window at balanced_plan's choice,
    the stream going on at it; with balance off, every window at the full capacity."""
    run, jobs = prepared.run, prepared.jobs
    _, _, choice = balanced_plan(scheduler_jobs(jobs, {job.name: range(0, 2) for job in jobs}),
                                 window_planner(run), stages=2)
    balanced = plan_windows(jobs, window_planner(run), steps_per_window=2, stages=2, balance=True)
    assert [w.capacity_tokens for w in balanced.windows] == [choice.capacity_tokens] * 2
    assert balanced.capacity_tokens == CAPACITY
    full = plan_windows(jobs, window_planner(run), steps_per_window=2, stages=2)
    assert [w.capacity_tokens for w in full.windows] == [CAPACITY] * 2
    assert sum(w.microbatches for w in balanced.windows) > sum(w.microbatches for w in full.windows)
    assert balanced.bubble_fraction < full.bubble_fraction
    rows = [line.split() for line in format_run_plan(balanced).splitlines() if line.split()[0].isdigit()]
    assert [int(row[-1]) for row in rows] == [choice.capacity_tokens] * 2
    real = sum(w.real_tokens for w in balanced.windows)
    room = sum(w.microbatches * w.capacity_tokens for w in balanced.windows)
    total = next(line.split() for line in format_run_plan(balanced).splitlines() if line.split()[0] == "total")
    assert total[5] == f"{1 - real / room:.1%}"


# Checkpointed every 2 steps of 3: a 2-step window (streamed, not drained between its steps), then the last one;
# the resume test below restarts this fit from its mid-run checkpoint.
CHECKPOINTED_2_STAGES = dict(pipeline_stages=2, checkpoint_every_steps=2, keep_checkpoints=5)


@pytest.fixture(scope="module")
def balanced(ray_session, train_checkpoint, examples_data, tmp_path_factory):
    """One balanced 2-stage fit (Ray actors) that both tests below read: its output folder and adapters."""
    out = tmp_path_factory.mktemp("balanced") / "straight"
    return out, fit_adapters(train_checkpoint, out, dominated_jobs(examples_data, steps=3), CAPACITY,
                             **CHECKPOINTED_2_STAGES)


@pytest.mark.usefixtures("ray_session")
def test_balanced_fit_trains_the_same_jobs(balanced, train_checkpoint, examples_data, tmp_path):
    """The fit (balanced by default) records its choice and trains every job to the adapters of a 1-stage fit, up
    to the fp32 rounding of gradient sums over a different packing (Adam amplifies it to ~1e-4, so 3e-4 leaves a
    margin for other CPUs' kernels and nothing for a real difference). The 1-stage fit runs in process:
    the engines give the same adapters bit for bit (tests/runtime/test_resume.py)."""
    jobs = dominated_jobs(examples_data, steps=3)
    single = fit_adapters(train_checkpoint, tmp_path / "single", jobs, CAPACITY, engine="local")
    out, adapters = balanced
    metrics = json.loads((out / "run_metrics.json").read_text())
    [choice] = metrics["capacity_choices"]  # one set of jobs, one choice
    assert choice["window"] == 0 and choice["jobs"] == sorted(NAMES)
    assert choice["capacity_tokens"] < CAPACITY
    for name in NAMES:
        worst, key = max_rel_diff(adapters[name]["tensors"], single[name]["tensors"])
        assert worst <= 3e-4, f"job {name}: balanced 2-stage vs 1 process differ by {worst:.3e} in {key}"
        assert [m["step"] for m in adapters[name]["metrics"]] == [1, 2, 3]
    # Off: no choice, every microbatch filled up to the full capacity, so fewer of them (same windows).
    fit_adapters(train_checkpoint, tmp_path / "full", jobs, CAPACITY, balance_pipeline=False, **CHECKPOINTED_2_STAGES)
    full = json.loads((tmp_path / "full" / "run_metrics.json").read_text())
    assert full["capacity_choices"] == [] and full["microbatches"] < metrics["microbatches"]


@pytest.mark.usefixtures("ray_session")
def test_a_resumed_fit_goes_on_at_the_chosen_capacity(balanced, train_checkpoint, examples_data, tmp_path):
    """The checkpoint keeps the stream's capacity choice, so a fit resumed from it plans its later windows
    as the uninterrupted fit did (and gets its adapters bit for bit) instead of choosing again; a damaged
    record is refused before anything is written."""
    jobs = dominated_jobs(examples_data, steps=3)
    fields = CHECKPOINTED_2_STAGES
    out, straight = balanced
    [choice] = json.loads((out / "run_metrics.json").read_text())["capacity_choices"]
    assert choice["capacity_tokens"] < CAPACITY
    first = min((out / CHECKPOINTS_DIR).glob("step-*"))
    assert first.name != max(p.name for p in (out / CHECKPOINTS_DIR).glob("step-*")), "no mid-run checkpoint"
    stream = json.loads((first / CHECKPOINT_MANIFEST).read_text())["stream"]
    assert stream == {"capacity_tokens": choice["capacity_tokens"], "jobs": sorted(NAMES), "layout": [2, 1]}

    # Interrupted after the first checkpoint: its output as it stood then (later checkpoints never written).
    shutil.copytree(out, tmp_path / "resumed")
    for later in (tmp_path / "resumed" / CHECKPOINTS_DIR).glob("step-*"):
        if later.name != first.name:
            shutil.rmtree(later)
    manifest_path = tmp_path / "resumed" / CHECKPOINTS_DIR / first.name / CHECKPOINT_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "stream": {**stream, "capacity_tokens": 2 * CAPACITY}}))
    with pytest.raises(ValueError, match=rf"damaged \"stream\" record .* delete '.*{first.name}' to resume"):
        fit_adapters(train_checkpoint, tmp_path / "resumed", jobs, CAPACITY, **fields)
    manifest_path.write_text(json.dumps(manifest))
    resumed = fit_adapters(train_checkpoint, tmp_path / "resumed", jobs, CAPACITY, **fields)
    assert json.loads((tmp_path / "resumed" / "run_metrics.json").read_text())["capacity_choices"] == []
    for name in NAMES:
        for key, tensor in straight[name]["tensors"].items():
            assert torch.equal(resumed[name]["tensors"][key], tensor), f"{name}: {key} differs after the resume"
