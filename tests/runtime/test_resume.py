"""A fit interrupted mid-run ends with the same adapters as one that never stopped: after its driver is
killed and it is started again (resume), and after a stage actor dies (the driver restarts the group)."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import yaml
from safetensors.torch import load_file

import lorafusion as lf
from runtime.backend import ACTOR_PREFIX
from runtime.engine import StageLost
from lorafusion.checkpoint import read_driver_state, read_manifest

pytestmark = pytest.mark.usefixtures("ray_session")
STEPS = 24  # windows take ~0.1 s here: enough of them that the interruption lands mid-run
LAST = f"step-{STEPS + STEPS - 2:08d}"  # the last checkpoint: named by both jobs' steps summed


def jobs(examples_data: Path) -> list[lf.JobSpec]:
    return [
        lf.JobSpec(name="greet", dataset=str(examples_data / "greet.jsonl"),
                   adapter=lf.LoRAConfig(rank=4, alpha=8, dropout=0.1), global_batch_size=3, learning_rate=1e-3,
                   max_steps=STEPS, seed=1, lr_schedule="cosine", warmup_steps=2),
        lf.JobSpec(name="arith", dataset=str(examples_data / "arith.jsonl"), adapter=lf.LoRAConfig(rank=2),
                   global_batch_size=2, learning_rate=2e-3, max_steps=STEPS - 2, seed=2),
    ]


def run_config(checkpoint: Path, out: Path, **fields) -> lf.RunConfig:
    fields = {"progress": False, **fields}
    return lf.RunConfig(base_model=str(checkpoint), output_dir=str(out), max_tokens_per_microbatch=256,
                        checkpoint_every_steps=1, dtype="float32", **fields)


def adapters(out: Path) -> dict[str, dict]:
    return {name: load_file(str(out / name / "adapter" / "adapter_model.safetensors")) for name in ("greet", "arith")}


def assert_same(got: dict, want: dict) -> None:
    for name in want:
        assert got[name].keys() == want[name].keys()
        for key in want[name]:
            assert (got[name][key] == want[name][key]).all(), f"{name}: {key} differs from the uninterrupted fit"


@pytest.fixture(scope="module")
def straight(train_checkpoint, examples_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run"
    lf.fit(jobs(examples_data), run_config(train_checkpoint, out))
    return {"adapters": adapters(out), "metrics": {n: (out / n / "metrics.jsonl").read_text() for n in ("greet", "arith")}}


def wait_for(predicate, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the fit"
        time.sleep(0.02)


def checkpoints(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []


def kill_driver_after_a_checkpoint(config: Path, out: Path, env_changes: dict[str, str | None]) -> None:
    """Run `lorafusion train config` as a user would, SIGKILL it once its first checkpoint is complete, and check
    that it was cut mid-run. env_changes: variables to set (None: to remove) for the driver."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    driver = subprocess.Popen([sys.executable, "-m", "lorafusion.cli", "train", str(config)], env=env, cwd=root)
    try:
        wait_for(lambda: checkpoints(out) or driver.poll() is not None)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, "the driver ended before it could be killed mid-run"
    done = checkpoints(out)
    assert done and done[-1] < LAST, f"killed too late to test a resume: {done}"


