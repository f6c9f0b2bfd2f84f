"""Checkpoint and resume (issue 5): exact state round trips, resume == uninterrupted, damaged checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Mapping

import pytest
import torch

import lorafusion as lf
from lorafusion.checkpoint import (
    RUN_MANIFEST, JobProgress, JobStates, begin_checkpoint, checkpoint_dir, checkpoint_step, commit_checkpoint,
    finalize_checkpoint, latest_checkpoint, open_checkpoint, prune_checkpoints, read_driver_state, read_manifest,
    read_stage_state, restore_worker, run_manifest, stage_states, trim_metrics, write_driver_state, write_stage_shard,
)
from lorafusion.prepare import PreparedRun, prepare_run
from runtime.comm import StageComm, StagePlace
from runtime.windows import init_pass_window, plan_window
from runtime.optim import AdamWOptimizer
from runtime.stage import StageRunner
from runtime.worker import StageWorker

# The checkpoint pieces the fit's driver composes (runtime/fit.py `_Trainer.checkpoint`, `resume_from`), composed
# here for local workers, without a stream or federation rounds.
def save_checkpoint(
    prepared: PreparedRun, windows: int, workers_by_stage: Mapping[int, JobStates], progress: Mapping[str, JobProgress]
) -> Path:
    """Checkpoint every job after `windows` driver windows (single process: the workers are local objects).

    Call it between windows (no job mid-global-batch). Failed jobs get a driver record and no shards.
    """
    staging = begin_checkpoint(prepared.run.output_dir, checkpoint_step(progress))
    for stage, worker in sorted(workers_by_stage.items()):
        write_stage_shard(staging, stage, stage_states(worker, progress))
    return commit_checkpoint(prepared, staging, windows, progress, len(workers_by_stage))


def load_checkpoint(
    prepared: PreparedRun, workers_by_stage: Mapping[int, JobStates]
) -> tuple[int, dict[str, JobProgress]] | None:
    """Restore local workers from the newest complete checkpoint; returns (windows completed, progress per job),
    or None when there is nothing to resume (see open_checkpoint)."""
    resumed = open_checkpoint(prepared)
    if resumed is None:
        return None
    for worker in workers_by_stage.values():
        restore_worker(worker, resumed)
    return resumed.windows, resumed.progress


CAPACITY = 256  # small enough that a round spans several microbatches


def specs(examples_data: Path, greet_data: Path | None = None) -> list[lf.JobSpec]:
    """Dropout, warmup + decaying LR and weight decay: every piece of state a resume must restore matters."""
    return [
        lf.JobSpec(name="greet", dataset=str(greet_data or examples_data / "greet.jsonl"),
                   adapter=lf.LoRAConfig(rank=4, alpha=8, dropout=0.1), global_batch_size=4, learning_rate=1e-3,
                   max_steps=5, seed=1, lr_schedule="cosine", warmup_steps=2, weight_decay=0.01),
        lf.JobSpec(name="arith", dataset=str(examples_data / "arith.jsonl"),
                   adapter=lf.LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "down_proj"]),
                   global_batch_size=3, learning_rate=2e-3, max_steps=3, seed=2, lr_schedule="linear"),
    ]


def prepare(checkpoint: Path, out: Path, jobs: list[lf.JobSpec], **run_fields) -> PreparedRun:
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=str(out), max_tokens_per_microbatch=CAPACITY,
                       progress=False, dtype="float32", **run_fields)
    prepared = prepare_run(jobs, run)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MANIFEST).write_text(json.dumps(run_manifest(run, jobs)))  # as the fit driver writes it
    return prepared


def make_worker(prepared: PreparedRun, init_pass: bool = False) -> StageWorker:
    """A stage worker of the run; init_pass: run the gradient init pass of jobs that have one, as a fresh fit does."""
    worker = StageWorker(prepared.run, [(j.spec, j.total_steps) for j in prepared.jobs])
    window = init_pass_window(prepared.jobs, prepared.run) if init_pass else None
    if window is not None:
        StageRunner(worker, StageComm(StagePlace(), worker.device)).run_window(window)
    return worker


def train_round(worker: StageWorker, prepared: PreparedRun, progress: dict[str, JobProgress]) -> None:
    """One window of the engine as a 1-stage fit runs it: every active job's next global batch, packed together."""
    active = [j for j in prepared.jobs if progress[j.name].error is None and progress[j.name].step < j.total_steps]
    steps = {j.name: range(progress[j.name].step, progress[j.name].step + 1) for j in active}
    planned = plan_window(prepared.jobs, steps, prepared.run)
    runner = StageRunner(worker, StageComm(StagePlace(), worker.device))
    for event in runner.run_window(planned.window).steps:
        state = progress[event.job]
        state.tokens += planned.tokens[(event.job, state.step)]
        state.step += 1
        state.last_loss = event.loss


