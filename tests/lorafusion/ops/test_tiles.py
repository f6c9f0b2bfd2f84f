"""Tile choice: the autotune keeps the fastest candidate that runs, and an unknown GPU never raises."""

from __future__ import annotations

import inspect

import pytest
import torch

from lorafusion.ops import utils
from lorafusion.ops.utils import DEFAULT_CONFIG, INTERPRET_CONFIG, INTERPRET_CONFIG_WIDE, TUNE_CONFIGS, pick_config, tuned


def test_tuned_keeps_fastest_working_candidate_and_caches(monkeypatch):
    monkeypatch.setattr(utils, "_TUNED", {})
    fastest, broken = TUNE_CONFIGS[2], TUNE_CONFIGS[1]
    calls = []

    def bench(config):
        calls.append(config)
        if config == broken:
            raise RuntimeError("out of resources: shared memory")  # e.g. a 128x256 tile on a small GPU
        return 1.0 if config == fastest else 2.0

    assert tuned(("GPU", 4096, 4096, 16), bench) == fastest
    assert len(calls) == len(TUNE_CONFIGS)
    assert tuned(("GPU", 4096, 4096, 16), bench) == fastest and len(calls) == len(TUNE_CONFIGS)  # cached


def test_tuned_falls_back_to_default(monkeypatch):
    monkeypatch.setattr(utils, "_TUNED", {})

    def failing(config):
        raise RuntimeError("no candidate runs")

    assert tuned(("GPU", 1, 2, 3), None) == DEFAULT_CONFIG
    assert tuned(("GPU", 1, 2, 3), failing) == DEFAULT_CONFIG
    monkeypatch.setenv("LORAFUSION_AUTOTUNE", "0")
    assert tuned(("GPU", 5, 6, 7), lambda config: 1.0) == DEFAULT_CONFIG


def test_tiles_are_chosen_before_training_and_read_back(monkeypatch, tmp_path):
    """tune_tiles times every candidate once per (device, N, K) whatever the rank; the choice survives a save and
    a load (a resumed run computes with the same tiles); the forward itself never times anything."""
    from lorafusion.ops.fused_lora import tune_tiles

    monkeypatch.setattr(utils, "_TUNED", {})
    fastest = TUNE_CONFIGS[3]
    timed = []

    def bench(config, run):
        timed.append(config)
        return 1.0 if config == fastest else 2.0

    cpu = torch.device("cpu")
    tune_tiles([(24, 16, 4), (24, 16, 12), (8, 16, 4)], 32, torch.float32, cpu, bench=bench)
    assert len(timed) == 2 * len(TUNE_CONFIGS)  # (24, 16) once, whatever its rank; (8, 16) once
    assert utils._TUNED == {("cpu", 24, 16): fastest, ("cpu", 8, 16): fastest}
    utils.save_tiles(tmp_path / "tiles.json")
    monkeypatch.setattr(utils, "_TUNED", {})
    assert utils.load_tiles(tmp_path / "tiles.json") == 2
    assert utils._TUNED == {("cpu", 24, 16): fastest, ("cpu", 8, 16): fastest}
    tune_tiles([(24, 16, 4)], 32, torch.float32, cpu, bench=bench)
    assert len(timed) == 2 * len(TUNE_CONFIGS)  # loaded: not timed again
    (tmp_path / "bad.json").write_text("[{\"gpu\": 1}]")
    with pytest.raises(ValueError, match="bad.json.*delete the file"):
        utils.load_tiles(tmp_path / "bad.json")
    assert "bench" not in inspect.signature(pick_config).parameters


def test_cpu_tiles_are_the_interpreter_config():
    assert pick_config(23, 29, 8, torch.device("cpu")) == INTERPRET_CONFIG
    assert pick_config(128, 64, 8, torch.device("cpu")) == INTERPRET_CONFIG_WIDE
