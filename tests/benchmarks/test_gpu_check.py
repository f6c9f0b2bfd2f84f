"""benchmarks/gpu_check.sh on a machine without CUDA: it checks its dependencies, then stops with exit code 2 and
a message before any GPU step (the GPU steps run where a GPU is lent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs its GPU steps")
def test_stops_before_the_gpu_steps_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "every dependency is installed" in done.stdout
    assert "sees no CUDA device" in done.stderr and "nothing was measured" in done.stderr
    assert not list(tmp_path.iterdir())  # no rows written
