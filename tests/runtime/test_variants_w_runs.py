"""PaCA, LoLDU, Hydra and TeRA jobs trained together in one fit: each starts at the base model's loss, learns,
and is exported (three exact plain LoRAs, TeRA's native files beside its truncated LoRA) in a form lf.evaluate
reads back, TeRA's native files also as a later job's init_adapter."""

from __future__ import annotations

import json

import pytest

import lorafusion as lf

ADAPTERS = {
    "paca": lf.PaCAConfig(rank=4, alpha=8),
    "loldu": lf.LoLDUConfig(rank=4, alpha=64),
    "hydra": lf.HydraConfig(rank=2, alpha=4),
    "tera": lf.TeRAConfig(rank=4, export_rank=8),
}


def test_four_variants_train_together_and_export(train_checkpoint, examples_data, tmp_path):
    data = examples_data / "arith_eval.jsonl"
    jobs = [lf.JobSpec(name=name, dataset=str(data), adapter=adapter, global_batch_size=50, max_steps=2,
                       learning_rate=1e-2, seed=i) for i, (name, adapter) in enumerate(ADAPTERS.items())]
    out = tmp_path / "run"
    result = lf.fit(jobs, lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), progress=False,
                                       dtype="float32", engine="local"))
    base = lf.evaluate(train_checkpoint, None, data, dtype="float32", device="cpu")
    for name in ADAPTERS:
        assert result[name].status == "finished" and result[name].steps == 2
        first = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(base.loss, rel=1e-5), name  # every variant starts at the base
        trained = lf.evaluate(train_checkpoint, result[name].adapter_path, data, dtype="float32", device="cpu")
        assert trained.loss < base.loss, name
    for name, rank in (("paca", 4), ("loldu", 4), ("hydra", 4), ("tera", 8)):
        config = json.loads((out / name / "adapter" / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"]) == ("LORA", rank)
    report = json.loads((out / "tera" / "adapter" / "export_report.json").read_text())
    assert len(report["relative_error"]) == 2 * 7 and 0 < report["max_relative_error"] < 1

    # TeRA's native files as init_adapter: the job is TeRA again and starts where the first fit ended
    trained = lf.evaluate(train_checkpoint, result["tera"].adapter_path, data, dtype="float32", device="cpu")
    again = lf.JobSpec(name="again", dataset=str(data), init_adapter=result["tera"].adapter_path, global_batch_size=50,
                       max_steps=1)
    assert again.adapter == ADAPTERS["tera"]
    lf.fit([again], lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "again"),
                                 progress=False, dtype="float32", engine="local"))
    first = json.loads((tmp_path / "again" / "again" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(trained.loss, rel=1e-5)
