"""The shipped demo runs end to end (a few steps) and its losses fall."""

import json

import pytest

from lorafusion.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")


def test_demo_trains_every_job(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "6", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    for job in ("arith", "greet", "reverse", "chat"):
        assert (out / job / "adapter" / "adapter_model.safetensors").is_file()
        losses = [json.loads(line)["loss"] for line in (out / job / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        assert len(losses) == 6 and losses[-1] < losses[0], (job, losses)
        assert f"adapter: {out / job / 'adapter'}" in printed
    assert (tmp_path / "cache" / "tiny-llama-demo" / "config.json").is_file()

    # the same command again: the run is complete, nothing trains
    assert main(["demo", "--steps", "6", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "already holds this run, complete: nothing to train" in capsys.readouterr().out
