"""Shared fixtures: tiny HF checkpoints built once per session, and a transformers loader for parity tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

EXAMPLES_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"

# The models here are a few thousand parameters; one intra-op thread is fastest and keeps the suite
# from oversubscribing a 2-core CI runner (with the default thread count fits ran 10-50x slower there).
torch.set_num_threads(1)


@dataclass(frozen=True)
class TinySpec:
    """How one parity checkpoint differs from the defaults of `make_tiny_checkpoint`."""

    family: str
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    rope_theta: float
    seed: int


# Between them: every family, GQA with 1 and 2 kv heads, tied and untied heads, default and
# non-default RoPE bases. init_std 0.2 keeps logits far from uniform so parity is a real check.
PARITY_SPECS = {
    "llama": TinySpec(family="llama", num_heads=4, num_kv_heads=2, tie_word_embeddings=False,
                      rope_theta=500000.0, seed=11),
    "qwen2": TinySpec(family="qwen2", num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                      rope_theta=1000000.0, seed=12),
    "mistral": TinySpec(family="mistral", num_heads=4, num_kv_heads=1, tie_word_embeddings=False,
                        rope_theta=10000.0, seed=13),
}
PARITY_INIT_STD = 0.2


@pytest.fixture(scope="session")
def parity_specs() -> dict[str, TinySpec]:
    """family -> how its parity checkpoint is built (GQA, tying, RoPE base)."""
    return PARITY_SPECS


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> checkpoint directory (hidden 64, 2 layers, init_std 0.2), see PARITY_SPECS."""
    from lorafusion.models.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("parity_checkpoints")
    return {
        name: make_tiny_checkpoint(
            root / name, family=spec.family, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
            tie_word_embeddings=spec.tie_word_embeddings, rope_theta=spec.rope_theta,
            init_std=PARITY_INIT_STD, seed=spec.seed,
        )
        for name, spec in PARITY_SPECS.items()
    }


@pytest.fixture(scope="session")
def train_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama (hidden 64, 2 layers, GQA 4/2) for training tests.

    init_std 0.1 rather than the default 0.02: with near-zero weights the LoRA gradients are ~1e-8,
    comparable to AdamW's eps, and the adapters become needlessly sensitive to fp32 rounding.
    """
    from lorafusion.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("train_checkpoint") / "llama", init_std=0.1, seed=3)


@pytest.fixture(scope="session")
def examples_data() -> Path:
    """The shipped demo datasets (greet, arith, reverse, chat, arith_eval)."""
    return EXAMPLES_DATA


@pytest.fixture(scope="session")
def load_hf_model() -> Callable[[Path], torch.nn.Module]:
    """A loader for a fresh `transformers` causal LM (fp32, eval mode) from a checkpoint directory."""
    transformers = pytest.importorskip("transformers")

    def load(path: Path) -> torch.nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    return load


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that fits (a fit started without Ray starts and stops its own,
    which costs seconds each time). Each CPU actor uses one thread, like the tests' own process."""
    import os

    import ray

    from runtime.backend import CPU_THREADS_ENV, connect_ray

    os.environ[CPU_THREADS_ENV] = "1"
    started = connect_ray(num_actors=4)
    yield
    if started:
        ray.shutdown()
