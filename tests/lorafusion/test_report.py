"""`lorafusion report`: summary figures from fake output dirs (with and without run_metrics.json), clear
errors for non-run folders and malformed metrics lines, PNGs that decode, and one real tiny fit's output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorafusion.cli import main
from lorafusion.report import load_run, render_summary, write_report

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"

# Two jobs trained together: "sql" steps at t=1,2,4 s with 100 tokens per step; "chat" at t=3,5 s with
# 300 tokens per step and two evals (best 1.7).
SQL_LINES = [
    {"step": 1, "loss": 3.0, "lr": 1e-3, "tokens": 100, "grad_norm": 1.0, "time_s": 1.0},
    {"step": 2, "loss": 2.5, "lr": 1e-3, "tokens": 100, "grad_norm": 0.9, "time_s": 2.0},
    {"step": 3, "loss": 2.25, "lr": 1e-3, "tokens": 100, "grad_norm": 0.8, "time_s": 4.0},
]
CHAT_LINES = [
    {"step": 1, "loss": 4.0, "lr": 5e-4, "tokens": 300, "grad_norm": 2.0, "time_s": 3.0},
    {"step": 1, "eval_loss": 1.9, "eval_tokens": 50},
    {"step": 2, "loss": 3.5, "lr": 5e-4, "tokens": 300, "grad_norm": 1.5, "time_s": 5.0},
    {"step": 2, "eval_loss": 1.7, "eval_tokens": 50},
]
RUN_METRICS = {"wall_time_s": 6.0, "tokens_per_s": 150.0, "microbatches": 12, "microbatches_per_s": 2.0,
               "bubble_fraction": 0.125, "peak_memory_bytes": 3 * 1024**3,
               "optimizer_state_bytes": {"sql": 2 * 1024**2},
               "stages": [{"stage": 0, "busy_s": 5.0}, {"stage": 1, "busy_s": 4.5}],
               "gpu": {"name": "Fake GPU", "utilization_pct": 87}}


def _write_lines(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def _fake_run(root: Path, *, run_metrics: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps({"run": {"output_dir": str(root)},
                                               "jobs": [{"name": "sql"}, {"name": "chat"}]}))
    _write_lines(root / "sql" / "metrics.jsonl", SQL_LINES)
    _write_lines(root / "chat" / "metrics.jsonl", CHAT_LINES)
    if run_metrics is not None:
        (root / "run_metrics.json").write_text(json.dumps(run_metrics))
    return root


def _table_row(summary: str, first_cell: str) -> list[str]:
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row '{first_cell}' in:\n{summary}")


def test_job_figures_from_metrics(tmp_path):
    report = load_run(_fake_run(tmp_path / "out"))
    sql, chat = report.jobs
    assert [sql.name, chat.name] == ["sql", "chat"]
    assert (sql.steps, sql.final_loss, sql.best_eval_loss, sql.tokens) == (3, 2.25, None, 300)
    assert sql.tokens_per_s == pytest.approx(300 / 4.0)
    assert (chat.steps, chat.final_loss, chat.best_eval_loss, chat.tokens) == (2, 3.5, 1.7, 600)
    assert chat.tokens_per_s == pytest.approx(600 / 5.0)
    summary = render_summary(report)
    assert _table_row(summary, "sql")[1:] == ["3", "2.2500", "n/a", "300", "75", "n/a"]  # no run_metrics.json
    assert _table_row(summary, "chat")[1:] == ["2", "3.5000", "1.7000", "600", "120", "n/a"]
    # every figure says its unit; the per-job rate says it is the job's own
    assert _table_row(summary, "job")[1:] == ["steps", "final loss (nats/token)", "best eval loss (nats/token)",
                                              "tokens (real)", "job tokens/s (its tokens ÷ seconds to its last step)",
                                              "optimizer state"]


def test_run_figures_from_run_metrics(tmp_path):
    summary = render_summary(load_run(_fake_run(tmp_path / "out", run_metrics=RUN_METRICS)))
    assert _table_row(summary, "wall time")[1] == "6.0 s"
    assert _table_row(summary, "tokens/s (all jobs, real)")[1] == "150"  # the runtime's figure wins over metrics.jsonl
    assert _table_row(summary, "tokens (real, unpadded)")[1] == "900"
    assert _table_row(summary, "microbatches")[1] == "12"
    assert _table_row(summary, "microbatches/s")[1] == "2.00"
    assert _table_row(summary, "bubble fraction (mean of stages)")[1] == "12.5%"
    assert _table_row(summary, "peak memory")[1] == "3.0 GiB"
    assert _table_row(summary, "sql")[-1] == "2.0 MiB"  # the job's optimizer state
    assert _table_row(summary, "gpu utilization_pct")[1] == "87"
    assert _table_row(summary, "0")[1] == "5.0"  # stage table
    assert "no run_metrics.json" not in summary


def test_run_figures_without_run_metrics(tmp_path):
    summary = render_summary(load_run(_fake_run(tmp_path / "out")))
    assert _table_row(summary, "wall time")[1] == "5.0 s"  # the last step of any job
    assert _table_row(summary, "tokens/s (all jobs, real)")[1] == "180"  # 900 tokens / 5 s
    assert _table_row(summary, "microbatches/s")[1] == "n/a"
    assert _table_row(summary, "bubble fraction (mean of stages)")[1] == "not measured"
    assert _table_row(summary, "peak memory")[1] == "n/a"
    assert "no run_metrics.json" in summary


def test_bubble_null_is_not_measured(tmp_path):
    summary = render_summary(load_run(_fake_run(tmp_path / "out", run_metrics={**RUN_METRICS, "bubble_fraction": None,
                                                                                "stages": []})))
    assert _table_row(summary, "bubble fraction (mean of stages)")[1] == "not measured"
    assert "## Stages" not in summary


def test_write_report_files(tmp_path):
    from matplotlib.image import imread

    out = _fake_run(tmp_path / "out", run_metrics=RUN_METRICS)
    report = write_report(out)
    folder = out / "report"
    assert sorted(p.name for p in folder.iterdir()) == ["loss.png", "loss_chat.png", "loss_sql.png", "summary.md"]
    for png in folder.glob("*.png"):
        image = imread(png)
        assert image.shape[:2] == (450, 700)
        assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas
    assert (folder / "summary.md").read_text() == render_summary(report)


def test_without_matplotlib_the_report_names_its_extra_and_writes_nothing(tmp_path, monkeypatch):
    out = _fake_run(tmp_path / "out", run_metrics=RUN_METRICS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets where it is not installed
    with pytest.raises(RuntimeError, match=r"pip install 'lorafusion\[report\]'"):
        write_report(out)
    assert not (out / "report").exists()


def test_cli_report_prints_summary(tmp_path, capsys):
    out = _fake_run(tmp_path / "out")
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sql | 3 |" in printed and str(out / "report") in printed


@pytest.mark.parametrize("make", ["missing", "file", "no_manifest", "bad_manifest"])
def test_not_a_run_output(tmp_path, make):
    target = tmp_path / "thing"
    if make == "file":
        target.write_text("x")
    elif make == "no_manifest":
        (target / "sql").mkdir(parents=True)
    elif make == "bad_manifest":
        target.mkdir()
        (target / "run.json").write_text(json.dumps({"jobs": "sql"}))
    with pytest.raises(ValueError, match=r"thing.*(run\.json|manifest)"):
        load_run(target)


def test_cli_not_a_run_output(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a fit output directory" in err and str(tmp_path) in err


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"step": 3, "loss": 1.0, "tokens": 10}', r"a train line needs .* but lacks \['time_s'\]"),
    ('{"step": 3, "loss": "low", "tokens": 10, "time_s": 1.0}', "\"loss\" is 'low'"),
    ('{"step": 3, "eval_loss": null}', "\"eval_loss\" is None"),
])
def test_malformed_metrics_line(tmp_path, line, message):
    out = _fake_run(tmp_path / "out")
    _write_lines(out / "sql" / "metrics.jsonl", SQL_LINES[:2] + [line])
    with pytest.raises(ValueError, match=rf"sql/metrics\.jsonl:3: {message}"):
        load_run(out)


def test_missing_job_metrics(tmp_path):
    out = _fake_run(tmp_path / "out")
    (out / "chat" / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=r"chat/metrics\.jsonl: missing; run\.json lists job 'chat'"):
        load_run(out)


def test_report_of_a_real_fit(tmp_path):
    import lorafusion as lf
    from lorafusion.models.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", hidden_size=32, intermediate_size=64)
    jobs = [
        lf.JobSpec(name="arith", dataset=str(DATA / "arith.jsonl"), adapter=lf.LoRAConfig(rank=4, alpha=8),
                   global_batch_size=4, max_steps=3, eval_dataset=str(DATA / "arith_eval.jsonl"), eval_every_steps=1),
        lf.JobSpec(name="greet", dataset=str(DATA / "greet.jsonl"), adapter=lf.LoRAConfig(rank=2, alpha=4),
                   global_batch_size=2, max_steps=2),
    ]
    out = tmp_path / "run"
    # in process (no Ray actor to start): that engine writes run_metrics.json as the Ray one does
    result = lf.fit(jobs, lf.RunConfig(base_model=str(ckpt), output_dir=str(out), max_tokens_per_microbatch=256,
                                       progress=False, engine="local"))
    report = write_report(out)
    for job in report.jobs:
        expected = result[job.name]
        assert (job.steps, job.tokens) == (expected.steps, expected.tokens)
        assert job.final_loss == pytest.approx(expected.final_loss)
    arith = report.jobs[0]
    assert [p["step"] for p in arith.evals] == [1, 2, 3]
    assert arith.best_eval_loss == pytest.approx(min(p["eval_loss"] for p in arith.evals))
    assert (out / "report" / "loss_arith.png").is_file() and (out / "report" / "loss.png").is_file()
    assert report.run_metrics is not None  # the runtime's run_metrics.json is read when present
    summary = render_summary(report)
    assert _table_row(summary, "microbatches")[1] == f"{report.run_metrics['microbatches']:.0f}"
    assert _table_row(summary, "wall time")[1] == f"{report.run_metrics['wall_time_s']:.1f} s"
