"""run.loggers: TensorBoard, Weights & Biases (offline) and MLflow (local database) get every job's metrics, the
same numbers as metrics.jsonl; a resumed fit logs into the same runs; bad names and missing packages are errors
before anything runs."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import lorafusion as lf
from lorafusion.loggers import RunLoggers, _run_id


def _jobs(examples_data: Path, steps: int) -> list[lf.JobSpec]:
    return [lf.JobSpec(name=name, dataset=str(examples_data / f"{name}.jsonl"), adapter=lf.LoRAConfig(rank=2),
                       global_batch_size=2, learning_rate=1e-3, max_steps=steps, seed=i)
            for i, name in enumerate(("greet", "arith"))]


def _run(checkpoint: Path, out: Path, **fields) -> lf.RunConfig:
    return lf.RunConfig(base_model=str(checkpoint), output_dir=str(out), max_tokens_per_microbatch=256,
                        dtype="float32", engine="local", progress=False,
                        checkpoint_every_steps=1, loggers=["tensorboard", "wandb", "mlflow"], **fields)


def _jsonl_losses(out: Path, job: str) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / job / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _tensorboard_losses(out: Path, job: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / job))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss")}


def _mlflow_runs(out: Path) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lorafusion")
    runs = client.search_runs([experiment.experiment_id])
    return {r.info.run_name: {m.step: m.value for m in client.get_metric_history(r.info.run_id, "loss")} for r in runs}


def test_every_logger_gets_the_metrics_and_a_resume_continues_its_runs(train_checkpoint, examples_data, tmp_path,
                                                                         monkeypatch):
    for package in ("tensorboard", "wandb", "mlflow"):  # CI installs all three (requirements-ci.txt)
        pytest.importorskip(package)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    monkeypatch.setattr(importlib.import_module("runtime.fit"), "_MAX_STEPS_PER_WINDOW", 1)  # a checkpoint per step
    real_log = RunLoggers.log

    def interrupted_after_step_2(self, job, record):
        real_log(self, job, record)
        if job == "arith" and record.get("step") == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunLoggers, "log", interrupted_after_step_2)
        with pytest.raises(KeyboardInterrupt):
            lf.fit(_jobs(examples_data, 3), _run(train_checkpoint, out))
    lf.fit(_jobs(examples_data, 3), _run(train_checkpoint, out))  # resumes from the last checkpoint
    mlflow_runs = _mlflow_runs(out)
    assert sorted(mlflow_runs) == ["arith", "greet"]  # one run per job, continued by the resumed fit
    for job in ("greet", "arith"):
        want = _jsonl_losses(out, job)
        assert sorted(want) == [1, 2, 3]
        assert _tensorboard_losses(out, job) == pytest.approx(want)
        assert mlflow_runs[job] == pytest.approx(want)
        offline = list((out / "wandb").glob(f"offline-run-*-{_run_id(str(out), job)}"))
        assert len(offline) == 2 and all((d / f"run-{_run_id(str(out), job)}.wandb").is_file() for d in offline)


@pytest.mark.parametrize("loggers, message", [
    (["tensorbord"], "run.loggers has 'tensorbord'; choose from ['tensorboard', 'wandb', 'mlflow']"),
    ("mlflow, wandb", "run.loggers has 'mlflow, wandb'"),
    ([1], "run.loggers=[1] must be a list of names"),
    (["wandb", "wandb"], "lists a logger twice"),
])
def test_bad_logger_names_are_errors(loggers, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lf.RunConfig(base_model="m", output_dir=str(tmp_path), loggers=loggers)


def test_a_missing_logger_package_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"the wandb package is not installed; pip install 'lorafusion\[wandb\]'"):
        lf.RunConfig(base_model="m", output_dir=str(tmp_path), loggers=["wandb"])