def fresh_progress(prepared: PreparedRun) -> dict[str, JobProgress]:
    return {job.name: JobProgress() for job in prepared.jobs}


def assert_bit_identical(got: StageWorker, want: StageWorker, job: str) -> None:
    """The job's export and every tensor of its state (frozen ones and ranks beyond the export's included)."""
    for view in (lambda w: w.adapters.peft_state_dict(job), lambda w: w.adapters.named_parameters(job, frozen=True)):
        a, b = view(got), view(want)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"job {job}: {key} differs by {(a[key] - b[key]).abs().max():.3e}"


# ----------------------------------------------------------------------------- optimizer and worker state


def test_optimizer_state_round_trip_is_exact():
    spec = lf.JobSpec(name="j", dataset="unused.jsonl", learning_rate=0.1, weight_decay=0.1, warmup_steps=1,
                      lr_schedule="cosine")
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(3, 2, generator=gen), torch.randn(5, generator=gen)] for _ in range(5)]

    def make() -> AdamWOptimizer:
        params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(5))]
        return AdamWOptimizer(spec, params, total_steps=5)

    def step(opt: AdamWOptimizer, i: int) -> None:
        for p, g in zip(opt.params, grads[i]):
            p.grad = g.clone()
        opt.step(opt.grad_norm_sq() ** 0.5)

    straight, resumed = make(), make()
    for i in range(2):
        step(straight, i)
    state = straight.state_dict()
    assert state["step_count"] == 2 and set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(t.device.type == "cpu" for per in state["state"] for t in per.values())
    with torch.no_grad():
        for mine, theirs in zip(resumed.params, straight.params):
            mine.copy_(theirs)
    resumed.load_state_dict(state)
    for i in range(2, 5):
        step(straight, i)
        step(resumed, i)
    assert resumed.step_count == straight.step_count == 5
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, straight.params))


def test_optimizer_state_of_another_shape_is_refused():
    spec = lf.JobSpec(name="j", dataset="unused.jsonl")
    opt = AdamWOptimizer(spec, [torch.nn.Parameter(torch.zeros(2, 2))], total_steps=3)
    with pytest.raises(ValueError, match="holds state for 2 parameters, this job has 1"):
        opt.load_state_dict({"step_count": 1, "state": [{}, {}]})
    bad = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"'exp_avg': shape \(3,\), expected \(2, 2\)"):
        opt.load_state_dict({"step_count": 1, "state": [bad]})
    with pytest.raises(ValueError, match="step_count=-1"):
        opt.load_state_dict({"step_count": -1, "state": [{}]})


def test_worker_state_moved_to_a_new_worker_trains_on_bit_identically(train_checkpoint, examples_data, tmp_path):
    prepared = prepare(train_checkpoint, tmp_path / "run", specs(examples_data))
    straight, progress = make_worker(prepared), fresh_progress(prepared)
    for _ in range(2):
        train_round(straight, prepared, progress)
    moved = make_worker(prepared)
    untouched = make_worker(prepared)
    for job in prepared.jobs:
        state = straight.job_state(job.name)
        assert state["step_count"] == 2 and all(name.startswith("layers.") for name in state["params"])
        moved.load_job_state(job.name, state)
    moved_progress = {name: dataclasses.replace(p) for name, p in progress.items()}
    untouched_progress = {name: dataclasses.replace(p) for name, p in progress.items()}
    for _ in range(3):
        train_round(straight, prepared, progress)
        train_round(moved, prepared, moved_progress)
        train_round(untouched, prepared, untouched_progress)  # same batches, but from the initial state
    for job in prepared.jobs:
        assert_bit_identical(moved, straight, job.name)
        b = untouched.adapters.peft_state_dict(job.name)
        assert any(not torch.equal(b[k], v) for k, v in straight.adapters.peft_state_dict(job.name).items())


