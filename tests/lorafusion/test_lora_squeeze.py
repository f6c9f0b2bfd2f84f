"""Post-hoc LoRA-Squeeze (`lf.squeeze`, `lorafusion squeeze`): the best rank-R LoRA of an adapter of any variant,
checked against SVDs computed here of ΔW as PEFT computes it, against PEFT's own convert_to_lora, and through PEFT's
loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters.svd import RANDOMIZED_MIN_DIM, randomized_svd, svd_method
from lorafusion.cli import main
from lorafusion.squeeze import REPORT_NAME

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "o_proj", "down_proj"]
PEFT_SOURCES = {
    "lora": lambda: peft.LoraConfig(r=6, lora_alpha=9, target_modules=TARGETS),
    "dora": lambda: peft.LoraConfig(r=5, lora_alpha=7, use_dora=True, target_modules=TARGETS),
    "vera": lambda: peft.VeraConfig(r=8, d_initial=0.3, projection_prng_key=2, target_modules=TARGETS),
    "shira": lambda: peft.ShiraConfig(r=2, random_seed=3, target_modules=TARGETS),
    "randlora": lambda: peft.RandLoraConfig(r=16, randlora_alpha=32, projection_prng_key=1, target_modules=TARGETS),
}
IDS = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(0))


def peft_source(kind: str, checkpoint: Path, load_hf_model, directory: Path, seed: int = 0):
    """A PEFT model of `kind` with every trainable tensor perturbed (B, λ_b, SHiRA's values start at 0), saved by
    PEFT into `directory`."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_hf_model(checkpoint), PEFT_SOURCES[kind]())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(str(directory))
    return model.eval()


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """Module ('model.layers.0.self_attn.q_proj') -> dense ΔW [N, K] as PEFT computes it; DoRA's from its formula
    (PEFT's get_delta_weight leaves out the magnitude): (m / ‖W + sBA‖_row) ⊙ (W + sBA) − W."""
    deltas = {}
    for name, module in model.named_modules():
        if not isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer) or not hasattr(module, "get_delta_weight"):
            continue
        delta = module.get_delta_weight("default").detach().float()
        delta = delta.to_dense() if delta.is_sparse else delta  # SHiRA's
        if getattr(module, "use_dora", {}).get("default"):
            w = module.get_base_layer().weight.detach().float()
            merged = w + delta
            m = module.lora_magnitude_vector["default"].weight.detach()
            delta = (m / torch.linalg.norm(merged, dim=1))[:, None] * merged - w
        deltas[name.removeprefix("base_model.model.")] = delta
    return deltas


def squeezed_products(directory: Path) -> dict[str, torch.Tensor]:
    """Module -> B A of a squeezed adapter (scaling 1: lora_alpha = r is checked here too)."""
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] and not config["use_rslora"]
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
            tensors[key.replace("lora_A", "lora_B")] @ tensors[key] for key in tensors if key.endswith("lora_A.weight")}


@pytest.mark.parametrize("kind, svd", [("lora", "auto"), ("dora", "auto"), ("vera", "auto"), ("shira", "exact"),
                                       ("shira", "randomized"), ("randlora", "auto")])
def test_eckart_young_optimal_for_every_variant(kind, svd, tiny_checkpoints, load_hf_model, tmp_path):
    """‖ΔW − ΔW_R‖²_F = Σ_{i>R} σ_i², with σ from an SVD here of ΔW as PEFT computes it (randomized: within 1%)."""
    checkpoint = tiny_checkpoints["llama"]
    source = peft_source(kind, checkpoint, load_hf_model, tmp_path / "source")
    rank = 3
    result = lf.squeeze(tmp_path / "source", rank=rank, output_dir=tmp_path / "out", svd=svd)
    assert result.source_type == kind
    products, deltas = squeezed_products(tmp_path / "out"), peft_deltas(source)
    assert products.keys() == deltas.keys() == result.errors.keys() and len(deltas) == 2 * len(TARGETS)
    for module, delta in deltas.items():
        sigma = torch.linalg.svdvals(delta.double())
        tail, total = sigma[rank:].pow(2).sum().item(), sigma.pow(2).sum().item()
        assert tail > 1e-6 * total, "the test needs updates of rank > R"
        got = (delta - products[module]).double().pow(2).sum().item()
        if result.methods[module] == "randomized":
            assert tail * (1 - 1e-5) <= got <= tail * 1.01, module
        else:
            assert got == pytest.approx(tail, rel=1e-4), module
            assert result.errors[module] == pytest.approx((tail / total) ** 0.5, rel=1e-4)
    assert set(result.methods.values()) == {"factors" if kind in ("lora", "vera") else svd.replace("auto", "exact")}
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["modules"].keys() == result.errors.keys() and report["max_error"] == result.max_error


