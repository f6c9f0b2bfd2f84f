"""`lorafusion demo`: four small jobs trained together on a tiny Llama-architecture model, on CPU.

The checkpoint (random weights, byte-level tokenizer) is made once and cached; the datasets ship in
examples/data and have clearly different lengths: arith (~11 tokens), greet (~28), reverse (~100)
and chat (~340, chat format).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEMO_DATA", "DEMO_MODEL", "demo_checkpoint", "demo_checkpoint_at", "demo_jobs", "run_demo"]

DEMO_DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
# Large enough that the four tasks are learnable, small enough for ~1-2 minutes on 2 CPU cores.
DEMO_MODEL = dict(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2,
                  init_std=0.05, seed=0)
_DEMO_STEPS = 120


def demo_checkpoint(cache_dir: str | None = None) -> Path:
    """The tiny demo checkpoint, built on first use under `cache_dir` (default ~/.cache/lorafusion)."""
    root = Path(cache_dir or os.environ.get("LORAFUSION_CACHE", Path.home() / ".cache" / "lorafusion"))
    return demo_checkpoint_at(root / "tiny-llama-demo")


def demo_checkpoint_at(directory: str | Path) -> Path:
    """Write the demo checkpoint into `directory` unless it already holds one."""
    from lorafusion.models.tiny import make_tiny_checkpoint

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        make_tiny_checkpoint(directory, **DEMO_MODEL)
    return directory


def demo_jobs(steps: int = _DEMO_STEPS) -> list:
    import lorafusion as lf

    def job(name: str, rank: int, batch: int, **extra):
        return lf.JobSpec(name=name, dataset=str(DEMO_DATA / f"{name}.jsonl"),
                          adapter=lf.LoRAConfig(rank=rank, alpha=2 * rank, dropout=0.05),
                          global_batch_size=batch, learning_rate=3e-3, max_steps=steps, warmup_steps=5,
                          lr_schedule="cosine", min_lr_ratio=0.1, **extra)

    return [
        job("arith", 8, 16, eval_dataset=str(DEMO_DATA / "arith_eval.jsonl"), eval_every_steps=max(steps // 3, 1)),
        job("greet", 8, 8),
        job("reverse", 16, 8, seed=1),
        job("chat", 16, 4, seed=2),
    ]


def run_demo(*, output_dir: str = "runs/demo", steps: int | None = None, cache_dir: str | None = None,
             overwrite: bool = False):
    """Train the demo jobs together and print where the adapters are. An output dir holding an interrupted demo
    resumes it (a finished one says so), unless `overwrite`."""
    import lorafusion as lf

    checkpoint = demo_checkpoint(cache_dir)
    # The demo shows the product's runtime: stage actors on an embedded local Ray instance.
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=output_dir, max_tokens_per_microbatch=1024,
                       log_every_steps=10, overwrite=overwrite, engine="ray")
    result = lf.fit(demo_jobs(steps or _DEMO_STEPS), run)
    print("\n" + result.summary())
    return result