# ----------------------------------------------------------------------------- resume through files


def straight_run(checkpoint: Path, out: Path, jobs: list[lf.JobSpec]) -> tuple[StageWorker, dict[str, JobProgress]]:
    prepared = prepare(checkpoint, out, jobs)
    worker, progress = make_worker(prepared, init_pass=True), fresh_progress(prepared)
    for _ in range(5):
        train_round(worker, prepared, progress)
    return worker, progress


def interrupted_run(checkpoint: Path, out: Path, jobs: list[lf.JobSpec], rounds: int, **run_fields) -> PreparedRun:
    """Train `rounds` rounds, checkpointing after each, then 'crash' (the worker is dropped)."""
    prepared = prepare(checkpoint, out, jobs, **run_fields)
    worker, progress = make_worker(prepared, init_pass=True), fresh_progress(prepared)
    for counter in range(1, rounds + 1):
        train_round(worker, prepared, progress)
        save_checkpoint(prepared, counter, {0: worker}, progress)
    return prepared


def resume(checkpoint: Path, out: Path, jobs: list[lf.JobSpec], **run_fields):
    prepared = prepare(checkpoint, out, jobs, **run_fields)  # check_output_dir accepts the resumable run
    worker = make_worker(prepared)
    loaded = load_checkpoint(prepared, {0: worker})
    assert loaded is not None
    return prepared, worker, loaded


def test_resumed_fit_ends_with_the_same_adapters(train_checkpoint, examples_data, tmp_path):
    jobs = specs(examples_data)
    want_worker, want_progress = straight_run(train_checkpoint, tmp_path / "straight", jobs)
    out = tmp_path / "run"
    interrupted_run(train_checkpoint, out, jobs, rounds=3)  # arith (3 steps) is finished, greet is not
    prepared, worker, (counter, progress) = resume(train_checkpoint, out, jobs)
    assert counter == 3 and progress["arith"].step == 3 and progress["greet"].step == 3
    for _ in range(counter, 5):
        train_round(worker, prepared, progress)
    for job in prepared.jobs:
        assert_bit_identical(worker, want_worker, job.name)
        assert progress[job.name] == want_progress[job.name]
    manifest = json.loads((checkpoint_dir(out, 3 + 3) / "manifest.json").read_text())  # named by both jobs' steps
    assert manifest["jobs"] == {"greet": {"status": "active", "stages": 1}, "arith": {"status": "finished", "stages": 1}}
    record = json.loads((checkpoint_dir(out, 3 + 3) / "jobs" / "greet" / "driver.json").read_text())
    assert record["position"]["next_sample_indices"] == [int(i) for i in prepared.jobs[0].stream.batch(3)]


def test_failed_job_resumes_as_failed(train_checkpoint, examples_data, tmp_path):
    out = tmp_path / "run"
    jobs = specs(examples_data)
    prepared = prepare(train_checkpoint, out, jobs)
    worker, progress = make_worker(prepared), fresh_progress(prepared)
    train_round(worker, prepared, progress)
    progress["arith"].error = "loss became nan at step 2; the job was stopped"
    worker.remove_job("arith")
    save_checkpoint(prepared, 1, {0: worker}, progress)
    assert not list((checkpoint_dir(out, 1 + 1) / "jobs" / "arith").glob("stage-*"))
    prepared, fresh, (_, loaded) = resume(train_checkpoint, out, jobs)
    assert loaded["arith"] == progress["arith"] and "arith" not in fresh.optimizers
    assert_bit_identical(fresh, worker, "greet")


