"""JobSpec.init_adapter: a job continues from an adapter folder (ours or PEFT's, any variant we read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters.attach import ModelAdapters
from lorafusion.adapter_io import write_peft_adapter
from lorafusion.models import build_model

peft = pytest.importorskip("peft")


def _exported(checkpoint: Path, directory: Path, config) -> Path:
    """An adapter of `config` with every tensor perturbed, written by us."""
    model, arch = build_model(checkpoint, dtype=torch.float32)
    adapters = ModelAdapters(model, arch)
    adapters.add_job("src", config, seed=4)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in adapters.parameters("src"):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return write_peft_adapter(directory, adapters.peft_state_dict("src"), config, base_model=str(checkpoint))


def _peft_dora(checkpoint: Path, directory: Path, load_hf_model) -> Path:
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapter whatever ran before
    model = peft.get_peft_model(load_hf_model(checkpoint), peft.LoraConfig(r=2, lora_alpha=4, use_dora=True,
                                                                           target_modules=["q_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("source", ["ours_vera", "peft_dora"])
def test_first_step_loss_is_the_loaded_adapters_loss(source, train_checkpoint, examples_data, tmp_path, load_hf_model):
    """One global batch = the whole dataset, so step 1's loss is the init adapter's mean loss on it (lf.evaluate),
    not the fresh adapter's."""
    data = examples_data / "arith_eval.jsonl"
    if source == "ours_vera":
        adapter = _exported(train_checkpoint, tmp_path / "init", lf.VeRAConfig(rank=8, target_modules=["v_proj"]))
    else:
        adapter = _peft_dora(train_checkpoint, tmp_path / "init", load_hf_model)
    spec = lf.JobSpec(name="cont", dataset=str(data), init_adapter=str(adapter), global_batch_size=50, max_steps=1)
    assert spec.adapter.type == ("vera" if source == "ours_vera" else "dora")
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "run"), progress=False,
                       dtype="float32", engine="local")
    lf.fit([spec], run)
    first = json.loads((tmp_path / "run" / "cont" / "metrics.jsonl").read_text().splitlines()[0])
    loaded = lf.evaluate(train_checkpoint, adapter, data, dtype="float32", device="cpu")
    base = lf.evaluate(train_checkpoint, None, data, dtype="float32", device="cpu")
    assert first["loss"] == pytest.approx(loaded.loss, rel=1e-5)
    assert abs(loaded.loss - base.loss) > 1e-3


def test_init_adapter_errors_name_the_problem(train_checkpoint, examples_data, tmp_path, tiny_checkpoints):
    data = str(examples_data / "arith_eval.jsonl")
    adapter = _exported(train_checkpoint, tmp_path / "init", lf.LoRAConfig(rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter differs from init_adapter .* in \['rank'\]"):
        lf.JobSpec(name="j", dataset=data, init_adapter=str(adapter), adapter=lf.LoRAConfig(rank=4, target_modules=["q_proj"]))
    same = lf.JobSpec(name="j", dataset=data, init_adapter=str(adapter),
                      adapter=lf.LoRAConfig(rank=2, target_modules=["q_proj"], dropout=0.1))
    assert same.adapter.dropout == 0.1  # dropout is a training choice, not part of the adapter
    with pytest.raises(ValueError, match=r"'.*nowhere' has no adapter_config.json"):
        lf.JobSpec(name="j", dataset=data, init_adapter=str(tmp_path / "nowhere"))
    other = _exported(tiny_checkpoints["mistral"], tmp_path / "other", lf.LoRAConfig(rank=2, target_modules=["k_proj"]))
    spec = lf.JobSpec(name="j", dataset=data, init_adapter=str(other))
    out = tmp_path / "run"
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), progress=False, engine="local")
    with pytest.raises(ValueError, match=r"job 'j': init_adapter .*k_proj.lora_B.weight' has shape \(16, 2\), "
                                         r"expected \(32, 2\)"):
        lf.fit([spec], run)
    assert not out.exists()  # refused before anything was written



def test_yaml_init_adapter_is_relative_to_the_yaml(train_checkpoint, examples_data, tmp_path):
    import yaml

    _exported(train_checkpoint, tmp_path / "adapters" / "a", lf.LoRAConfig(rank=2, target_modules=["q_proj"]))
    config = tmp_path / "cfg" / "jobs.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"run": {"base_model": str(train_checkpoint), "output_dir": "out"},
                                      "jobs": [{"name": "j", "dataset": str(examples_data / "arith.jsonl"),
                                                "init_adapter": "../adapters/a"}]}))
    (job,), _ = lf.load_config(config)
    assert Path(job.init_adapter) == tmp_path / "adapters" / "a" and job.adapter.rank == 2
