"""JobSpec.optimizer: the configs of adamw / lorapro / altlora, in Python and YAML, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import lorafusion as lf
from lorafusion.config import check_jobs

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def _job(**overrides) -> lf.JobSpec:
    return lf.JobSpec(**{"name": "sql", "dataset": str(DATA / "arith.jsonl"), "max_steps": 1, **overrides})


def _assert_names(err: pytest.ExceptionInfo, *words: str) -> None:
    for word in words:
        assert word in str(err.value), f"{word!r} missing from the error message: {err.value}"


def _yaml_job(tmp_path: Path, **job) -> Path:
    data = {"run": {"base_model": "ckpt", "output_dir": "out"},
            "jobs": [{"name": "sql", "dataset": str(DATA / "arith.jsonl"), **job}]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_default_is_adamw_and_to_dict_round_trips():
    job = _job()
    assert job.optimizer == lf.AdamWConfig() and job.to_dict()["optimizer"] == {"type": "adamw"}
    for optimizer in (lf.LoRAProConfig(delta=1e-6), lf.AltLoRAConfig(beta1=0.9, reg=1e-2)):
        job = _job(optimizer=optimizer)
        assert lf.JobSpec(**job.to_dict()) == job
    assert _job(optimizer=lf.AltLoRAConfig()).to_dict()["optimizer"] == {"type": "altlora", "beta1": 0.999,
                                                                         "reg": 1e-3}


def test_yaml_optimizer_and_overrides(tmp_path):
    path = _yaml_job(tmp_path, optimizer={"type": "lorapro", "delta": 1e-6})
    (job,), _ = lf.load_config(path)
    assert job.optimizer == lf.LoRAProConfig(delta=1e-6)
    (job,), _ = lf.load_config(path, overrides=["jobs.sql.optimizer.delta=1e-4"])
    assert job.optimizer == lf.LoRAProConfig(delta=1e-4)
    (job,), _ = lf.load_config(_yaml_job(tmp_path), overrides=["jobs.sql.optimizer.type=altlora"])
    assert job.optimizer == lf.AltLoRAConfig()


@pytest.mark.parametrize("make, field, value", [
    (lambda v: lf.LoRAProConfig(delta=v), "delta", 0),
    (lambda v: lf.LoRAProConfig(delta=v), "delta", -1e-8),
    (lambda v: lf.LoRAProConfig(delta=v), "delta", float("nan")),
    (lambda v: lf.LoRAProConfig(delta=v), "delta", "small"),
    (lambda v: lf.AltLoRAConfig(beta1=v), "beta1", 1.0),
    (lambda v: lf.AltLoRAConfig(beta1=v), "beta1", -0.1),
    (lambda v: lf.AltLoRAConfig(beta1=v), "beta1", True),
    (lambda v: lf.AltLoRAConfig(reg=v), "reg", 0.0),
    (lambda v: lf.AltLoRAConfig(reg=v), "reg", float("inf")),
])
def test_bad_optimizer_field_names_field_value_and_fix(make, field, value, tmp_path):
    with pytest.raises(ValueError) as err:
        make(value)
    _assert_names(err, f"optimizer.{field}={value!r}", "e.g.")
    kind = "lorapro" if field == "delta" else "altlora"
    with pytest.raises(ValueError) as err:  # the same through YAML, prefixed by the job
        lf.load_config(_yaml_job(tmp_path, optimizer={"type": kind, field: value}))
    _assert_names(err, "job 'sql'", f"optimizer.{field}=")


@pytest.mark.parametrize("optimizer, words", [
    ({"type": "sgd"}, ["optimizer.type='sgd'", "adamw", "lorapro", "altlora"]),
    ({"type": 3}, ["optimizer.type=3"]),
    ({"type": "adamw", "delta": 1e-8}, ["unknown optimizer field(s) ['delta']", "adamw"]),
    ({"type": "lorapro", "betas": [0.9, 0.99]}, ["unknown optimizer field(s) ['betas']", "['delta']"]),
    ("lorapro", ["optimizer='lorapro'", "mapping"]),
    (7, ["optimizer=7", "mapping"]),
])
def test_bad_optimizer_mapping(optimizer, words, tmp_path):
    with pytest.raises(ValueError) as err:
        _job(optimizer=optimizer)
    _assert_names(err, "job 'sql'", *words)
    with pytest.raises(ValueError) as err:
        lf.load_config(_yaml_job(tmp_path, optimizer=optimizer))
    _assert_names(err, "job 'sql'", *words)


@pytest.mark.parametrize("optimizer", ["lorapro", "altlora"])
@pytest.mark.parametrize("adapter", [lf.DoRAConfig(), lf.VeRAConfig(), lf.SHiRAConfig(), lf.UniLoRAConfig(),
                                     lf.RandLoRAConfig()], ids=lambda a: a.type)
def test_adapter_without_factor_pairs_is_refused_at_config_time(optimizer, adapter, tmp_path):
    with pytest.raises(ValueError) as err:
        _job(adapter=adapter, optimizer={"type": optimizer})
    _assert_names(err, "job 'sql'", f"optimizer.type='{optimizer}'", f"'{adapter.type}'", "lora", "adamw")
    with pytest.raises(ValueError) as err:
        lf.load_config(_yaml_job(tmp_path, adapter={"type": adapter.type}, optimizer={"type": optimizer}))
    _assert_names(err, "job 'sql'", f"optimizer.type='{optimizer}'", f"'{adapter.type}'")


@pytest.mark.parametrize("adapter", [lf.LoRAConfig(), lf.RsLoRAConfig(), lf.LoRAGAConfig()], ids=lambda a: a.type)
def test_factor_adapters_take_both_methods(adapter):
    for optimizer in (lf.LoRAProConfig(), lf.AltLoRAConfig()):
        assert _job(adapter=adapter, optimizer=optimizer).optimizer == optimizer


def test_fields_changed_after_construction_are_checked_again():
    job = _job(optimizer=lf.AltLoRAConfig())
    job.optimizer.reg = -1.0
    with pytest.raises(ValueError, match=r"optimizer.reg=-1.0"):
        check_jobs([job])
    job = _job(optimizer=lf.LoRAProConfig())
    job.adapter = lf.DoRAConfig()
    with pytest.raises(ValueError, match="optimizer.type='lorapro'"):
        check_jobs([job])