def test_keeps_the_last_checkpoints_and_replaces_a_repeated_one(train_checkpoint, examples_data, tmp_path):
    out = tmp_path / "run"
    prepared = interrupted_run(train_checkpoint, out, specs(examples_data), rounds=4, keep_checkpoints=2)
    # steps of greet + arith (3 steps, then finished) after rounds 3 and 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000007"]
    worker = make_worker(prepared)
    progress = load_checkpoint(prepared, {0: worker})[1]
    save_checkpoint(prepared, 4, {0: worker}, progress)  # e.g. the end-of-fit save right after a periodic one
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000007"]
    assert load_checkpoint(prepared, {0: make_worker(prepared)})[0] == 4


def test_crash_before_the_manifest_leaves_the_previous_checkpoint(train_checkpoint, examples_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    jobs = specs(examples_data)
    prepared = interrupted_run(train_checkpoint, out, jobs, rounds=1)
    worker, progress = make_worker(prepared), fresh_progress(prepared)
    train_round(worker, prepared, progress)
    train_round(worker, prepared, progress)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the shards and the manifest")

    monkeypatch.setattr("lorafusion.checkpoint.resume.finalize_checkpoint", crash)  # after every shard and driver record
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(prepared, 2, {0: worker}, progress)
    monkeypatch.undo()
    assert (out / "checkpoints" / ".step-00000004.partial" / "jobs" / "greet" / "stage-0.safetensors").is_file()
    (out / "checkpoints" / "step-00000005" / "greet").mkdir(parents=True)  # a folder without manifest
    assert latest_checkpoint(out) == checkpoint_dir(out, 2)
    _, _, (counter, loaded) = resume(train_checkpoint, out, jobs)
    assert counter == 1 and loaded["greet"].step == 1
    removed = prune_checkpoints(out, keep=2)
    assert {p.name for p in removed} == {".step-00000004.partial", "step-00000005"}


def test_a_checkpoint_of_an_older_lorafusion_resumes_and_is_pruned_first(train_checkpoint, examples_data, tmp_path):
    """Format 1 (before checkpoints were named by step) named its folder by the window counter and held that counter
    as "step": it resumes as saved, and sorts before every newer checkpoint, so a larger number in its name neither
    makes it the latest nor keeps it when keep_checkpoints prunes."""
    out = tmp_path / "run"
    jobs = specs(examples_data)
    interrupted_run(train_checkpoint, out, jobs, rounds=2, keep_checkpoints=1)
    new, old = checkpoint_dir(out, 2 + 2), checkpoint_dir(out, 9)  # as if the older lorafusion had counted 9 windows
    manifest = {k: v for k, v in json.loads((new / "manifest.json").read_text()).items() if k != "windows"}
    (new / "manifest.json").write_text(json.dumps({**manifest, "format": "lorafusion-checkpoint/1", "step": 9}))
    new.rename(old)
    prepared, worker, (windows, progress) = resume(train_checkpoint, out, jobs, keep_checkpoints=1)
    assert windows == 9 and progress["greet"].step == progress["arith"].step == 2
    train_round(worker, prepared, progress)
    path = save_checkpoint(prepared, windows + 1, {0: worker}, progress)
    assert path == checkpoint_dir(out, 3 + 3) == latest_checkpoint(out) and not old.exists()


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": ("jobs/greet/stage-0.safetensors", _truncate, "bytes"),
    "flipped byte in shard": ("jobs/greet/stage-0.safetensors", _flip_byte, "sha256"),
    "missing driver file": ("jobs/arith/driver.json", Path.unlink, "is missing"),
    "manifest not JSON": ("manifest.json", _truncate, "cannot be read"),
}


