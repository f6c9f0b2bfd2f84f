"""Messages that point at the right thing (issue 18, item 6): the setting to change, where a path was looked
for, the CLI's own flags; tiny-checkpoint never overwrites silently; exported adapters name their base absolutely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import lorafusion as lf
from lorafusion.cli import main


def _long_rows(path: Path) -> Path:
    path.write_text(json.dumps({"prompt": "x " * 200, "completion": "y"}) + "\n")
    return path


def test_sample_longer_than_the_microbatch_names_that_setting(train_checkpoint, tmp_path):
    job = lf.JobSpec(name="j", dataset=str(_long_rows(tmp_path / "long.jsonl")), max_steps=1)
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "out"), max_tokens_per_microbatch=64)
    with pytest.raises(ValueError, match=r"run\.max_tokens_per_microbatch=64; raise run\.max_tokens_per_microbatch "
                                         r"to at least \d+ or set `overflow: truncate`"):
        lf.fit([job], run)
    own = lf.JobSpec(name="j", dataset=str(tmp_path / "long.jsonl"), max_steps=1, max_seq_len=32)
    with pytest.raises(ValueError, match=r"but max_seq_len=32; raise max_seq_len to at least"):
        lf.fit([own], run)


def test_eval_suggests_its_own_flag(train_checkpoint, tmp_path, capsys):
    code = main(["eval", str(train_checkpoint), str(_long_rows(tmp_path / "long.jsonl")), "--max-seq-len", "32",
                 "--device", "cpu"])
    assert code == 2
    assert "--overflow truncate" in capsys.readouterr().err


def test_missing_dataset_says_where_relative_paths_start(train_checkpoint, tmp_path):
    config = tmp_path / "cfg" / "jobs.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"run": {"base_model": str(train_checkpoint), "output_dir": "out"},
                                      "jobs": [{"name": "j", "dataset": "data/missing.jsonl"}]}))
    jobs, run = lf.load_config(config)
    with pytest.raises(ValueError, match=r"looked for .*cfg/data/missing\.jsonl.*relative path is taken from the "
                                         r"YAML's folder"):
        lf.fit(jobs, run)


def test_tiny_checkpoint_refuses_to_write_into_a_used_folder(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert main(["tiny-checkpoint", str(used)]) == 2
    assert "--force" in capsys.readouterr().err and not (used / "config.json").exists()
    assert main(["tiny-checkpoint", str(used), "--force"]) == 0
    assert (used / "config.json").is_file() and (used / "notes.txt").read_text() == "mine"
    assert main(["tiny-checkpoint", str(tmp_path / "fresh")]) == 0


def test_exported_adapter_names_its_base_model_absolutely(train_checkpoint, tmp_path, monkeypatch, examples_data):
    monkeypatch.chdir(train_checkpoint.parent)
    job = lf.JobSpec(name="j", dataset=str(examples_data / "arith.jsonl"), max_steps=1, global_batch_size=2)
    result = lf.fit([job], lf.RunConfig(base_model=train_checkpoint.name, output_dir=str(tmp_path / "out"),
                                        progress=False, engine="local"))
    config = json.loads((Path(result["j"].adapter_path) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(train_checkpoint.resolve())


def test_building_the_model_warns_nothing(train_checkpoint):
    """No warning of our own making on a normal run: megatron's config is built without deprecated defaults."""
    import warnings

    import torch

    from lorafusion.models import build_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(train_checkpoint, dtype=torch.float32)
    assert [str(w.message) for w in caught] == []


def test_adapter_errors_in_a_yaml_name_the_job(train_checkpoint, tmp_path):
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump({"run": {"base_model": str(train_checkpoint), "output_dir": "out"},
                                      "jobs": [{"name": "good", "dataset": "a.jsonl"},
                                               {"name": "bad", "dataset": "b.jsonl", "adapter": {"rank": 0}}]}))
    with pytest.raises(ValueError, match=r"job 'bad': adapter: adapter\.rank=0 must be a positive integer"):
        lf.load_config(config)


def test_start_up_says_what_it_is_doing(train_checkpoint, tmp_path, capsys, examples_data):
    job = lf.JobSpec(name="j", dataset=str(examples_data / "arith.jsonl"), max_steps=1, global_batch_size=2)
    lf.fit([job], lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "out"), engine="local"))
    lines = capsys.readouterr().out.splitlines()
    first = [i for i, line in enumerate(lines) if "tokenising the datasets of 1 job" in line]
    building = [i for i, line in enumerate(lines) if "building the model" in line]
    steps = [i for i, line in enumerate(lines) if "1/1" in line]
    assert first and building and steps and first[0] < building[0] < steps[0]
