"""Exported adapters load in PEFT and give our logits and losses (DESIGN promise 5, PEFT layout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lorafusion as lf
from lorafusion.adapters import AdapterConfig
from lorafusion.adapters.attach import ModelAdapters
from lorafusion.batching import build_microbatch
from lorafusion.adapter_io import read_peft_adapter, write_peft_adapter
from lorafusion.data import IGNORE_INDEX, Sample, load_dataset, load_tokenizer
from lorafusion.models import build_model

peft = pytest.importorskip("peft")

ATOL = 1e-4  # logits, fp32 (DESIGN promise 5)
LOSS_RTOL = 1e-4
VOCAB = 259
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# case -> (checkpoint family, adapter config). rsLoRA's rank 4 makes alpha/sqrt(r) != alpha/r.
CASES = {
    "lora_all_modules": ("qwen2", lambda: lf.LoRAConfig(rank=4, alpha=8, target_modules=ALL_TARGETS)),
    "lora_subset": ("llama", lambda: lf.LoRAConfig(rank=3, alpha=5, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": ("mistral", lambda: lf.RsLoRAConfig(rank=4, alpha=6, target_modules=ALL_TARGETS)),
}


@dataclass
class Exported:
    checkpoint: Path
    config: AdapterConfig
    directory: Path
    model: torch.nn.Module
    adapters: ModelAdapters
    tensors: dict[str, torch.Tensor]


def randomize_adapter(adapters: ModelAdapters, job: str, seed: int, std: float = 0.05) -> None:
    """Give every A and B of `job` seeded N(0, std) values (B non-zero, so the adapter does something)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.parameters(job):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tiny_checkpoints, tmp_path_factory) -> Exported:
    family, make_config = CASES[request.param]
    checkpoint, config = tiny_checkpoints[family], make_config()
    model, arch = build_model(checkpoint, dtype=torch.float32)
    model.eval()
    adapters = ModelAdapters(model, arch)
    adapters.add_job("job", config, seed=0)
    randomize_adapter(adapters, "job", seed=7)
    tensors = adapters.peft_state_dict("job")
    directory = write_peft_adapter(tmp_path_factory.mktemp(request.param) / "adapter", tensors, config,
                                   base_model=str(checkpoint))
    return Exported(checkpoint, config, Path(directory), model, adapters, tensors)


def _peft_model(load_hf_model, checkpoint: Path, adapter_dir: Path) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(load_hf_model(checkpoint), str(adapter_dir)).eval()


@torch.no_grad()
def _our_logits(exp: Exported, ids: torch.Tensor, job: str | None = "job") -> torch.Tensor:
    """[b, s, V] logits of equal-length rows, packed into one microbatch, with `job`'s adapter (None: base)."""
    rows = [Sample(input_ids=tuple(r.tolist()), labels=(IGNORE_INDEX,) * len(r), source="t") for r in ids]
    mb = build_microbatch([(job or "", s) for s in rows])
    exp.adapters.batch.segments = mb.segments if job is not None else []
    try:
        logits = exp.model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.packed_seq_params())
    finally:
        exp.adapters.batch.segments = []
    return logits.reshape(ids.shape[0], ids.shape[1], -1)


def _hf_mean_loss(model: torch.nn.Module, samples: list[Sample]) -> tuple[float, int]:
    """Mean CE over loss tokens, one row at a time; labels[t] is the target of position t."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(torch.tensor([sample.input_ids])).logits[0]  # [len, V]
            labels = torch.tensor(sample.labels)
            total += F.cross_entropy(logits.double(), labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    return total / count, count


def test_peft_logits_match_ours(exported, load_hf_model):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 23))
    ours = _our_logits(exported, ids)
    base = _our_logits(exported, ids, job=None)
    assert (ours - base).abs().max() > 1e-2, "the random adapter should change the logits"
    with torch.no_grad():
        theirs = _peft_model(load_hf_model, exported.checkpoint, exported.directory)(ids).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max |ours - PEFT| = {diff:.3e} > {ATOL}"


def test_adapter_config_has_peft_fields(exported):
    data = json.loads((exported.directory / "adapter_config.json").read_text())
    config = exported.config
    assert data["peft_type"] == "LORA"
    assert data["r"] == config.rank
    assert data["lora_alpha"] == config.alpha
    assert sorted(data["target_modules"]) == sorted(config.target_modules)
    assert data["use_rslora"] is (config.type == "rslora")
    assert data["task_type"] == "CAUSAL_LM"
    assert (exported.directory / "adapter_model.safetensors").is_file()


def test_exported_tensors_use_hf_module_names(exported):
    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    expected = {
        f"base_model.model.model.layers.{i}.{parents[t]}.{t}.lora_{ab}.weight"
        for i in range(exported.adapters.arch.num_layers) for t in exported.config.target_modules for ab in "AB"
    }
    assert set(exported.tensors) == expected


def test_read_peft_adapter_round_trips(exported):
    config, tensors = read_peft_adapter(exported.directory)
    assert type(config) is type(exported.config)
    assert config.to_dict() == exported.config.to_dict()
    assert tensors.keys() == exported.tensors.keys()
    for key, value in exported.tensors.items():
        assert torch.equal(tensors[key], value), key


@pytest.fixture(scope="module")
def eval_rows(examples_data) -> Path:
    return examples_data / "arith_eval.jsonl"


def test_evaluate_matches_transformers_peft(exported, eval_rows, load_hf_model):
    samples = load_dataset(eval_rows, load_tokenizer(exported.checkpoint), max_seq_len=4096)
    hf_loss, hf_tokens = _hf_mean_loss(_peft_model(load_hf_model, exported.checkpoint, exported.directory), samples)
    result = lf.evaluate(exported.checkpoint, exported.directory, eval_rows, dtype="float32")
    assert result.tokens == hf_tokens
    assert abs(result.loss - hf_loss) <= LOSS_RTOL * abs(hf_loss), (result.loss, hf_loss)

    base = lf.evaluate(exported.checkpoint, None, eval_rows, dtype="float32")
    assert base.tokens == hf_tokens
    assert abs(base.loss - result.loss) > 1e-3 * abs(hf_loss), "the adapter should change the loss"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_evaluate_base_model_matches_transformers(family, tiny_checkpoints, eval_rows, load_hf_model):
    checkpoint = tiny_checkpoints[family]
    samples = load_dataset(eval_rows, load_tokenizer(checkpoint), max_seq_len=4096)
    hf_loss, hf_tokens = _hf_mean_loss(load_hf_model(checkpoint), samples)
    result = lf.evaluate(checkpoint, None, eval_rows, dtype="float32")
    assert result.tokens == hf_tokens
    assert abs(result.loss - hf_loss) <= LOSS_RTOL * abs(hf_loss), (result.loss, hf_loss)


def test_adapter_saved_by_peft_evaluates_like_peft(tiny_checkpoints, tmp_path, eval_rows, load_hf_model):
    """The other direction: an adapter written by PEFT's save_pretrained is read by lf.evaluate."""
    checkpoint = tiny_checkpoints["llama"]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(load_hf_model(checkpoint), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(tmp_path / "peft_adapter"))
    samples = load_dataset(eval_rows, load_tokenizer(checkpoint), max_seq_len=4096)
    hf_loss, _ = _hf_mean_loss(model.eval(), samples)
    result = lf.evaluate(checkpoint, tmp_path / "peft_adapter", eval_rows, dtype="float32")
    assert abs(result.loss - hf_loss) <= LOSS_RTOL * abs(hf_loss), (result.loss, hf_loss)
