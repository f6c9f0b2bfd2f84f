"""`lorafusion report <output_dir>`: loss curves and a throughput summary of a finished (or running) fit.

Reads what a fit writes: `run.json` (which jobs), `<job>/metrics.jsonl` (train lines
{"step", "loss", "lr", "tokens", "grad_norm", "time_s"} and eval lines {"step", "eval_loss", "eval_tokens"})
and, when the runtime wrote it, `run_metrics.json` (wall time, real tokens/s, microbatches/s, bubble
fraction, peak memory, each job's optimizer state, per-stage and GPU figures). Writes
`<output_dir>/report/loss_<job>.png`, `report/loss.png` and `report/summary.md`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafusion.checkpoint import RUN_MANIFEST

__all__ = ["REPORT_DIR", "JobMetrics", "RunReport", "load_run", "read_job_metrics", "render_summary", "write_report"]

RUN_METRICS = "run_metrics.json"
REPORT_DIR = "report"
_TRAIN_KEYS = ("step", "loss", "tokens", "time_s")
_EVAL_KEYS = ("step", "eval_loss")


@dataclass
class JobMetrics:
    """One job's metrics.jsonl, split into train and eval points."""

    name: str
    train: list[dict[str, float]] = field(default_factory=list)
    """Train lines in file order: step, loss, tokens, time_s (and lr, grad_norm when present)."""
    evals: list[dict[str, float]] = field(default_factory=list)
    """Eval lines in file order: step, eval_loss."""

    @property
    def steps(self) -> int:
        return max((int(p["step"]) for p in self.train), default=0)

    @property
    def tokens(self) -> int:
        return int(sum(p["tokens"] for p in self.train))

    @property
    def first_loss(self) -> float | None:
        return self.train[0]["loss"] if self.train else None

    @property
    def final_loss(self) -> float | None:
        return self.train[-1]["loss"] if self.train else None

    @property
    def best_eval_loss(self) -> float | None:
        finite = [p["eval_loss"] for p in self.evals if math.isfinite(p["eval_loss"])]
        return min(finite) if finite else None

    @property
    def elapsed_s(self) -> float | None:
        """Seconds from the fit's start to this job's last step (time_s is measured from the fit's start)."""
        return self.train[-1]["time_s"] if self.train else None

    @property
    def tokens_per_s(self) -> float | None:
        """This job's tokens over the time it took to finish; jobs trained together share the machine."""
        elapsed = self.elapsed_s
        return self.tokens / elapsed if elapsed else None


@dataclass
class RunReport:
    """Everything the report shows about one output directory."""

    output_dir: Path
    jobs: list[JobMetrics]
    run_metrics: dict[str, Any] | None
    """The runtime's run_metrics.json, or None when this fit did not write one."""

    @property
    def wall_time_s(self) -> float | None:
        if self.run_metrics and self.run_metrics.get("wall_time_s") is not None:
            return float(self.run_metrics["wall_time_s"])
        times = [j.elapsed_s for j in self.jobs if j.elapsed_s is not None]
        return max(times) if times else None

    @property
    def tokens(self) -> int:
        return sum(j.tokens for j in self.jobs)

    @property
    def tokens_per_s(self) -> float | None:
        if self.run_metrics and self.run_metrics.get("tokens_per_s") is not None:
            return float(self.run_metrics["tokens_per_s"])
        wall = self.wall_time_s
        return self.tokens / wall if wall else None

    def run_value(self, key: str) -> Any:
        return None if self.run_metrics is None else self.run_metrics.get(key)


def _job_names(output_dir: Path) -> list[str]:
    manifest_path = output_dir / RUN_MANIFEST
    if not output_dir.is_dir() or not manifest_path.is_file():
        raise ValueError(
            f"'{output_dir}' is not a fit output directory: expected {RUN_MANIFEST} and <job>/metrics.jsonl "
            "in it (the run.output_dir of `lorafusion train` or lf.fit); pass that directory"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path}: not valid JSON ({err}); it should be the manifest a fit writes") from None
    jobs = manifest.get("jobs") if isinstance(manifest, dict) else None
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and isinstance(j.get("name"), str) for j in jobs):
        raise ValueError(f"{manifest_path}: expected an object with \"jobs\": [{{\"name\": ...}}, ...]; "
                         "it should be the manifest a fit writes")
    return [j["name"] for j in jobs]


def _number(record: dict, key: str, where: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: \"{key}\" is {value!r}, expected a number; fix or delete that line")
    return float(value)


def _parse_line(text: str, where: str) -> tuple[str, dict[str, float]]:
    """('train' | 'eval', point) for one metrics line; ValueError naming `where` (file:line) otherwise."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); fix or delete that line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}; fix or delete that line")
    kind, keys = ("eval", _EVAL_KEYS) if "eval_loss" in record else ("train", _TRAIN_KEYS)
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: a {kind} line needs {list(keys)} but lacks {missing}; fix or delete that line")
    point = {k: _number(record, k, where) for k in keys}
    for extra in ("lr", "grad_norm"):
        if kind == "train" and extra in record:
            point[extra] = _number(record, extra, where)
    return kind, point


def read_job_metrics(path: Path, name: str) -> JobMetrics:
    """One job's metrics.jsonl (ValueError naming the file and line of anything malformed)."""
    if not path.is_file():
        raise ValueError(f"{path}: missing; run.json lists job '{name}' and every fit writes <job>/metrics.jsonl")
    job = JobMetrics(name=name)
    with path.open() as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            kind, point = _parse_line(text, f"{path}:{number}")
            (job.evals if kind == "eval" else job.train).append(point)
    return job