def test_equals_peft_convert_to_lora(tiny_checkpoints, load_hf_model, tmp_path):
    from peft.tuners.lora.conversion import convert_to_lora

    checkpoint = tiny_checkpoints["qwen2"]
    source = peft_source("lora", checkpoint, load_hf_model, tmp_path / "source", seed=4)
    with pytest.warns(UserWarning, match="already a LoRA"):
        config, theirs = convert_to_lora(source, rank=4)
    lf.squeeze(tmp_path / "source", rank=4, output_dir=tmp_path / "out")
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (config.r, config.lora_alpha) == (4, 4)
    assert ours.keys() == theirs.keys()
    for key in (k for k in ours if k.endswith("lora_A.weight")):
        a, b = ours[key], ours[key.replace("lora_A", "lora_B")]
        a_p, b_p = theirs[key], theirs[key.replace("lora_A", "lora_B")]
        sign = torch.sign((a * a_p).sum(dim=1))  # singular vectors are unique up to sign
        torch.testing.assert_close(a, a_p * sign[:, None], atol=1e-5, rtol=0)
        torch.testing.assert_close(b, b_p * sign[None, :], atol=1e-5, rtol=0)


@torch.no_grad()
def _dense_logits(load_hf_model, checkpoint: Path, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the plain HF model whose weights are W + ΔW (no PEFT involved)."""
    model = load_hf_model(checkpoint)
    for module, delta in deltas.items():
        model.get_submodule(module).weight.add_(delta)
    return model(IDS).logits


@pytest.mark.parametrize("rank", [2, 6, 9])
def test_loads_in_peft_with_the_dense_logits_and_exact_at_source_rank(rank, tiny_checkpoints, load_hf_model, tmp_path):
    """PEFT's load of the squeezed adapter gives the logits of W + ΔW_R; at R ≥ r_src (6) ΔW_R = ΔW."""
    checkpoint = tiny_checkpoints["mistral"]
    source = peft_source("lora", checkpoint, load_hf_model, tmp_path / "source", seed=rank)
    result = lf.squeeze(tmp_path / "source", rank=rank, output_dir=tmp_path / "out")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(load_hf_model(checkpoint), str(tmp_path / "out")).eval()(IDS).logits
    dense = _dense_logits(load_hf_model, checkpoint, squeezed_products(tmp_path / "out"))
    assert (theirs - dense).abs().max().item() <= 2e-5  # W + ΔW_R merged vs added after: rounding of |logits| ≲ 10
    if rank >= 6:
        assert result.max_error <= 1e-6
        with torch.no_grad():
            assert (theirs - source(IDS).logits).abs().max().item() <= 1e-5
    else:
        assert result.max_error > 1e-2


def test_randomized_svd_is_seeded_and_near_optimal():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 60, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(200, 60, generator=generator))
    sigma = 0.8 ** torch.arange(60.0)  # a slowly decaying spectrum
    m = (u * sigma) @ v.t()
    first, again = randomized_svd(m, 5, seed=1), randomized_svd(m, 5, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    uu, s, vh = first
    assert ((m - (uu * s) @ vh).pow(2).sum() / sigma[5:].pow(2).sum()).item() == pytest.approx(1.0, abs=1e-3)
    assert svd_method((64, 64), 8) == "exact"
    assert svd_method((4096, RANDOMIZED_MIN_DIM), 16) == "randomized"
    assert svd_method((4096, RANDOMIZED_MIN_DIM), 300) == "exact"  # the sketch would be over a quarter of min(N, K)


# ---------------------------------------------------------------- command line


@pytest.fixture
def source_dir(tiny_checkpoints, load_hf_model, tmp_path) -> Path:
    peft_source("lora", tiny_checkpoints["llama"], load_hf_model, tmp_path / "source")
    return tmp_path / "source"


def test_cli_happy_path_and_force(source_dir, tmp_path, capsys):
    out = tmp_path / "squeezed"
    assert main(["squeeze", str(source_dir), "--rank", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank-2 LoRA" in printed and "max" in printed and "mean" in printed and "worst:" in printed
    report = json.loads((out / REPORT_NAME).read_text())
    assert f"max {report['max_error']:.3g}" in printed and len(report["modules"]) == 2 * len(TARGETS)
    assert main(["squeeze", str(source_dir), "--rank", "3", "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2  # untouched
    assert main(["squeeze", str(source_dir), "--rank", "3", "--output", str(out), "--force"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temp folders left


@pytest.mark.parametrize("case, words", [
    ("rank 0", ["rank=0", "positive integer"]),
    ("rank too big", ["rank=33", "k_proj's 32×64", "choose rank ≤ 32"]),
    ("no adapter", ["has no adapter_config.json", "folder written by lorafusion or PEFT"]),
    ("bad json", ["adapter_config.json: not valid JSON"]),
    ("base model gone", ["base_model_name_or_path=", "moved' is not a directory", "--base-model PATH"]),
    ("bad base model", ["base model", "nowhere' is not a directory", "(given)", "--base-model PATH"]),
])
def test_cli_bad_input_names_the_value_and_the_fix(case, words, source_dir, tmp_path, capsys):
    args = {"rank 0": ["--rank", "0"], "rank too big": ["--rank", "33"],
            "bad base model": ["--rank", "2", "--base-model", str(tmp_path / "nowhere")]}.get(case, ["--rank", "2"])
    config = source_dir / "adapter_config.json"
    if case == "no adapter":
        config.unlink()
    elif case == "bad json":
        config.write_text("{")
    elif case == "base model gone":
        config.write_text(json.dumps({**json.loads(config.read_text()),
                                      "base_model_name_or_path": str(tmp_path / "moved")}))
    assert main(["squeeze", str(source_dir), *args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()
