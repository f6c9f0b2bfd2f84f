"""Bad input through `lf.fit`: a clear ValueError before training starts, and nothing created or overwritten."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

import lorafusion as lf
from lorafusion.adapters import AdapterConfig
from lorafusion.models.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("ray_session")
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
CAPACITY = 256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", hidden_size=32, intermediate_size=64)


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` -> (kind, size, mtime_ns, sha256) so any create/modify/delete shows."""
    snap = {}
    for root in roots:
        snap[str(root)] = ("dir", root.exists())
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                path = Path(dirpath, name)
                snap[str(path)] = ("dir", path.stat().st_mtime_ns)
            for name in filenames:
                path = Path(dirpath, name)
                stat = path.stat()
                snap[str(path)] = ("file", stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return snap


def _job(name: str = "ok", **overrides) -> lf.JobSpec:
    fields = dict(name=name, dataset=str(DATA / "arith.jsonl"),
                  adapter=lf.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                  global_batch_size=2, max_steps=1, seed=0)
    fields.update(overrides)
    return lf.JobSpec(**fields)


def _run(ckpt: Path, out: Path, **overrides) -> lf.RunConfig:
    fields = dict(base_model=str(ckpt), output_dir=str(out), max_tokens_per_microbatch=CAPACITY, progress=False)
    fields.update(overrides)
    return lf.RunConfig(**fields)


def _fails_cleanly(make_and_fit: Callable[[], object], watched: list[Path], out: Path, *words: str) -> str:
    """Run `make_and_fit`; expect a ValueError naming `words`, with `watched` untouched and `out` as before."""
    out_existed = out.exists()
    before = _snapshot(*watched)
    with pytest.raises(ValueError) as err:
        make_and_fit()
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} missing from the error message: {message}"
    assert out.exists() == out_existed, f"output_dir {'created' if not out_existed else 'removed'}: {message}"
    assert _snapshot(*watched) == before, "files were created or changed by a failed fit"
    return message


# ---------------------------------------------------------------- bad job specs


@dataclasses.dataclass(kw_only=True)
class _UnregisteredConfig(AdapterConfig):
    type = "not_registered"


def test_unknown_adapter_type_in_dict(ckpt, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job(), _job("bad", adapter={"type": "lorax", "rank": 4})], _run(ckpt, out)),
                   [tmp_path, ckpt], out, "lorax", "known types", "lora")


def test_unregistered_adapter_config_class(ckpt, tmp_path):
    # Regression: prepare_run never calls get_variant(job.adapter.type); the error comes from the worker after
    # _start_output has already created output_dir and written run.json.
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job(), _job("bad", adapter=_UnregisteredConfig())], _run(ckpt, out)),
                   [tmp_path, ckpt], out, "not_registered", "known types")


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_not_positive(ckpt, tmp_path, rank):
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job("bad", adapter={"type": "lora", "rank": rank})], _run(ckpt, out)),
                   [tmp_path, ckpt], out, "rank", str(rank), "rank: 16")


@pytest.mark.parametrize(
    ("attr", "value", "words"),
    [("rank", 0, ["rank", "0"]), ("target_modules", ["c_attn"], ["target_modules", "c_attn"]),
     ("dropout", 1.0, ["dropout"])],
)
def test_adapter_config_changed_after_construction(ckpt, tmp_path, attr, value, words):
    # Regression: configs are mutable and prepare_run does not re-validate them, so rank=0 ends in a
    # ZeroDivisionError and target_modules=['c_attn'] in a KeyError, after run.json (and for rank=0 the
    # job folder) were written. Fix: prepare_run re-runs each JobSpec/adapter __post_init__ validation.
    job = _job("bad")
    setattr(job.adapter, attr, value)
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job(), job], _run(ckpt, out)), [tmp_path, ckpt], out, *words)


def test_target_module_the_model_does_not_have(ckpt, tmp_path):
    out = tmp_path / "out"
    bad = {"type": "lora", "rank": 4, "target_modules": ["q_proj", "c_attn"]}
    _fails_cleanly(lambda: lf.fit([_job(), _job("bad", adapter=bad)], _run(ckpt, out)),
                   [tmp_path, ckpt], out, "target_modules", "c_attn", "choose from", "q_proj")


def test_duplicate_job_names(ckpt, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job("twin"), _job("twin", seed=1)], _run(ckpt, out)),
                   [tmp_path, ckpt], out, "duplicate job name", "twin")