def _read_run_metrics(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / RUN_METRICS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it to report without run metrics") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; delete it to report "
                         "without run metrics")
    return data


def load_run(output_dir: str | Path) -> RunReport:
    """Read a fit's output directory; ValueError when it is not one or a metrics line is malformed."""
    out = Path(output_dir)
    jobs = [read_job_metrics(out / name / "metrics.jsonl", name) for name in _job_names(out)]
    return RunReport(output_dir=out, jobs=jobs, run_metrics=_read_run_metrics(out))


def _fmt(value: Any, spec: str = ".4f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def _fmt_bytes(value: Any) -> str:
    if value is None:
        return "n/a"
    value, unit = float(value), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _fmt_fraction(value: Any) -> str:
    return "not measured" if value is None else f"{100 * float(value):.1f}%"


def _run_rows(report: RunReport) -> list[tuple[str, str]]:
    rows = [
        ("wall time", _fmt(report.wall_time_s, ".1f", " s")),
        ("tokens (real, unpadded)", str(report.tokens)),
        ("tokens/s (all jobs, real)", _fmt(report.tokens_per_s, ".0f")),
        ("microbatches", _fmt(report.run_value("microbatches"), ".0f")),
        ("microbatches/s", _fmt(report.run_value("microbatches_per_s"), ".2f")),
        ("bubble fraction (mean of stages)", _fmt_fraction(report.run_value("bubble_fraction"))),
        ("peak memory", _fmt_bytes(report.run_value("peak_memory_bytes"))),
    ]
    gpu = report.run_value("gpu")
    if isinstance(gpu, dict):
        rows += [(f"gpu {key}", str(value)) for key, value in gpu.items()]
    if report.run_metrics is None:
        rows.append(("run metrics", f"no {RUN_METRICS} in this output directory; totals are from metrics.jsonl"))
    return rows


def _stage_table(stages: Any) -> list[str]:
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        return []
    keys = list(dict.fromkeys(k for s in stages for k in s))
    lines = ["", "## Stages", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(s.get(k, "")) for k in keys) + " |" for s in stages]
    return lines


def render_summary(report: RunReport) -> str:
    """The summary as Markdown: one row per job, then the run's throughput figures."""
    lines = [f"# Fit report: {report.output_dir}", "", "## Jobs", "",
             "| job | steps | final loss (nats/token) | best eval loss (nats/token) | tokens (real) "
             "| job tokens/s (its tokens ÷ seconds to its last step) | optimizer state |", "|---|---|---|---|---|---|---|"]
    state_bytes = report.run_value("optimizer_state_bytes")
    state_bytes = state_bytes if isinstance(state_bytes, dict) else {}
    for job in report.jobs:
        lines.append(f"| {job.name} | {job.steps} | {_fmt(job.final_loss)} | {_fmt(job.best_eval_loss)} | "
                     f"{job.tokens} | {_fmt(job.tokens_per_s, '.0f')} | {_fmt_bytes(state_bytes.get(job.name))} |")
    lines += ["", "## Run", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _run_rows(report)]
    lines += _stage_table(report.run_value("stages"))
    return "\n".join(lines) + "\n"


def _plot_job(axes, job: JobMetrics, color: str | None = None, label_prefix: str = "") -> None:
    if job.train:
        axes.plot([p["step"] for p in job.train], [p["loss"] for p in job.train], color=color,
                  label=f"{label_prefix}train loss")
    if job.evals:
        axes.plot([p["step"] for p in job.evals], [p["eval_loss"] for p in job.evals], color=color,
                  linestyle="--", marker="o", label=f"{label_prefix}eval loss")


def _save_figure(draw, title: str, path: Path) -> None:
    # Figure + the Agg canvas directly: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    draw(axes)
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean over loss tokens)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_report(output_dir: str | Path) -> RunReport:
    """Write loss_<job>.png, loss.png and summary.md under <output_dir>/report; returns what was read."""
    report = load_run(output_dir)
    try:
        import matplotlib  # noqa: F401  (checked before anything is written)
    except ImportError as err:
        raise RuntimeError("lorafusion report draws its loss curves with matplotlib, which is not installed: "
                           "pip install 'lorafusion[report]'") from err
    folder = report.output_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    for job in report.jobs:
        _save_figure(lambda ax, job=job: _plot_job(ax, job), f"{job.name}", folder / f"loss_{job.name}.png")

    def draw_all(axes) -> None:
        colors = [f"C{i % 10}" for i in range(len(report.jobs))]
        for job, color in zip(report.jobs, colors):
            _plot_job(axes, job, color=color, label_prefix=f"{job.name} ")

    _save_figure(draw_all, "all jobs", folder / "loss.png")
    (folder / "summary.md").write_text(render_summary(report))
    return report
