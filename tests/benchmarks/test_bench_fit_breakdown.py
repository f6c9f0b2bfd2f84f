"""bench_fit_breakdown at a toy size: the rows of (a), each job alone and (b) account for the same tokens, split
each fit's time into its microbatches and the rest, and replay the microbatches each fit ran."""

from __future__ import annotations

import csv

import pytest

from benchmarks import bench_fit_breakdown as bench

TOY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, steps=2,
           global_batch_size=2, rank=4, threads=1, max_tokens_per_microbatch=1024)


def test_rows_split_each_fit_and_replay_its_microbatches(tmp_path):
    argv = [part for key, value in {**TOY, "cache_dir": tmp_path / "cache"}.items()
            for part in ("--" + key.replace("_", "-"), str(value))]
    rows = bench.main(argv + ["--replays", "1"], results_dir=tmp_path / "results")
    by_name = {row["provider"]: row for row in rows}
    assert list(by_name) == ["a", "arith", "greet", "reverse", "chat", "b"]
    alone = [by_name[name] for name in ("arith", "greet", "reverse", "chat")]
    a, b = by_name["a"], by_name["b"]
    assert a["tokens"] == b["tokens"] == sum(row["tokens"] for row in alone) > 0
    assert b["fits"] == 4 and b["microbatches"] == sum(row["microbatches"] for row in alone)
    assert b["fit_s"] == pytest.approx(sum(row["fit_s"] for row in alone), abs=1e-2)
    for row in rows:
        assert row["microbatches"] >= 1 and 0 < row["in_microbatches_s"] < row["fit_s"]
        assert row["outside_s"] == pytest.approx(row["fit_s"] - row["in_microbatches_s"], abs=2e-3)
        assert row["replay_s"] > 0 and row["fit_ceiling_fraction"] > 0 and row["replay_ceiling_fraction"] > 0
    assert a["a_over_b_fit"] == pytest.approx(a["fit_tokens_per_s"] / b["fit_tokens_per_s"], rel=1e-2)
    assert a["a_over_b_replay"] == pytest.approx(a["replay_tokens_per_s"] / b["replay_tokens_per_s"], rel=1e-2)
    with (tmp_path / "results" / "fit_breakdown.csv").open() as handle:
        assert [row["provider"] for row in csv.DictReader(handle)] == list(by_name)
