"""`lorafusion` CLI: train from YAML with --set, errors as `error: ...` + exit 2, eval with and without an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorafusion.cli import main
from lorafusion.models.tiny import make_tiny_checkpoint

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def trained(ckpt, tmp_path_factory) -> Path:
    """One CLI training run (shared by the eval tests); returns its output_dir."""
    folder = tmp_path_factory.mktemp("trained")
    config = _write_config(folder, ckpt)
    assert main(["train", str(config), "--set", "run.progress=false"]) == 0
    return folder / "runs" / "cli"


def _write_config(folder: Path, ckpt: Path, **job_extra) -> Path:
    data = {
        # engine local: what `lorafusion train` picks for one stage when no Ray cluster is at hand (the tests'
        # process has one); the CLI on Ray actors is tested by test_job_submit and test_resume
        "run": {"base_model": str(ckpt), "output_dir": "runs/cli", "max_tokens_per_microbatch": 256,
                "progress": False, "engine": "local"},
        "jobs": [
            {"name": "arith", "dataset": str(DATA / "arith.jsonl"),
             "adapter": {"type": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
             "global_batch_size": 2, "max_steps": 2, **job_extra},
            {"name": "greet", "dataset": str(DATA / "greet.jsonl"), "adapter": {"type": "rslora", "rank": 2},
             "global_batch_size": 2, "max_steps": 1},
        ],
    }
    path = folder / "jobs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_writes_adapters(ckpt, tmp_path, capsys):
    config = _write_config(tmp_path, ckpt)
    out = tmp_path / "elsewhere"
    code = main(["train", str(config), "--set", f"run.output_dir={out}", "--set", "jobs.arith.adapter.rank=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "outputs in" in printed
    assert any(line.lstrip().startswith("arith") and "loss" in line and "→" in line for line in printed.splitlines())
    for job in ("arith", "greet"):
        assert (out / job / "adapter" / "adapter_config.json").is_file()
        assert (out / job / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / job / "metrics.jsonl").read_text().strip()
    written = json.loads((out / "arith" / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 8
    assert not (tmp_path / "runs").exists()  # the --set output_dir replaced the YAML one
    # The same command again: the run is complete, and it says so instead of training nothing at 0 tokens/s.
    assert main(["train", str(config), "--set", f"run.output_dir={out}", "--set", "jobs.arith.adapter.rank=8"]) == 0
    again = capsys.readouterr().out
    assert "already holds this run, complete" in again and "tokens/s" not in again


def test_train_relative_output_dir_is_next_to_the_yaml(trained):
    assert (trained / "arith" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("run: {base_model: [unclosed\n", ["not valid YAML"]),
        (None, ["rank=0", "rank: 16"]),  # a valid YAML with a bad field
    ],
)
def test_train_bad_yaml_returns_2(ckpt, tmp_path, capsys, text, words):
    if text is None:
        config = _write_config(tmp_path, ckpt, adapter={"type": "lora", "rank": 0})
    else:
        config = tmp_path / "jobs.yaml"
        config.write_text(text)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for word in words:
        assert word in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("argv_tail", "words"),
    [
        (["--set", "run.pipeline_stages"], ["section.field=value"]),
        (["--set", "jobs.nobody.seed=1"], ["nobody"]),
        (["--set", "run.colour=red"], ["colour", "known fields"]),
    ],
)
def test_train_bad_override_returns_2(ckpt, tmp_path, capsys, argv_tail, words):
    config = _write_config(tmp_path, ckpt)
    assert main(["train", str(config), *argv_tail]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words)
    assert not (tmp_path / "runs").exists()


def test_train_missing_config_file_returns_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_yaml_missing_required_field_returns_2(ckpt, tmp_path, capsys):
    # Regression: a job without `dataset` raises TypeError from JobSpec(**job); main() only catches ValueError,
    # so the user gets a traceback instead of `error: ...` and exit code 2.
    config = _write_config(tmp_path, ckpt)
    data = yaml.safe_load(config.read_text())
    del data["jobs"][0]["dataset"]
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dataset" in err


def test_train_into_existing_run_returns_2(ckpt, trained, capsys):
    config = trained.parent.parent / "jobs.yaml"
    assert main(["train", str(config), "--set", "run.resume=false"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_eval_base_model_prints_loss_and_tokens(ckpt, capsys):
    assert main(["eval", str(ckpt), str(DATA / "arith_eval.jsonl")]) == 0
    result = _last_json(capsys.readouterr().out)
    assert set(result) == {"loss", "tokens"}
    assert result["loss"] > 0 and result["tokens"] > 0


def test_eval_with_adapter(ckpt, trained, capsys):
    dataset = str(DATA / "arith_eval.jsonl")
    assert main(["eval", str(ckpt), dataset]) == 0
    base = _last_json(capsys.readouterr().out)
    assert main(["eval", str(ckpt), dataset, "--adapter", str(trained / "arith" / "adapter")]) == 0
    tuned = _last_json(capsys.readouterr().out)
    assert tuned["tokens"] == base["tokens"]
    assert tuned["loss"] > 0 and tuned["loss"] != base["loss"]  # the adapter is applied


@pytest.mark.parametrize(
    ("case", "words"),
    [("no_adapter_dir", ["adapter_config.json"]), ("no_dataset", ["not found"]), ("no_ckpt", ["not a directory"])],
)
def test_eval_bad_input_returns_2(ckpt, tmp_path, capsys, case, words):
    argv = ["eval", str(ckpt), str(DATA / "arith_eval.jsonl")]
    if case == "no_adapter_dir":
        argv += ["--adapter", str(tmp_path / "nothing")]
    elif case == "no_dataset":
        argv[2] = str(tmp_path / "missing.jsonl")
    else:
        argv[1] = str(tmp_path / "no_ckpt")
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and all(w in captured.err for w in words)
    assert captured.out == ""