@pytest.fixture(scope="module")
def saved_run(train_checkpoint, examples_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "run"
    interrupted_run(train_checkpoint, out, specs(examples_data), rounds=1)
    return out


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_names_the_file_and_the_fix(saved_run, train_checkpoint, examples_data, tmp_path, case):
    out = Path(shutil.copytree(saved_run, tmp_path / "run"))
    rel, damage, words = DAMAGE[case]
    damage(checkpoint_dir(out, 2) / rel)
    prepared = prepare(train_checkpoint, out, specs(examples_data))
    with pytest.raises(ValueError) as err:
        load_checkpoint(prepared, {0: make_worker(prepared)})
    message = str(err.value)
    assert str(checkpoint_dir(out, 2) / rel) in message and words in message
    assert f"delete '{checkpoint_dir(out, 2)}'" in message and "run.overwrite=true" in message


def test_shards_of_two_stages_are_merged_and_checked(saved_run, train_checkpoint, examples_data, tmp_path):
    """A two-stage run writes one shard per stage; each half of the parameters here plays one stage."""
    out = Path(shutil.copytree(saved_run, tmp_path / "run"))
    prepared = prepare(train_checkpoint, out, specs(examples_data))
    whole = make_worker(prepared)
    _, progress = load_checkpoint(prepared, {0: whole})
    halves = []
    for part in (0, 1):
        states = {}
        for job in prepared.jobs:
            state = whole.job_state(job.name)
            names = [n for n in state["params"] if n.startswith("layers.0.") == (part == 0)]
            states[job.name] = {"step_count": state["step_count"], "params": {n: state["params"][n] for n in names},
                                "optimizer": {n: state["optimizer"][n] for n in names}}
        halves.append(states)

    def save_two_stages(counter: int, second: dict) -> None:
        staging = begin_checkpoint(out, checkpoint_step(progress))
        write_stage_shard(staging, 0, halves[0])
        write_stage_shard(staging, 1, second)
        commit_checkpoint(prepared, staging, counter, progress, num_stages=2)

    save_two_stages(2, halves[1])
    merged = make_worker(prepared)
    assert load_checkpoint(prepared, {0: merged})[0] == 2
    for job in prepared.jobs:
        assert_bit_identical(merged, whole, job.name)
    save_two_stages(3, halves[0])  # stage 1 wrote stage 0's parameters again
    with pytest.raises(ValueError, match="repeats parameter 'layers.0."):
        load_checkpoint(prepared, {0: make_worker(prepared)})


# ----------------------------------------------------------------------------- resuming another run


def test_resume_with_other_settings_names_what_differs(saved_run, train_checkpoint, examples_data, tmp_path):
    out = Path(shutil.copytree(saved_run, tmp_path / "run"))
    jobs = specs(examples_data)
    jobs[1] = dataclasses.replace(jobs[1], learning_rate=5e-3)
    with pytest.raises(ValueError) as err:
        prepare_run(jobs, lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out),
                                       max_tokens_per_microbatch=CAPACITY))
    assert "job 'arith' learning_rate: 0.002 before, 0.005 now" in str(err.value)
    assert "overwrite" in str(err.value)
    # The checkpoint's own record is checked too (here run.json was rewritten to the new settings).
    prepared = prepare(train_checkpoint, tmp_path / "elsewhere", jobs)
    prepared = dataclasses.replace(prepared, run=dataclasses.replace(prepared.run, output_dir=str(out)))
    with pytest.raises(ValueError, match=r"was taken with other settings: job 'arith' learning_rate"):
        load_checkpoint(prepared, {0: make_worker(prepared)})


def test_resume_may_change_logging_and_checkpoint_settings(saved_run, train_checkpoint, examples_data, tmp_path):
    out = Path(shutil.copytree(saved_run, tmp_path / "run"))
    _, _, (counter, _) = resume(train_checkpoint, out, specs(examples_data), log_every_steps=7,
                                checkpoint_every_steps=3, keep_checkpoints=5)
    assert counter == 1


def test_resume_off_or_overwrite_starts_from_scratch(saved_run, train_checkpoint, examples_data, tmp_path):
    out = Path(shutil.copytree(saved_run, tmp_path / "run"))
    with pytest.raises(ValueError, match="already holds another run"):
        prepare(train_checkpoint, out, specs(examples_data), resume=False)
    prepared = prepare(train_checkpoint, out, specs(examples_data), overwrite=True)
    assert load_checkpoint(prepared, {0: make_worker(prepared)}) is None


