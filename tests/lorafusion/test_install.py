"""What a user's install needs: the package's dependency ranges, `lorafusion --version`, and every CPU path without
Triton installed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import lorafusion as lf
from lorafusion.cli import main

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter where importing triton fails, as on a machine without it.
_WITHOUT_TRITON = r'''
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton' (blocked by the test)")
sys.meta_path.insert(0, NoTriton())
import torch
import lorafusion as lf
from lorafusion.ops import fused_lora_linear, lora_linear_reference
gen = torch.Generator().manual_seed(0)
x, w = torch.randn(5, 8, generator=gen), torch.randn(6, 8, generator=gen)
a, b = torch.randn(2, 8, generator=gen), torch.randn(6, 2, generator=gen)
assert torch.equal(fused_lora_linear(x, w, a, b, scaling=2.0), lora_linear_reference(x, w, a, b, scaling=2.0))
from lorafusion.models.tiny import make_tiny_checkpoint
ckpt = make_tiny_checkpoint(sys.argv[1] + "/ckpt", num_layers=1)
job = lf.JobSpec(name="j", dataset=sys.argv[2], global_batch_size=2, max_steps=1,
                 adapter=lf.DoRAConfig(rank=2, target_modules=["q_proj"]))
result = lf.fit([job], lf.RunConfig(base_model=str(ckpt), output_dir=sys.argv[1] + "/out", progress=False,
                                    engine="local"))
assert result["j"].status == "finished"
try:
    lf.fit([job], lf.RunConfig(base_model=str(ckpt), output_dir=sys.argv[1] + "/out2", progress=False,
                               engine="local", kernels="triton"))
except RuntimeError as err:
    print("refused:", err)
assert "triton" not in sys.modules
print("ok")
'''


def test_cpu_paths_work_without_triton(tmp_path, examples_data):
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON, str(tmp_path), str(examples_data / "arith.jsonl")],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
    assert "refused:" in run.stdout and "triton" in run.stdout.split("refused:")[1].lower()


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"lorafusion {lf.__version__}"
    assert lf.__version__ != "0+unknown"  # the test environment installs the package (pip install -e .)


def test_dependencies_are_ranges_and_fit_needs_no_extra():
    """A machine's own torch build (CUDA or CPU, any 2.13.x) is kept: no exact pins; what lf.fit imports (Ray,
    OR-Tools) is a dependency, not an extra. CI's exact pins live in requirements-ci.txt."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].split(";")[0].strip(): d
            for d in project["dependencies"]}
    for name in ("torch", "megatron-core", "ray", "ortools"):
        assert name in deps, name
        assert "==" not in deps[name] and ">=" in deps[name] and "<" in deps[name], deps[name]
    assert "nvidia-ml-py" in deps and "linux" in deps["nvidia-ml-py"].lower()
    extras = project["optional-dependencies"]
    assert "triton" in " ".join(extras["triton"]) and "ray" not in extras and "scheduler" not in extras


def test_each_logger_is_an_extra_named_like_it():
    """`pip install 'lorafusion[wandb]'` is what the error for a missing logger package tells a user to run."""
    from lorafusion.loggers import LOGGERS

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = (REPO / "requirements-ci.txt").read_text()
    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}  # module -> pip name
    for module, extra in LOGGERS.values():
        assert extra in extras and extra in extras["loggers"][0], extra
        assert any(dep.startswith(packages[module]) for dep in extras[extra]), extras[extra]
        assert f"\n{packages[module]}==" in pins  # CI tests each one


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_data_formats_are_an_extra_that_ci_pins():
    """Parquet/Arrow/`datasets` inputs come with `lorafusion[data]` (ranges); huggingface_hub, which resolves Hub ids,
    is a dependency; requirements-ci.txt pins all three exactly so CI tests them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    data = {_requirement_name(r): r for r in project["optional-dependencies"]["data"]}
    deps = {_requirement_name(r): r for r in project["dependencies"]}
    for name, requirement in (("pyarrow", data.get("pyarrow")), ("datasets", data.get("datasets")),
                              ("huggingface-hub", deps.get("huggingface-hub"))):
        assert requirement is not None, name
        assert "==" not in requirement and ">=" in requirement and "<" in requirement, requirement
    pins = {_requirement_name(line): line for line in (REPO / "requirements-ci.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    for name in ("pyarrow", "datasets", "huggingface-hub"):
        assert "==" in pins.get(name, ""), name
