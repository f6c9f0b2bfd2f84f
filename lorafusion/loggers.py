"""Optional experiment loggers (`run.loggers`): each job's metrics.jsonl records also go to TensorBoard, Weights &
Biases and/or MLflow, through their own libraries, from the driver only.

Where each one writes when nothing else is configured (all local, no account needed):
- tensorboard: <output_dir>/tensorboard/<job>/ (event files; `tensorboard --logdir <output_dir>/tensorboard`);
- wandb: one run per job in project $WANDB_PROJECT (default "lorafusion"), files under <output_dir>/wandb/;
  WANDB_MODE=offline keeps it local (`wandb sync` uploads it later);
- mlflow: one run per job in experiment $MLFLOW_EXPERIMENT_NAME (default "lorafusion") at $MLFLOW_TRACKING_URI,
  default sqlite:///<output_dir>/mlflow.db (`mlflow ui --backend-store-uri ...`).

A resumed fit continues each job's run where it stopped: wandb and MLflow runs are found again by an id derived
from (output_dir, job); TensorBoard starts a new event file that the viewer merges by step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["LOGGERS", "RunLoggers", "check_loggers"]

# logger name -> (module that must be importable, pip extra that installs it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}

_METRICS = ("loss", "lr", "tokens", "grad_norm", "eval_loss")


def check_loggers(loggers: Any) -> list[str]:
    """The validated `run.loggers` list (ValueError naming the bad entry, or the package to install)."""
    if isinstance(loggers, str):
        loggers = [loggers]
    if not isinstance(loggers, list) or not all(isinstance(name, str) for name in loggers):
        raise ValueError(f"run.loggers={loggers!r} must be a list of names, e.g. loggers: [tensorboard]; "
                         f"choose from {list(LOGGERS)}")
    for name in loggers:
        if name not in LOGGERS:
            raise ValueError(f"run.loggers has {name!r}; choose from {list(LOGGERS)}")
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"run.loggers has {name!r} but the {module} package is not installed; "
                             f"pip install 'lorafusion[{extra}]' (or remove it from run.loggers)")
    if len(set(loggers)) != len(loggers):
        raise ValueError(f"run.loggers={loggers} lists a logger twice; list each once")
    return list(loggers)


def _run_id(output_dir: str, job: str) -> str:
    """A stable id of one job's run in one output folder, so a resumed fit logs into the same run."""
    return hashlib.sha256(f"{Path(output_dir).resolve()}/{job}".encode()).hexdigest()[:16]


class _TensorBoard:
    def __init__(self, output_dir: str, jobs: list[str], config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writers = {job: SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard" / job)) for job in jobs}

    def log(self, job: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writers[job].add_scalar(key, value, step)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class _WandB:
    def __init__(self, output_dir: str, jobs: list[str], config: dict) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync hints would interleave the progress lines
        project = os.environ.get("WANDB_PROJECT", "lorafusion")
        self.runs = {job: wandb.init(project=project, name=job, id=_run_id(output_dir, job), resume="allow",
                                     dir=output_dir, group=Path(output_dir).name, config=config[job],
                                     reinit="create_new")
                     for job in jobs}

    def log(self, job: str, step: int, values: dict[str, float]) -> None:
        self.runs[job].log(values, step=step)

    def close(self) -> None:
        for run in self.runs.values():
            run.finish()


class _MLflow:
    def __init__(self, output_dir: str, jobs: list[str], config: dict) -> None:
        for name in ("mlflow", "alembic"):  # database set-up notes at INFO on every start
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorafusion")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.runs = {job: self._run(experiment_id, output_dir, job, config[job]) for job in jobs}

    def _run(self, experiment_id: str, output_dir: str, job: str, params: dict) -> str:
        tag = _run_id(output_dir, job)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.lorafusion_run = '{tag}'")
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run_id = self.client.create_run(experiment_id, run_name=job, tags={"lorafusion_run": tag}).info.run_id
        for key, value in params.items():
            self.client.log_param(run_id, key, str(value)[:6000])
        return run_id

    def log(self, job: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.client.log_metric(self.runs[job], key, value, step=step)

    def close(self) -> None:
        for run_id in self.runs.values():
            self.client.set_terminated(run_id)


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class RunLoggers:
    """The fit's loggers; `log(job, record)` takes a metrics.jsonl record ({"step", "loss", ...})."""

    def __init__(self, names: list[str], output_dir: str, job_configs: dict[str, dict]) -> None:
        """job_configs: job -> its settings (logged as the run's config/params where the logger has them)."""
        self.loggers = []
        try:
            for name in names:
                self.loggers.append(_CLASSES[name](output_dir, list(job_configs), job_configs))
        except BaseException:
            self.close()
            raise

    def log(self, job: str, record: dict[str, Any]) -> None:
        values = {key: float(record[key]) for key in _METRICS if isinstance(record.get(key), (int, float))}
        if values and "step" in record:
            for logger in self.loggers:
                logger.log(job, int(record["step"]), values)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []
