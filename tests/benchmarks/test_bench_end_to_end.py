"""bench_end_to_end at a toy size (seconds): every provider trains the same real tokens, agrees on the
step-1 loss (LoRA B starts at 0, so all three see the base model), and the row's ratios are a/b and a/c
(of the medians, when there are repeats)."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import bench_end_to_end as bench
from benchmarks.bench_end_to_end import BenchConfig, main, result_row, run_benchmark

TOY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, steps=2, repeats=1,
           global_batch_size=2, rank=4, threads=1, max_tokens_per_microbatch=1024)


def _argv(cache_dir, **extra) -> list[str]:
    args = {**TOY, "cache_dir": str(cache_dir), **extra}
    return [part for key, value in args.items() for part in ("--" + key.replace("_", "-"), str(value))]


def test_providers_train_the_same_tokens(tmp_path):
    # engine local, as the bench runs one stage by default (auto without Ray): five fits without an actor each;
    # test_pipeline_stages_2_is_measured runs (a) on Ray actors.
    cfg = BenchConfig(**TOY, cache_dir=str(tmp_path / "cache"), dtype="float32", engine="local")
    results = run_benchmark(cfg)
    assert [len(runs) for runs in results.values()] == [1, 1, 1, 1]
    (a,), (b,), (c,), (cp,) = results["a"], results["b"], results["c"], results["cp"]
    assert a.tokens == b.tokens == c.tokens == cp.tokens > 0
    assert c.padded_tokens > c.tokens  # the chat and reverse batches have unequal lengths
    assert cp.padded_tokens == cp.tokens  # packed: no padding
    for job, loss in a.first_loss.items():
        assert b.first_loss[job] == pytest.approx(loss, abs=1e-5)
        assert c.first_loss[job] == pytest.approx(loss, abs=1e-4)  # HF + PEFT computes the same loss
        assert cp.first_loss[job] == pytest.approx(loss, abs=1e-4)  # packed rows: no attention across samples
    assert sorted(a.first_loss) == ["arith", "chat", "greet", "reverse"]
    bound = bench.measure_ceiling(cfg)
    row = result_row(cfg, results, bound)
    assert row["a_over_cp"] == pytest.approx(a.tokens_per_s / cp.tokens_per_s, rel=1e-2)
    assert row["a_ceiling_fraction"] == pytest.approx(a.tokens_per_s / bound.tokens_per_s, rel=1e-2, abs=1e-4)
    assert row["a_over_b"] == pytest.approx(a.tokens_per_s / b.tokens_per_s, rel=1e-2)
    assert row["a_over_c"] == pytest.approx(a.tokens_per_s / c.tokens_per_s, rel=1e-2)
    assert row["c_padding_fraction"] == pytest.approx(1 - c.tokens / c.padded_tokens, abs=1e-3)


def test_main_appends_one_row_of_medians(tmp_path, monkeypatch):
    # Repeats are tested here, on a and c only: b (four fits) would double the time and test nothing more.
    measured = []
    monkeypatch.setattr(bench, "run_benchmark", lambda cfg: measured.append(run_benchmark(cfg)) or measured[-1])
    assert main(_argv(tmp_path / "cache", providers="a,c", repeats=2, engine="local"),
                results_dir=tmp_path / "results") == 0
    (results,) = measured
    (a, a2), (c, c2) = results["a"], results["c"]
    assert a2.tokens == a.tokens and c2.first_loss == pytest.approx(c.first_loss)  # repeats redo the same work
    with (tmp_path / "results" / "end_to_end.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    row = rows[0]
    assert row["repeats"] == "2" and row["b_tokens_per_s"] == "" and row["a_over_b"] == ""
    median = {name: sum(r.tokens_per_s for r in runs) / 2 for name, runs in results.items()}  # median of two
    assert float(row["a_over_c"]) == pytest.approx(median["a"] / median["c"], rel=1e-2)
    assert len(row["a_over_c_per_repeat"].split(";")) == 2
    assert row["commit"] and row["device"]
    assert float(row["ceiling_tokens_per_s"]) > 0 and float(row["a_ceiling_fraction"]) > 0


def test_pipeline_stages_2_is_measured(tmp_path, ray_session, monkeypatch):
    measured = []
    ceiling = bench.ceiling
    monkeypatch.setattr(bench, "ceiling", lambda *a, **k: measured.append(ceiling(*a, **k)) or measured[-1])
    assert main(_argv(tmp_path / "cache", pipeline_stages=2, providers="a"), results_dir=tmp_path / "results") == 0
    with (tmp_path / "results" / "end_to_end.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["pipeline_stages"] for r in rows] == ["2"]
    assert 0.0 <= float(rows[0]["a_bubble_fraction"]) < 1.0  # the fit's measured bubble, from run_metrics.json
    # the ceiling counts both stages computing at once, each at the one-stage rate the row records (compared with
    # the unrounded Ceiling: the row rounds the toy model's FLOPs per token to 0.01 MFLOP)
    (bound,) = measured
    row = rows[0]
    assert bound.stages == 2
    assert bound.tokens_per_s == pytest.approx(2 * bound.matmul_flops_per_s / bound.flops_per_token, rel=1e-12)
    assert float(row["gemm_gflops"]) == pytest.approx(bound.matmul_flops_per_s / 1e9, abs=0.05)
    assert float(row["ceiling_tokens_per_s"]) == pytest.approx(bound.tokens_per_s, abs=0.05)
    # the row rounds the fraction to 4 decimals: abs 1e-4 (the toy fraction is ~0.01)
    assert float(row["a_ceiling_fraction"]) == pytest.approx(float(row["a_tokens_per_s"]) / bound.tokens_per_s,
                                                             rel=1e-2, abs=1e-4)


def test_refused_parallelism_is_reported_and_records_nothing(tmp_path, capsys, ray_session):
    # The toy model has 2 layers: the runtime refuses 3 stages before training.
    code = main(_argv(tmp_path / "cache", pipeline_stages=3, providers="a"), results_dir=tmp_path / "results")
    assert code == 3
    assert "pipeline_stages=3 was not measured" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_bad_provider_is_refused():
    with pytest.raises(ValueError, match="providers=.*choose from a, b, c, cp"):
        BenchConfig(providers=("a", "d"))


def test_bfloat16_providers_train_the_same_tokens(tmp_path, ray_session):
    """--dtype bfloat16 (the GPU setting): ours and HF + PEFT both compute in bf16 over fp32 adapter weights and
    agree on the step-1 loss to bf16 precision."""
    cfg = BenchConfig(**{**TOY, "providers": ("a", "c")}, dtype="bfloat16", cache_dir=str(tmp_path / "cache"))
    results = run_benchmark(cfg)
    (a,), (c,) = results["a"], results["c"]
    assert a.tokens == c.tokens > 0
    for job, loss in a.first_loss.items():
        assert c.first_loss[job] == pytest.approx(loss, rel=2e-2)
    assert result_row(cfg, results)["dtype"] == "bfloat16"
    model = bench._peft_model(bench.bench_jobs(cfg)[0], bench.bench_checkpoint(cfg), torch.bfloat16)
    dtypes = {("lora" if "lora_" in name else "base", p.dtype) for name, p in model.named_parameters()}
    assert dtypes == {("base", torch.bfloat16), ("lora", torch.float32)}  # (c) as ours: bf16 base, fp32 adapters
    with pytest.raises(ValueError, match="dtype='fp8'; choose one of"):
        BenchConfig(dtype="fp8")


def test_flops_per_token_counts_frozen_linears_lora_and_causal_attention():
    """Hand count for a 1-layer model: base linears and head forward + input gradient, LoRA 6·r·(K + N) per
    adapted module, attention 6·L²·d per head averaged over the tokens."""
    from benchmarks.ceiling import ModelDims, flops_per_token

    dims = ModelDims(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=10)
    # q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16: 64+32+32+64+128+128+128 = 576 multiply-adds
    base = 4 * 576 + 4 * 8 * 10
    lora = 6 * 2 * (8 + 8)  # q_proj only, rank 2
    attention = 6 * 4 * 2 * (3 * 3 + 1 * 1) / 4  # head_dim 4, 2 heads, samples of 3 and 1 tokens
    assert flops_per_token(dims, 2, ["q_proj"], [3, 1]) == pytest.approx(base + lora + attention)


def test_variants_mode_records_each_variant_over_lora(tmp_path):
    """--variants: one row per variant and one for the mixed fit, each over the LoRA fit of the same jobs."""
    argv = _argv(tmp_path / "cache", steps=1, engine="local") + ["--variants", "dora,shira,loraga"]
    assert main(argv, results_dir=tmp_path / "results") == 0
    with (tmp_path / "results" / "variants.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["variant"] for r in rows] == ["dora", "shira", "loraga", "mixed:dora+shira+loraga"]
    for row in rows:
        assert float(row["over_lora"]) == pytest.approx(float(row["tokens_per_s"]) / float(row["lora_tokens_per_s"]),
                                                        rel=1e-2)
        assert row["jobs"] == "4" and row["rank"] == str(TOY["rank"])
    assert {bench.variant_jobs(BenchConfig(**TOY), ["dora", "shira"])[i].adapter.type for i in range(4)} == {"dora", "shira"}
    with pytest.raises(SystemExit):
        main(_argv(tmp_path / "cache") + ["--variants", "lora,nope"])
