"""Mixed-variant runs as a user sees them: the shipped example config, the progress line."""

from __future__ import annotations

import json
from pathlib import Path

import lorafusion as lf


def test_shipped_mixed_variant_example_trains(train_checkpoint, tmp_path):
    """examples/variants.yaml (the README's mixed-variant config) loads and trains, two steps per job, and each
    job's adapter is in its variant's PEFT format."""
    example = Path(__file__).resolve().parents[2] / "examples" / "variants.yaml"
    jobs, run = lf.load_config(example, [f"run.base_model={train_checkpoint}", f"run.output_dir={tmp_path / 'out'}",
                                         "run.progress=false", "run.engine=local", "run.dtype=float32"]
                               + [f"jobs.{name}.max_steps=2" for name in ("arith-dora", "greet-vera", "reverse-shira",
                                                                          "arith-loraga", "greet-unilora",
                                                                          "reverse-randlora")])
    assert len({j.adapter.type for j in jobs}) == 6
    result = lf.fit(jobs, run)
    types = {}
    for job in jobs:
        assert result[job.name].status == "finished" and result[job.name].steps == 2
        types[job.name] = json.loads((Path(result[job.name].adapter_path) / "adapter_config.json").read_text())["peft_type"]
    assert types == {"arith-dora": "LORA", "greet-vera": "VERA", "reverse-shira": "SHIRA", "arith-loraga": "LORA",
                     "greet-unilora": "UNILORA", "reverse-randlora": "RANDLORA"}


def test_progress_line_names_each_jobs_variant():
    import io

    from runtime.progress import Progress

    stream = io.StringIO()
    progress = Progress({"a": 2, "bb": 2}, every=1, enabled=True, stream=stream, variants={"a": "dora", "bb": "shira"})
    progress.step("a", 1, 1.5, 1e-3, 100.0)
    progress.step("bb", 2, 1.25, 1e-3, 100.0)
    progress.eval("a", 1, 1.0)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("  a [dora]  ") and lines[1].startswith("  bb [shira] ") and "eval @ step 1" in lines[2]
    assert lines[2].startswith("  a [dora]  ")