def test_dataset_edited_since_the_checkpoint_is_refused(train_checkpoint, examples_data, tmp_path):
    data = tmp_path / "greet.jsonl"
    shutil.copy(examples_data / "greet.jsonl", data)
    out = tmp_path / "run"
    interrupted_run(train_checkpoint, out, specs(examples_data, data), rounds=1)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-2]) + "\n")
    prepared = prepare(train_checkpoint, out, specs(examples_data, data))
    with pytest.raises(ValueError, match=rf"{len(lines)} samples in dataset '{data}', it now has {len(lines) - 2}"):
        load_checkpoint(prepared, {0: make_worker(prepared)})
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same count, other order
    prepared = prepare(train_checkpoint, out, specs(examples_data, data))
    with pytest.raises(ValueError, match="other tokenised samples"):
        load_checkpoint(prepared, {0: make_worker(prepared)})


def test_trim_metrics_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "job" / "metrics.jsonl"
    path.parent.mkdir()
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}, {"step": 3, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')  # cut short by a crash
    trim_metrics(tmp_path, "job", 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]


def test_any_job_name_round_trips_through_the_files(tmp_path):
    """Job folders live under jobs/, so a job may be named like a checkpoint file; tensors come back exactly."""
    state = {"step_count": 2, "params": {"layers.0.w": torch.randn(3, 2), "layers.0.v": torch.randn(4)},
             "optimizer": {"layers.0.w": {"step": torch.tensor(2.0), "exp_avg": torch.randn(3, 2)}, "layers.0.v": {}}}
    staging = begin_checkpoint(tmp_path, 7)
    write_stage_shard(staging, 0, {"manifest.json": state})
    write_driver_state(staging, "manifest.json", {"job": "manifest.json", "step": 2})
    path = finalize_checkpoint(staging, step=7, windows=3, config={},
                               jobs={"manifest.json": {"status": "active", "stages": 1}})
    assert path == checkpoint_dir(tmp_path, 7) == latest_checkpoint(tmp_path) and not staging.exists()
    back = read_stage_state(path, "manifest.json", read_manifest(path))
    assert back["step_count"] == 2 and back["optimizer"]["layers.0.v"] == {}
    assert all(torch.equal(back["params"][k], v) for k, v in state["params"].items())
    assert torch.equal(back["optimizer"]["layers.0.w"]["exp_avg"], state["optimizer"]["layers.0.w"]["exp_avg"])
    assert read_driver_state(path, "manifest.json")["step"] == 2


def test_each_variant_resumes_to_the_same_adapter(train_checkpoint, examples_data, tmp_path):
    """A mixed-variant run checkpointed after 2 rounds and resumed ends bit-identical to the straight run, for
    every variant (trainable tensors shared by the job's layers included: Uni-LoRA's θ; frozen state too:
    LoRA-GA's offset, which only its init pass computes)."""
    two = ["q_proj", "down_proj"]
    adapters = [lf.DoRAConfig(rank=2, dropout=0.1), lf.VeRAConfig(rank=8, target_modules=two),
                lf.RandLoRAConfig(rank=16, target_modules=["v_proj"]), lf.SHiRAConfig(rank=1),
                lf.UniLoRAConfig(rank=2, theta_dim=128), lf.LoRAGAConfig(rank=2, init_batches=2),
                # adapter variants II
                lf.LoRASBConfig(rank=2, init_batches=2, target_modules=two),
                lf.DyLoRAConfig(rank=4, target_modules=two), lf.MatryoshkaLoRAConfig(train_ranks=[1, 2, 4]),
                lf.BlockLoRAConfig(rank=4, blocks=2, target_modules=two), lf.PaCAConfig(rank=2, target_modules=two),
                lf.LoLDUConfig(rank=2, target_modules=two), lf.HydraConfig(rank=2, target_modules=two),
                lf.TeRAConfig(rank=2, target_modules=two),
                lf.LoRASqueezeConfig(rank=4, target_rank=2, squeeze_start_step=2, squeeze_end_step=4,
                                     target_modules=two)]
    jobs = [lf.JobSpec(name=a.type, dataset=str(examples_data / ("greet.jsonl" if i % 2 else "arith.jsonl")),
                       adapter=a, global_batch_size=3, learning_rate=1e-3, max_steps=5, seed=i, lr_schedule="cosine")
            for i, a in enumerate(adapters)]
    assert_resume_is_exact(train_checkpoint, tmp_path, jobs, steps=5)


def assert_resume_is_exact(checkpoint: Path, tmp_path: Path, jobs: list[lf.JobSpec], steps: int,
                           on_resume=None) -> StageWorker:
    """Checkpointed after 2 rounds and resumed, every job ends bit-identical to the straight run of `steps`;
    `on_resume(worker)` checks the resumed worker before it trains on. Returns the resumed worker."""
    want_worker, want_progress = straight_run(checkpoint, tmp_path / "straight", jobs)
    out = tmp_path / "run"
    interrupted_run(checkpoint, out, jobs, rounds=2)
    prepared, worker, (counter, progress) = resume(checkpoint, out, jobs)
    assert counter == 2
    if on_resume is not None:
        on_resume(worker)
    for _ in range(counter, steps):
        train_round(worker, prepared, progress)
    for job in prepared.jobs:
        assert_bit_identical(worker, want_worker, job.name)
        assert progress[job.name] == want_progress[job.name]
    return worker


def test_crash_while_saving_the_same_step_again_keeps_the_old_checkpoint(train_checkpoint, examples_data, tmp_path,
                                                                            monkeypatch):
    """The same step saved again (as at the end right after a periodic save) with a crash between moving the old
    checkpoint aside and putting the new one in place: the old one is still found, and resumes exactly."""
    import lorafusion.checkpoint.files as checkpointing

    out = tmp_path / "run"
    prepared = prepare(train_checkpoint, out, specs(examples_data), keep_checkpoints=1)
    worker, progress = make_worker(prepared), fresh_progress(prepared)
    train_round(worker, prepared, progress)
    save_checkpoint(prepared, 1, {0: worker}, progress)
    real_replace = checkpointing.os.replace

    def crash_on_second(src, dst):  # the staged checkpoint's rename into place, once the old one is aside
        if Path(src).name.endswith(".partial") and (out / "checkpoints" / ".step-00000002.old").exists():
            raise OSError("simulated crash between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(prepared, 1, {0: worker}, progress)
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    assert not checkpoint_dir(out, 2).exists()
    found = latest_checkpoint(out)
    assert found is not None and found.name == ".step-00000002.old"
    fresh = make_worker(prepared)
    counter, _ = load_checkpoint(prepared, {0: fresh})
    assert counter == 1
    for job in prepared.jobs:
        assert_bit_identical(fresh, worker, job.name)
    # the next save of that step puts a complete one back in place and clears the old one away
    save_checkpoint(prepared, 1, {0: worker}, progress)
    assert latest_checkpoint(out) == checkpoint_dir(out, 2)
    assert not (out / "checkpoints" / ".step-00000002.old").exists()


def test_exported_adapter_is_flushed_to_disk_before_it_replaces_the_old(tmp_path, monkeypatch):
    import lorafusion.checkpoint.durable as durable
    from lorafusion.adapter_io import write_peft_adapter

    synced = []
    real = durable.fsync_path
    monkeypatch.setattr(durable, "fsync_path", lambda path: synced.append(Path(path).name) or real(path))
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2)}
    config = lf.LoRAConfig(rank=2, target_modules=["q_proj"])
    write_peft_adapter(tmp_path / "job" / "adapter", tensors, config, base_model="base")
    synced.clear()
    write_peft_adapter(tmp_path / "job" / "adapter", tensors, config, base_model="base")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(synced)  # the files
    assert synced.index("adapter_config.json") < synced.index("job")  # ... before the rename is made durable
    assert any(name.startswith(".adapter.tmp-") for name in synced)  # the new folder's entries
