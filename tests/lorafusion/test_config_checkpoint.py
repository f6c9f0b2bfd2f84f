"""RunConfig checkpoint fields and check_output_dir with resume (no model needed: only files are inspected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import lorafusion as lf
from lorafusion.config import load_config
from lorafusion.checkpoint import check_output_dir, complete_checkpoints, config_differences, run_manifest


def run(tmp_path: Path, **fields) -> lf.RunConfig:
    return lf.RunConfig(base_model=str(tmp_path / "model"), output_dir=str(tmp_path / "out"), **fields)


def jobs(tmp_path: Path, **fields) -> list[lf.JobSpec]:
    return [lf.JobSpec(name="a", dataset=str(tmp_path / "a.jsonl"), **fields),
            lf.JobSpec(name="b", dataset=str(tmp_path / "b.jsonl"), seed=1)]


def test_defaults(tmp_path):
    config = run(tmp_path)
    assert (config.checkpoint_every_steps, config.keep_checkpoints, config.resume) == (None, 2, True)
    assert config.checkpoint_every_s == 600  # on by default: a crash or Ctrl-C loses at most ~10 minutes


@pytest.mark.parametrize("field, value, words", [
    ("checkpoint_every_steps", 0, "run.checkpoint_every_steps=0 must be a positive integer"),
    ("checkpoint_every_steps", -5, "run.checkpoint_every_steps=-5"),
    ("checkpoint_every_steps", 2.5, "run.checkpoint_every_steps=2.5"),
    ("checkpoint_every_steps", True, "run.checkpoint_every_steps=True"),
    ("keep_checkpoints", 0, "run.keep_checkpoints=0 must be a positive integer, e.g. keep_checkpoints: 2"),
    ("keep_checkpoints", None, "run.keep_checkpoints=None"),
    ("checkpoint_every_s", 0, "run.checkpoint_every_s=0 must be a number of seconds > 0, e.g. 600 (or null"),
    ("checkpoint_every_s", "10m", "run.checkpoint_every_s='10m' must be a number of seconds"),
    ("resume", "yes", "run.resume='yes' must be true or false"),
    ("resume", 1, "run.resume=1 must be true or false"),
])
def test_bad_checkpoint_fields_name_the_field(tmp_path, field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        run(tmp_path, **{field: value})


def test_yaml_and_overrides_set_the_fields(tmp_path):
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"base_model": "m", "output_dir": "out", "checkpoint_every_steps": 50, "resume": False},
        "jobs": [{"name": "a", "dataset": "a.jsonl"}],
    }))
    _, loaded = load_config(config, ["run.keep_checkpoints=4"])
    assert (loaded.checkpoint_every_steps, loaded.keep_checkpoints, loaded.resume) == (50, 4, False)
    with pytest.raises(ValueError, match="run.checkpoint_every_steps=0"):
        load_config(config, ["run.checkpoint_every_steps=0"])


# ----------------------------------------------------------------------------- check_output_dir


def saved_run(tmp_path: Path, *, checkpoint: bool = True, **job_fields) -> Path:
    """An output_dir as a fit leaves it: run.json, and (optionally) one complete checkpoint."""
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps(run_manifest(run(tmp_path), jobs(tmp_path, **job_fields))))
    (out / "checkpoints" / ".step-00000004.partial").mkdir(parents=True)  # a crashed save: not a checkpoint
    if checkpoint:
        (out / "checkpoints" / "step-00000003").mkdir()
        (out / "checkpoints" / "step-00000003" / "manifest.json").write_text("{}")
    return out


def test_same_run_with_a_checkpoint_is_resumable(tmp_path):
    out = saved_run(tmp_path)
    assert [step for step, _ in complete_checkpoints(out)] == [3]
    check_output_dir(run(tmp_path), jobs(tmp_path))
    check_output_dir(run(tmp_path, progress=False, log_every_steps=9, keep_checkpoints=1), jobs(tmp_path))


def test_same_run_without_a_complete_checkpoint_is_refused(tmp_path):
    saved_run(tmp_path, checkpoint=False)
    with pytest.raises(ValueError, match="another run .run.json. with no complete checkpoint to resume from.*overwrite"):
        check_output_dir(run(tmp_path), jobs(tmp_path))


def test_resume_off_refuses_and_overwrite_accepts(tmp_path):
    saved_run(tmp_path)
    with pytest.raises(ValueError, match="already holds another run .run.json.; choose a new output_dir"):
        check_output_dir(run(tmp_path, resume=False), jobs(tmp_path))
    check_output_dir(run(tmp_path, overwrite=True), jobs(tmp_path, learning_rate=1.0))


def test_other_settings_are_named(tmp_path):
    saved_run(tmp_path)
    with pytest.raises(ValueError) as err:
        check_output_dir(run(tmp_path, max_tokens_per_microbatch=512),
                         jobs(tmp_path, learning_rate=1e-3)[:1] + [lf.JobSpec(name="c", dataset="c.jsonl")])
    message = str(err.value)
    for words in ("cannot be resumed", "run.max_tokens_per_microbatch: 4096 before, 512 now",
                  "job 'a' learning_rate: 0.0002 before, 0.001 now", "job 'b': in the saved run, not in this one",
                  "job 'c': in this run, not in the saved one", "run.overwrite=true", str(tmp_path / "out")):
        assert words in message


def test_config_differences_checks_job_order_and_ignores_free_fields(tmp_path):
    saved = run_manifest(run(tmp_path), jobs(tmp_path))
    assert config_differences(saved, run_manifest(run(tmp_path, progress=False, pipeline_stages=2), jobs(tmp_path))) == []
    assert config_differences(saved, run_manifest(run(tmp_path), jobs(tmp_path)[::-1])) == [
        "job order: ['a', 'b'] before, ['b', 'a'] now"]
    assert config_differences(saved, run_manifest(run(tmp_path, dtype="bfloat16"), jobs(tmp_path))) == [
        "run.dtype: 'auto' before, 'bfloat16' now"]


def test_a_field_added_since_a_run_was_saved_reads_as_its_default(tmp_path):
    """A run saved before a field existed resumes when the field is at its default, and not when it is set."""
    saved = run_manifest(run(tmp_path), jobs(tmp_path))
    for record in (saved["run"], *saved["jobs"]):  # as an older lorafusion wrote it
        for key in ("attention", "optimizer", "fields", "loggers"):
            record.pop(key, None)
    assert config_differences(saved, run_manifest(run(tmp_path), jobs(tmp_path))) == []
    assert config_differences(saved, run_manifest(run(tmp_path, attention="buckets"), jobs(tmp_path))) == [
        "run.attention: 'auto' before, 'buckets' now"]


def test_unreadable_run_json_names_the_file(tmp_path):
    out = saved_run(tmp_path)
    (out / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json: cannot be read .*run\.overwrite=true"):
        check_output_dir(run(tmp_path), jobs(tmp_path))
