"""JobSpec / RunConfig / LoRAConfig validation, YAML loading and `--set` overrides (no model, no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

import lorafusion as lf
from lorafusion.config import apply_overrides

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def _job(**overrides) -> lf.JobSpec:
    fields = dict(name="sql", dataset=str(DATA / "arith.jsonl"), global_batch_size=2, max_steps=1)
    fields.update(overrides)
    return lf.JobSpec(**fields)


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _assert_names(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} missing from the error message: {message}"


# ---------------------------------------------------------------- LoRAConfig


@pytest.mark.parametrize("rank", [0, -4, 2.5, True, "8"])
def test_lora_rank_must_be_positive_int(rank):
    with pytest.raises(ValueError) as err:
        lf.LoRAConfig(rank=rank)
    _assert_names(err, "rank", repr(rank), "e.g. rank:")


@pytest.mark.parametrize("alpha", [0, -1.0, "32"])
def test_lora_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError) as err:
        lf.LoRAConfig(alpha=alpha)
    _assert_names(err, "alpha", repr(alpha), "e.g. alpha:")


@pytest.mark.parametrize("alpha", [math.nan, math.inf])
def test_lora_alpha_must_be_finite(alpha):
    # Regression: `alpha <= 0` is False for nan, so nan/inf pass and every update becomes nan.
    with pytest.raises(ValueError) as err:
        lf.LoRAConfig(alpha=alpha)
    _assert_names(err, "alpha")


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan])
def test_lora_dropout_must_be_in_unit_interval(dropout):
    with pytest.raises(ValueError) as err:
        lf.LoRAConfig(dropout=dropout)
    _assert_names(err, "dropout", "[0, 1)")


@pytest.mark.parametrize("config_cls", [lf.LoRAConfig, lf.RsLoRAConfig])
def test_unknown_target_module_lists_the_choices(config_cls):
    with pytest.raises(ValueError) as err:
        config_cls(target_modules=["q_proj", "c_attn"])
    _assert_names(err, "target_modules", "c_attn", "q_proj", "down_proj")


def test_empty_and_duplicate_target_modules_rejected():
    with pytest.raises(ValueError, match="target_modules"):
        lf.LoRAConfig(target_modules=[])
    with pytest.raises(ValueError, match="twice"):
        lf.LoRAConfig(target_modules=["q_proj", "q_proj"])


def test_rslora_scaling_differs_from_lora():
    assert lf.LoRAConfig(rank=16, alpha=32).scaling == pytest.approx(2.0)
    assert lf.RsLoRAConfig(rank=16, alpha=32).scaling == pytest.approx(8.0)


# ---------------------------------------------------------------- adapter dicts in JobSpec


def test_adapter_dict_builds_the_registered_variant():
    job = _job(adapter={"type": "rslora", "rank": 8, "alpha": 16, "target_modules": ["v_proj", "q_proj"]})
    assert isinstance(job.adapter, lf.RsLoRAConfig)
    assert job.adapter.rank == 8
    assert job.adapter.target_modules == ["q_proj", "v_proj"]  # canonical order
    assert isinstance(_job(adapter={"rank": 4}).adapter, lf.LoRAConfig)  # type defaults to lora


def test_unknown_adapter_type_in_dict_lists_known_types():
    with pytest.raises(ValueError) as err:
        _job(adapter={"type": "dora_v9", "rank": 8})
    _assert_names(err, "adapter type", "dora_v9", "lora", "rslora")


def test_non_string_adapter_type_is_a_value_error():
    # Regression: get_variant does `name not in _REGISTRY` on a list -> TypeError: unhashable type: 'list'.
    with pytest.raises(ValueError) as err:
        _job(adapter={"type": ["lora"], "rank": 8})
    _assert_names(err, "type")


def test_unknown_adapter_field_lists_known_fields():
    with pytest.raises(ValueError) as err:
        _job(adapter={"type": "lora", "rank": 8, "lora_alpha": 16})
    _assert_names(err, "lora_alpha", "known fields", "alpha", "rank", "dropout", "target_modules")


def test_adapter_must_be_a_config():
    with pytest.raises(ValueError) as err:
        _job(adapter=16)
    _assert_names(err, "adapter=16", "LoRAConfig")


def test_bad_adapter_field_inside_job_dict():
    with pytest.raises(ValueError) as err:
        _job(adapter={"type": "lora", "rank": 0})
    _assert_names(err, "rank=0", "rank: 16")


# ---------------------------------------------------------------- JobSpec


@pytest.mark.parametrize("name", ["has space", "a/b", "", "sql!", 7])
def test_bad_job_name(name):
    with pytest.raises(ValueError) as err:
        _job(name=name)
    _assert_names(err, "name", repr(name), "letters, digits")


@pytest.mark.parametrize("name", [".", ".."])
def test_job_name_cannot_escape_the_output_dir(name):
    # Regression: the regex [A-Za-z0-9_.-]+ accepts '.' and '..'; a job '..' writes <output_dir>/../adapter and
    # <output_dir>/../metrics.jsonl, outside the run, and '.' mixes the job's files with run.json.
    with pytest.raises(ValueError) as err:
        _job(name=name)
    _assert_names(err, "name", repr(name))


def test_valid_job_names():
    for name in ("sql", "task-1", "v1.2_beta"):
        assert _job(name=name).name == name


def test_unknown_lr_schedule_lists_choices():
    with pytest.raises(ValueError) as err:
        _job(lr_schedule="exponential")
    _assert_names(err, "lr_schedule", "'exponential'", "constant", "linear", "cosine")


def test_max_steps_and_num_epochs_are_exclusive():
    with pytest.raises(ValueError) as err:
        _job(max_steps=10, num_epochs=1)
    _assert_names(err, "max_steps", "num_epochs", "not both")


def test_eval_every_steps_needs_eval_dataset():
    with pytest.raises(ValueError) as err:
        _job(eval_every_steps=5)
    _assert_names(err, "eval_every_steps", "eval_dataset")
    assert _job(eval_every_steps=5, eval_dataset=str(DATA / "arith_eval.jsonl")).eval_every_steps == 5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("global_batch_size", 0),
        ("global_batch_size", 2.0),
        ("max_steps", 0),
        ("num_epochs", 0),
        ("seed", -1),
        ("learning_rate", 0),
        ("learning_rate", -1e-4),
        ("warmup_steps", -1),
        ("min_lr_ratio", 1.5),
        ("weight_decay", -0.1),
        ("adam_betas", (0.9, 1.0)),
        ("adam_betas", (0.9,)),
        ("adam_eps", 0),
        ("max_grad_norm", 0),
        ("max_seq_len", 0),
        ("overflow", "drop"),
        ("eval_every_steps", 0),
    ],
)
def test_bad_job_field_names_field_and_value(field, value):
    extra = {"max_steps": None} if field == "num_epochs" else {}
    with pytest.raises(ValueError) as err:
        _job(**{field: value}, **extra)
    _assert_names(err, field, "sql")


@pytest.mark.parametrize("value", [math.nan, math.inf, True])
def test_learning_rate_must_be_a_finite_number(value):
    # Regression: `learning_rate <= 0` is False for nan/inf and True passes isinstance(int): all accepted,
    # and training then produces nan adapters (or lr=1.0) instead of failing at validation.
    with pytest.raises(ValueError) as err:
        _job(learning_rate=value)
    _assert_names(err, "learning_rate")


def test_dataset_must_be_a_path():
    with pytest.raises(ValueError) as err:
        _job(dataset="")
    _assert_names(err, "dataset", "JSONL")


def test_job_defaults_and_to_dict_roundtrip():
    job = _job(adapter=lf.RsLoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]), adam_betas=[0.8, 0.9])
    assert job.adam_betas == (0.8, 0.9)
    data = job.to_dict()
    assert data["adapter"] == {"type": "rslora", "target_modules": ["q_proj"], "rank": 4, "alpha": 8, "dropout": 0.0}
    assert lf.JobSpec(**data) == job


def test_check_jobs_rejects_duplicates_and_empty():
    from lorafusion.config import check_jobs

    with pytest.raises(ValueError, match="duplicate job name 'sql'"):
        check_jobs([_job(), _job()])
    with pytest.raises(ValueError, match="at least one"):
        check_jobs([])


# ---------------------------------------------------------------- RunConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens_per_microbatch", 0),
        ("pipeline_stages", 0),
        ("data_parallel", -1),
        ("log_every_steps", 0),
        ("dtype", "fp8"),
        ("base_model", ""),
        ("output_dir", None),
        ("balance_pipeline", "yes"),
        ("resume", 1),
    ],
)
def test_bad_run_field_names_field_and_value(field, value):
    fields = dict(base_model="ckpt", output_dir="out")
    fields[field] = value
    with pytest.raises(ValueError) as err:
        lf.RunConfig(**fields)
    _assert_names(err, f"run.{field}", repr(value))


def test_run_dtype_lists_choices():
    with pytest.raises(ValueError) as err:
        lf.RunConfig(base_model="m", output_dir="o", dtype="fp8")
    _assert_names(err, "float32", "bfloat16", "float16")


# ---------------------------------------------------------------- YAML


@pytest.fixture
def yaml_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cfg"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a.jsonl").write_text('{"text": "hello"}\n')
    return folder


def _config_data(**run_extra) -> dict:
    return {
        "run": {"base_model": "ckpt", "output_dir": "runs/x", "max_tokens_per_microbatch": 512, **run_extra},
        "jobs": [
            {"name": "a", "dataset": "data/a.jsonl", "adapter": {"type": "lora", "rank": 4, "alpha": 8},
             "global_batch_size": 2, "max_steps": 3, "eval_dataset": "data/a.jsonl"},
            {"name": "b", "dataset": "/abs/b.jsonl", "adapter": {"type": "rslora", "rank": 8},
             "learning_rate": 1e-3, "num_epochs": 2},
        ],
    }


def test_yaml_loads_jobs_and_run_with_relative_paths(yaml_dir: Path, monkeypatch):
    path = _write_yaml(yaml_dir / "jobs.yaml", _config_data())
    monkeypatch.chdir(yaml_dir.parent)  # paths must come from the YAML's folder, not the cwd
    jobs, run = lf.load_config(path)
    assert [j.name for j in jobs] == ["a", "b"]
    assert Path(run.base_model) == yaml_dir / "ckpt"
    assert Path(run.output_dir) == yaml_dir / "runs" / "x"
    assert Path(jobs[0].dataset) == yaml_dir / "data" / "a.jsonl"
    assert Path(jobs[0].eval_dataset) == yaml_dir / "data" / "a.jsonl"
    assert jobs[1].dataset == "/abs/b.jsonl"
    assert isinstance(jobs[0].adapter, lf.LoRAConfig) and jobs[0].adapter.rank == 4
    assert isinstance(jobs[1].adapter, lf.RsLoRAConfig)
    assert run.max_tokens_per_microbatch == 512 and jobs[1].num_epochs == 2


def test_yaml_round_trip_through_to_dict(tmp_path: Path):
    jobs = [
        _job(name="a", adapter=lf.LoRAConfig(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
             lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1, max_grad_norm=None),
        _job(name="b", adapter=lf.RsLoRAConfig(rank=8), max_steps=None, num_epochs=0.5, overflow="truncate"),
    ]
    run = lf.RunConfig(base_model=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"), pipeline_stages=2,
                       dtype="bfloat16", progress=False)
    path = _write_yaml(tmp_path / "jobs.yaml", {"run": run.to_dict(), "jobs": [j.to_dict() for j in jobs]})
    loaded_jobs, loaded_run = lf.load_config(path)
    assert loaded_run == run
    assert loaded_jobs == jobs
    assert [type(j.adapter) for j in loaded_jobs] == [lf.LoRAConfig, lf.RsLoRAConfig]


def test_overrides_for_run_job_and_adapter_fields(yaml_dir: Path):
    path = _write_yaml(yaml_dir / "jobs.yaml", _config_data())
    jobs, run = lf.load_config(path, overrides=[
        "run.pipeline_stages=2",
        "run.dtype=bfloat16",
        "run.output_dir=/tmp/elsewhere",
        "jobs.a.learning_rate=0.0001",
        "jobs.b.lr_schedule=cosine",
        "jobs.a.adapter.rank=16",
        "jobs.b.adapter.type=lora",
    ])
    assert run.pipeline_stages == 2 and run.dtype == "bfloat16" and run.output_dir == "/tmp/elsewhere"
    assert jobs[0].learning_rate == pytest.approx(1e-4) and jobs[1].learning_rate == pytest.approx(1e-3)
    assert jobs[1].lr_schedule == "cosine"
    assert jobs[0].adapter.rank == 16 and jobs[0].adapter.alpha == 8
    assert type(jobs[1].adapter) is lf.LoRAConfig


def test_scientific_notation_learning_rate(yaml_dir: Path):
    # Regression: PyYAML (YAML 1.1) reads `1e-4` (no dot) as the string '1e-4', so both `learning_rate: 2e-4`
    # in a jobs file and the documented `--set jobs.sql.learning_rate=1e-4` fail with the misleading
    # "learning_rate='1e-4' must be > 0".
    data = _config_data()
    path = yaml_dir / "jobs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False).replace("learning_rate: 0.001", "learning_rate: 2e-4"))
    assert "learning_rate: 2e-4" in path.read_text()
    jobs, _ = lf.load_config(path, overrides=["jobs.a.learning_rate=1e-4"])
    assert jobs[0].learning_rate == pytest.approx(1e-4)
    assert jobs[1].learning_rate == pytest.approx(2e-4)


def test_override_of_a_job_name_containing_dots(yaml_dir: Path):
    data = _config_data()
    data["jobs"][0]["name"] = "v1.2"
    path = _write_yaml(yaml_dir / "jobs.yaml", data)
    jobs, _ = lf.load_config(path, overrides=["jobs.v1.2.max_steps=7", "jobs.v1.2.adapter.alpha=3"])
    assert jobs[0].max_steps == 7 and jobs[0].adapter.alpha == 3


def test_override_values_are_validated(yaml_dir: Path):
    path = _write_yaml(yaml_dir / "jobs.yaml", _config_data())
    with pytest.raises(ValueError, match=r"adapter\.rank=0"):
        lf.load_config(path, overrides=["jobs.a.adapter.rank=0"])
    with pytest.raises(ValueError, match=r"run\.pipeline_stages=0"):
        lf.load_config(path, overrides=["run.pipeline_stages=0"])


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("run.pipeline_stages", ["section.field=value"]),
        ("jobs.zz.learning_rate=1", ["zz", "no job"]),
        ("model.x=1", ["run.<field>", "jobs.<job name>.<field>"]),
        ("run.bogus=1", ["bogus", "known fields", "pipeline_stages"]),
        ("jobs.a.bogus=1", ["bogus", "known fields", "learning_rate"]),
        ("jobs.a.adapter.bogus=1", ["bogus", "known fields", "rank"]),
    ],
)
def test_bad_override_rejected(yaml_dir: Path, item, words):
    path = _write_yaml(yaml_dir / "jobs.yaml", _config_data())
    with pytest.raises(ValueError) as err:
        lf.load_config(path, overrides=[item])
    _assert_names(err, *words)


def test_apply_overrides_on_plain_dict():
    data = {"run": {}, "jobs": [{"name": "a"}]}
    assert apply_overrides(data, ["run.overwrite=true", "jobs.a.seed=3"]) == {
        "run": {"overwrite": True}, "jobs": [{"name": "a", "seed": 3}]}


def test_override_into_an_empty_run_section(yaml_dir: Path):
    # Regression: `run:` with no value loads as None; apply_overrides does data.setdefault("run", {}) -> None,
    # then None["base_model"] = ... -> TypeError instead of filling the section.
    path = yaml_dir / "jobs.yaml"
    path.write_text("run:\njobs:\n  - {name: a, dataset: data/a.jsonl}\n")
    _, run = lf.load_config(path, overrides=["run.base_model=/m", "run.output_dir=/o"])
    assert run.base_model == "/m" and run.output_dir == "/o"


def test_unknown_top_level_key_named(yaml_dir: Path):
    data = _config_data()
    data["jobz"] = data.pop("jobs")
    path = _write_yaml(yaml_dir / "jobs.yaml", data)
    with pytest.raises(ValueError) as err:
        lf.load_config(path)
    # Regression: the message lists 'run' and 'jobs' but not the offending key 'jobz'.
    _assert_names(err, "'run'", "'jobs'", "jobz")


def test_unknown_run_key_lists_known_fields(yaml_dir: Path):
    path = _write_yaml(yaml_dir / "jobs.yaml", _config_data(stages=2))
    with pytest.raises(ValueError) as err:
        lf.load_config(path)
    _assert_names(err, "run", "stages", "known fields", "pipeline_stages", "max_tokens_per_microbatch")


def test_unknown_job_key_lists_known_fields(yaml_dir: Path):
    data = _config_data()
    data["jobs"][1]["lr"] = 1e-3
    path = _write_yaml(yaml_dir / "jobs.yaml", data)
    with pytest.raises(ValueError) as err:
        lf.load_config(path)
    _assert_names(err, "jobs[1]", "'lr'", "known fields", "learning_rate")


@pytest.mark.parametrize(
    ("section", "missing"), [("run", "base_model"), ("run", "output_dir"), ("job", "name"), ("job", "dataset")]
)
def test_missing_required_field_is_a_value_error(yaml_dir: Path, section, missing):
    # Regression: RunConfig(**run_data) / JobSpec(**job) raise TypeError ("missing 1 required keyword-only
    # argument"), which the CLI does not catch (traceback instead of `error: ...`).
    data = _config_data()
    (data["run"] if section == "run" else data["jobs"][0]).pop(missing)
    path = _write_yaml(yaml_dir / "jobs.yaml", data)
    with pytest.raises(ValueError) as err:
        lf.load_config(path)
    _assert_names(err, missing)


def test_missing_yaml_file(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        lf.load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "words"), [
    ("run: {base_model: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "top level"),
    ("run: {base_model: m, output_dir: o}\njobs: {name: a}\n", "list"),
    ("run: {base_model: m, output_dir: o}\njobs: []\n", "at least one"),
])
def test_yaml_errors(tmp_path: Path, text, words):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=words):
        lf.load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="top level"):
        lf.load_config(bad)
    bad.write_text("run: {base_model: m, output_dir: o}\njobs: {name: a}\n")
    with pytest.raises(ValueError, match="list"):
        lf.load_config(bad)
    bad.write_text("run: {base_model: m, output_dir: o}\njobs: []\n")
    with pytest.raises(ValueError, match="at least one"):
        lf.load_config(bad)


def test_yaml_duplicate_job_names(yaml_dir: Path):
    data = _config_data()
    data["jobs"][1]["name"] = "a"
    path = _write_yaml(yaml_dir / "jobs.yaml", data)
    with pytest.raises(ValueError, match="duplicate job name 'a'"):
        lf.load_config(path)