def test_killed_driver_resumes_to_the_same_adapters(straight, train_checkpoint, examples_data, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "jobs.yaml"  # the driver is `lorafusion train`, as a user runs it
    run = run_config(train_checkpoint, out).to_dict()
    config.write_text(yaml.safe_dump({"run": run, "jobs": [job.to_dict() for job in jobs(examples_data)]}))
    kill_driver_after_a_checkpoint(config, out, {"RAY_ADDRESS": ray.get_runtime_context().gcs_address})

    result = lf.fit(jobs(examples_data), run_config(train_checkpoint, out))
    assert all(job.status == "finished" for job in result.jobs.values())
    assert_same(adapters(out), straight["adapters"])
    for name, text in straight["metrics"].items():
        steps = [line.split(",")[0] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == [line.split(",")[0] for line in text.splitlines()], f"{name}: metrics lines lost or repeated"


def test_killed_in_process_fit_resumes_to_the_same_adapters(straight, train_checkpoint, examples_data, tmp_path):
    """run.engine 'local' (the stage in the driver's process, no Ray): killed mid-run and run again, it ends with
    the adapters of the uninterrupted fit on Ray actors, bit for bit."""
    out = tmp_path / "run"
    config = tmp_path / "jobs.yaml"
    run = run_config(train_checkpoint, out, engine="local").to_dict()
    config.write_text(yaml.safe_dump({"run": run, "jobs": [job.to_dict() for job in jobs(examples_data)]}))
    kill_driver_after_a_checkpoint(config, out, {"RAY_ADDRESS": None})
    result = lf.fit(jobs(examples_data), run_config(train_checkpoint, out, engine="local"))
    assert all(job.status == "finished" for job in result.jobs.values())
    assert_same(adapters(out), straight["adapters"])


def test_dead_stage_actor_restarts_from_the_checkpoint(straight, train_checkpoint, examples_data, tmp_path, capsys):
    out = tmp_path / "run"
    killed = []

    def kill_a_stage() -> None:
        wait_for(lambda: checkpoints(out))
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_PREFIX)
                 and a["name"].endswith("stage1-replica0")]
        killed.append(checkpoints(out)[-1])
        ray.kill(ray.get_actor(names[0], namespace=ray.get_runtime_context().namespace))

    killer = threading.Thread(target=kill_a_stage, daemon=True)
    killer.start()
    result = lf.fit(jobs(examples_data), run_config(train_checkpoint, out, pipeline_stages=2, progress=True))
    killer.join()
    assert killed and killed[0] < LAST, f"killed too late to test a restart: {killed}"
    printed = capsys.readouterr().out
    assert "a stage actor died" in printed and "restarting the stage group from checkpoint" in printed
    assert all(job.status == "finished" for job in result.jobs.values())
    assert_same(adapters(out), straight["adapters"])


def _session_members(session: int) -> dict[int, str]:
    """pid -> command line of every process of a session (read from /proc): what a process started with
    start_new_session leaves behind (Ray's processes stay in the session of the driver that started them)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[3]) == session:  # field 6: the session id
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
    return found


def interrupt_driver(config: Path, out: Path, env_changes: dict[str, str | None], sig: int) -> tuple[int, str, int]:
    """Run `lorafusion train config` in a session of its own, send `sig` to its whole process group (as a terminal
    does for Ctrl-C) once a few steps are done; its exit code, stderr and session id."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    for key, value in env_changes.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    driver = subprocess.Popen([sys.executable, "-m", "lorafusion.cli", "train", str(config)], env=env, cwd=root,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "greet" / "metrics.jsonl"
    try:
        wait_for(lambda: (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) or driver.poll() is not None)
        os.killpg(driver.pid, sig)
        _, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    return driver.returncode, stderr, driver.pid


@pytest.mark.parametrize("engine, sig", [("local", signal.SIGINT), ("ray", signal.SIGTERM)])
def test_signal_checkpoints_stops_everything_and_the_same_command_resumes(straight, train_checkpoint, examples_data,
                                                                          tmp_path, engine, sig):
    """Ctrl-C (SIGINT to the process group) or SIGTERM mid-run: the fit finishes the window in flight, writes a
    checkpoint where it stands, stops every process it started (its own Ray instance included), says where it
    stopped and exits 130/143; the same command then ends with the uninterrupted fit's adapters and metrics."""
    out = tmp_path / "run"
    config = tmp_path / "jobs.yaml"
    run = run_config(train_checkpoint, out, engine=engine).to_dict()
    config.write_text(yaml.safe_dump({"run": run, "jobs": [job.to_dict() for job in jobs(examples_data)]}))
    code, stderr, session = interrupt_driver(config, out, {"RAY_ADDRESS": None}, sig)
    assert code == 128 + sig, stderr[-3000:]
    name = signal.Signals(sig).name
    assert f"stopped by {name} at steps greet " in stderr and "run the same command again to resume" in stderr, stderr
    steps = int(stderr.split("at steps greet ")[1].split("/")[0])
    # The group's signal may reach a stage actor of the local Ray instance before the window in flight comes back:
    # the fit then stands where its last checkpoint does, which may be before the steps the test waited for.
    assert (1 if "a stage actor died" in stderr else 3) <= steps < STEPS, stderr
    assert read_driver_state(out / "checkpoints" / checkpoints(out)[-1], "greet")["step"] == steps  # where it stopped

    wait_for(lambda: not _session_members(session), timeout_s=10)  # nothing the fit started outlives it
    result = lf.fit(jobs(examples_data), run_config(train_checkpoint, out, engine=engine))
    assert all(job.status == "finished" for job in result.jobs.values())
    assert_same(adapters(out), straight["adapters"])
    for job, text in straight["metrics"].items():
        got = [line.split(",")[0] for line in (out / job / "metrics.jsonl").read_text().splitlines()]
        assert got == [line.split(",")[0] for line in text.splitlines()], f"{job}: metrics lines lost or repeated"