def test_no_jobs(ckpt, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([], _run(ckpt, out)), [tmp_path, ckpt], out, "no jobs")


# ---------------------------------------------------------------- bad datasets


def test_missing_dataset(ckpt, tmp_path):
    out, missing = tmp_path / "out", tmp_path / "nope.jsonl"
    _fails_cleanly(lambda: lf.fit([_job(), _job("bad", dataset=str(missing))], _run(ckpt, out)),
                   [tmp_path, ckpt], out, "bad", str(missing), "not found", "fix the dataset path")


def test_missing_eval_dataset(ckpt, tmp_path):
    out, missing = tmp_path / "out", tmp_path / "eval_nope.jsonl"
    _fails_cleanly(lambda: lf.fit([_job(eval_dataset=str(missing))], _run(ckpt, out)),
                   [tmp_path, ckpt], out, str(missing), "not found")


def test_empty_dataset(ckpt, tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    _fails_cleanly(lambda: lf.fit([_job(), _job("bad", dataset=str(empty))], _run(ckpt, out)),
                   [tmp_path, ckpt], out, str(empty), "empty", "one JSON object per line")


def test_malformed_jsonl_line(ckpt, tmp_path):
    out, bad = tmp_path / "out", tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n\n{"prompt": "2+2=", "completion": "4"\n')
    _fails_cleanly(lambda: lf.fit([_job(), _job("bad", dataset=str(bad))], _run(ckpt, out)),
                   [tmp_path, ckpt], out, f"{bad}:3", "invalid JSON", "one JSON object per line")


def test_row_in_unknown_format(ckpt, tmp_path):
    out, bad = tmp_path / "out", tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1=", "answer": "2"}\n')
    _fails_cleanly(lambda: lf.fit([_job("bad", dataset=str(bad))], _run(ckpt, out)),
                   [tmp_path, ckpt], out, f"{bad}:1", "question", "prompt")


def test_sample_longer_than_max_seq_len_rejected(ckpt, tmp_path):
    out, data = tmp_path / "out", tmp_path / "long.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "' + "x" * 40 + '", "completion": "y"}\n')
    _fails_cleanly(lambda: lf.fit([_job(), _job("bad", dataset=str(data), max_seq_len=16)], _run(ckpt, out)),
                   [tmp_path, ckpt], out, f"{data}:2", "max_seq_len=16", "overflow: truncate")


def test_max_seq_len_over_microbatch_capacity(ckpt, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job(max_seq_len=CAPACITY + 1)], _run(ckpt, out)),
                   [tmp_path, ckpt], out, "max_seq_len", "max_tokens_per_microbatch")


# ---------------------------------------------------------------- bad checkpoints


def _copy_ckpt(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "ckpt"))


def test_checkpoint_without_config_json(ckpt, tmp_path):
    broken = _copy_ckpt(ckpt, tmp_path)
    (broken / "config.json").unlink()
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job()], _run(broken, out)), [tmp_path], out,
                   str(broken), "config.json", "base_model")


def test_checkpoint_directory_missing(ckpt, tmp_path):
    out, missing = tmp_path / "out", tmp_path / "no_such_ckpt"
    _fails_cleanly(lambda: lf.fit([_job()], _run(missing, out)), [tmp_path], out,
                   str(missing), "not a directory")
    assert not missing.exists()


def test_checkpoint_without_safetensors(ckpt, tmp_path):
    broken = _copy_ckpt(ckpt, tmp_path)
    (broken / "model.safetensors").unlink()
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job()], _run(broken, out)), [tmp_path], out, "safetensors")


def test_unsupported_architecture(ckpt, tmp_path):
    broken = _copy_ckpt(ckpt, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job()], _run(broken, out)), [tmp_path], out,
                   "GPT2LMHeadModel", "not supported", "LlamaForCausalLM")


# ---------------------------------------------------------------- output dir


def test_output_dir_holding_another_run(ckpt, tmp_path):
    out = tmp_path / "out"
    (out / "other_job" / "adapter").mkdir(parents=True)
    (out / "run.json").write_text('{"run": {}, "jobs": []}')
    (out / "other_job" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "other_job" / "adapter" / "adapter_config.json").write_text("{}")
    _fails_cleanly(lambda: lf.fit([_job("other_job")], _run(ckpt, out)), [tmp_path, ckpt], out,
                   str(out), "another run", "overwrite")


