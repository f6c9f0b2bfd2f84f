"""`lorafusion plan`: tokenizes the jobs, prints per-window statistics, errors as `error: ...` + exit 2."""

from __future__ import annotations

from pathlib import Path

import yaml

from lorafusion.cli import main

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def _config(folder: Path, ckpt: Path) -> Path:
    data = {
        "run": {"base_model": str(ckpt), "output_dir": str(folder / "out"), "max_tokens_per_microbatch": 256},
        "jobs": [
            {"name": "arith", "dataset": str(DATA / "arith.jsonl"), "adapter": {"type": "lora", "rank": 2},
             "global_batch_size": 4, "max_steps": 3},
            {"name": "greet", "dataset": str(DATA / "greet.jsonl"), "adapter": {"type": "lora", "rank": 2},
             "global_batch_size": 2, "max_steps": 2},
        ],
    }
    path = folder / "jobs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_plan_prints_one_row_per_window(train_checkpoint, tmp_path, capsys):
    config = _config(tmp_path, train_checkpoint)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("an earlier run")  # plan writes nothing, so this is fine
    assert main(["plan", str(config), "--set", "run.pipeline_stages=2", "--time-limit-s", "0.05",
                 "--steps-per-window", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2"]  # arith runs 3 steps
    total = next(line.split() for line in lines if line.startswith(" total"))
    assert int(total[1]) == sum(int(row[1]) for row in rows)
    assert "pipeline stages 2, capacity 256 tokens" in lines[-1]
    assert not (tmp_path / "out" / "run.json").exists()
    # By default windows are sized as train sizes them: these few short samples make a 64-microbatch window
    # hold every step.
    assert main(["plan", str(config), "--set", "run.pipeline_stages=2", "--time-limit-s", "0.05"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].isdigit()] == ["0"]


def test_plan_windows_and_capacity(train_checkpoint, tmp_path, capsys):
    config = _config(tmp_path, train_checkpoint)
    assert main(["plan", str(config), "--windows", "1", "--steps-per-window", "2", "--capacity", "512",
                 "--time-limit-s", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "capacity 512 tokens" in out
    assert [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].isdigit()] == ["0"]


def test_plan_errors(train_checkpoint, tmp_path, capsys):
    config = _config(tmp_path, train_checkpoint)
    assert main(["plan", str(config), "--capacity", "8"]) == 2  # shorter than the samples
    assert "error: " in capsys.readouterr().err
    assert main(["plan", str(config), "--windows", "0"]) == 2
    assert "--windows 0 must be ≥ 1" in capsys.readouterr().err


def test_plan_spaces_a_jobs_steps_by_stages_times_replicas(train_checkpoint, tmp_path, monkeypatch, capsys):
    import scheduler

    depths = []
    real = scheduler.WindowPlanner

    def recording(**kwargs):
        depths.append(kwargs["pipeline_depth"])
        return real(**kwargs)

    monkeypatch.setattr(scheduler, "WindowPlanner", recording)
    config = _config(tmp_path, train_checkpoint)
    assert main(["plan", str(config), "--set", "run.pipeline_stages=2", "--set", "run.data_parallel=2",
                 "--time-limit-s", "0.05"]) == 0
    assert depths == [4]  # as fit plans it: 2 stages x 2 replicas