@pytest.mark.parametrize("checkpointed", [True, False])
def test_a_stage_lost_after_the_signal_stops_where_the_last_checkpoint_stands(straight, train_checkpoint, examples_data,
                                                                              tmp_path, monkeypatch, checkpointed):
    """When SIGTERM reaches a stage process before the window in flight comes back, the fit says the steps its last
    checkpoint holds (the work after it is lost; none without a checkpoint), exits 143 without restarting the group,
    and the same command then ends with the uninterrupted fit's adapters."""
    trainer_cls = importlib.import_module("runtime.fit")._Trainer
    real_checkpoint = trainer_cls.checkpoint
    lost = "a stage actor died (ActorDiedError: killed by the same signal)"

    def checkpoint_then_lose_a_stage(self):
        path = real_checkpoint(self) if checkpointed else None
        if not checkpointed or self.states["greet"].step >= 3:
            self.stop.signum = signal.SIGTERM  # what StopSignals records when the signal arrives
            raise StageLost(lost)
        return path

    monkeypatch.setattr(trainer_cls, "checkpoint", checkpoint_then_lose_a_stage)
    out = tmp_path / "run"
    with pytest.raises(lf.FitInterrupted) as stopped:
        lf.fit(jobs(examples_data), run_config(train_checkpoint, out, engine="local", max_restarts=2))
    assert stopped.value.exit_code == 143
    if checkpointed:
        last = out / "checkpoints" / checkpoints(out)[-1]
        greet, arith = (read_driver_state(last, name)["step"] for name in ("greet", "arith"))
        assert greet == 3
        assert stopped.value.message == (
            f"stopped by SIGTERM at steps greet 3/{STEPS}, arith {arith}/{STEPS - 2}, as checkpoint {last} holds them "
            f"(the work after it was lost: {lost}); run the same command again to resume from it")
    else:
        assert not checkpoints(out)
        assert stopped.value.message == (
            f"stopped by SIGTERM at steps greet 0/{STEPS}, arith 0/{STEPS - 2}: no checkpoint was written yet, so the "
            f"work done was lost ({lost}); set run.overwrite=true and run it again to start over")
    monkeypatch.undo()
    lf.fit(jobs(examples_data), run_config(train_checkpoint, out, engine="local", overwrite=not checkpointed))
    assert_same(adapters(out), straight["adapters"])


@pytest.mark.parametrize("every_s, expected", [(1e-9, "one per window"), (None, "one at the end")])
def test_checkpoints_on_a_time_interval(train_checkpoint, examples_data, tmp_path, monkeypatch, every_s, expected):
    """run.checkpoint_every_s: a checkpoint at the end of the first window after the interval has passed (here:
    every window), on top of the one at the end."""
    monkeypatch.setattr(importlib.import_module("runtime.fit"), "_MAX_STEPS_PER_WINDOW", 1)
    out = tmp_path / "run"
    short = [replace(job, max_steps=3) for job in jobs(examples_data)]
    run = replace(run_config(train_checkpoint, out, engine="local", checkpoint_every_s=every_s, keep_checkpoints=50),
                  checkpoint_every_steps=None)
    lf.fit(short, run)
    saved = checkpoints(out)
    windows = read_manifest(out / "checkpoints" / saved[-1], verify=False)["windows"]
    assert len(saved) == (windows if every_s else 1), saved