def test_output_dir_holding_unrelated_files(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails_cleanly(lambda: lf.fit([_job()], _run(ckpt, out)), [tmp_path, ckpt], out, str(out), "overwrite")


def test_output_dir_is_a_file(ckpt, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a dir")
    _fails_cleanly(lambda: lf.fit([_job()], _run(ckpt, out)), [tmp_path, ckpt], out, str(out), "is a file")


def test_overwrite_never_deletes_the_run_inputs(ckpt, tmp_path):
    # Regression: with overwrite=True, _start_output does shutil.rmtree(output_dir) even when output_dir holds
    # the base model (or a dataset) of this very run: the checkpoint is deleted and the fit then fails.
    # Fix: check_output_dir refuses an output_dir that contains base_model or any dataset.
    inputs = tmp_path / "inputs"
    local = Path(shutil.copytree(ckpt, inputs / "ckpt"))
    data = inputs / "train.jsonl"
    shutil.copy(DATA / "arith.jsonl", data)
    _fails_cleanly(lambda: lf.fit([_job(dataset=str(data))], _run(local, inputs, overwrite=True)),
                   [tmp_path], inputs, "output_dir", "base_model")


# ---------------------------------------------------------------- a good run


def test_finished_run_outputs_rerun_resumes_or_needs_overwrite(ckpt, tmp_path):
    out = tmp_path / "out"
    jobs = [_job("a", max_steps=2), _job("b", dataset=str(DATA / "greet.jsonl"),
                                         adapter=lf.RsLoRAConfig(rank=2, target_modules=["o_proj"]))]
    result = lf.fit(jobs, _run(ckpt, out))
    assert set(result.jobs) == {"a", "b"}
    for name, steps in (("a", 2), ("b", 1)):
        job = result.jobs[name]
        assert job.status == "finished" and job.steps == steps and job.error is None
        adapter = out / name / "adapter"
        assert Path(job.adapter_path) == adapter
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        for record in records:
            assert {"step", "loss", "lr", "tokens", "grad_norm"} <= set(record)
            assert record["tokens"] > 0 and record["loss"] > 0
    assert json.loads((out / "run.json").read_text())["run"]["output_dir"] == str(out)

    # Run again: it finds the run complete, starts nothing, keeps what it wrote and says so.
    metrics_before = (out / "a" / "metrics.jsonl").read_text()
    adapter_before = (out / "a" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    rerun = lf.fit(jobs, _run(ckpt, out))
    assert rerun.already_complete and "already holds this run, complete" in rerun.summary()
    assert rerun.jobs["a"].steps == 2 and rerun.jobs["a"].final_loss == result.jobs["a"].final_loss
    assert rerun.jobs["a"].first_loss == result.jobs["a"].first_loss is not None
    assert (out / "a" / "metrics.jsonl").read_text() == metrics_before
    assert (out / "a" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_before
    assert not result.already_complete and "loss" in result.summary().splitlines()[1]
    _fails_cleanly(lambda: lf.fit(jobs, _run(ckpt, out, resume=False)), [tmp_path, ckpt], out, "another run",
                   "overwrite")

    (out / "stale.txt").write_text("from an earlier run")
    again = lf.fit(jobs, _run(ckpt, out, overwrite=True, engine="local"))  # the driver clears it: no actor needed
    assert all(j.status == "finished" for j in again.jobs.values())
    assert not (out / "stale.txt").exists()
    assert (out / "a" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("change", ["drop", "reshape"])
def test_checkpoint_weights_not_matching_config(ckpt, tmp_path, change):
    from safetensors.torch import load_file, save_file

    bad = Path(shutil.copytree(ckpt, tmp_path / "bad_ckpt"))
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    if change == "drop":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job()], _run(bad, out)), [tmp_path], out, name, "config.json")


@pytest.mark.parametrize("fields, words", [
    (dict(pipeline_stages=3), ("run.pipeline_stages=3", "2 layers")),
    (dict(pipeline_stages=2, stage_layers=[2, 1]), ("run.stage_layers=[2, 1]", "summing to the model's 2 layers")),
], ids=["more_stages_than_layers", "stage_layers_not_summing"])
def test_pipeline_split_that_does_not_fit_the_model_is_refused(ckpt, tmp_path, fields, words):
    out = tmp_path / "out"
    _fails_cleanly(lambda: lf.fit([_job()], _run(ckpt, out, **fields)), [tmp_path], out, *words)
