"""The written checkpoint format (docs/checkpoints.md and lorafusion/checkpoint's docstring) against the checkpoints
of a real fit, and the folders named by step: a file, key or tensor added, renamed or dropped on either side fails
here."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

import lorafusion as lf
import lorafusion.checkpoint as checkpoint

DOC = Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md"


def _jobs(examples_data: Path) -> list[lf.JobSpec]:
    """Two jobs of different lengths: after the first window only greet steps."""
    return [
        lf.JobSpec(name="greet", dataset=str(examples_data / "greet.jsonl"), adapter=lf.LoRAConfig(rank=2),
                   global_batch_size=2, max_steps=3, seed=1),
        lf.JobSpec(name="arith", dataset=str(examples_data / "arith.jsonl"), adapter=lf.LoRAConfig(rank=2),
                   global_batch_size=2, max_steps=1, seed=2),
    ]


def _run(train_checkpoint: Path, out: Path, **fields) -> lf.RunConfig:
    return lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), max_tokens_per_microbatch=256,
                        engine="local", dtype="float32", checkpoint_every_steps=1, keep_checkpoints=10,
                        **{"progress": False, **fields})


@pytest.fixture(scope="module")
def fitted(train_checkpoint, examples_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("format") / "run"
    lf.fit(_jobs(examples_data), _run(train_checkpoint, out))
    return out


def _table(section: str, header: str) -> dict[str, str]:
    """First cell (in backticks) -> the rest of the row, for the table headed `| header |` under the heading
    `section` of docs/checkpoints.md."""
    body = DOC.read_text().split(f"\n{section}\n", 1)[1]
    body = re.split(r"\n#{2,3} ", body, maxsplit=1)[0]
    table = body.split(f"\n| {header} |", 1)[1].split("\n\n", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \|(.*)\|$", table, re.M)}
    assert rows, f"docs/checkpoints.md: no `| {header} |` table under {section!r}"
    return rows


def _pattern(documented: str) -> re.Pattern:
    """A documented path or name with placeholders (<job>, <s>, <name>, <key>) as a regex."""
    parts = re.split(r"(<[a-z]+>)", documented)
    wild = {"<job>": r"[^/]+", "<s>": r"\d+", "<name>": r".+", "<key>": r"[^/]+"}
    return re.compile("".join(wild.get(p, re.escape(p)) for p in parts) + "$")


def _match_both_ways(real: set[str], documented: list[str], what: str) -> None:
    """Every real name matches exactly one documented pattern, and every pattern matches a real name."""
    patterns = {d: _pattern(d) for d in documented}
    for name in sorted(real):
        hits = [d for d, p in patterns.items() if p.match(name)]
        assert len(hits) == 1, f"{what}: '{name}' is documented by {hits} (exactly one expected)"
    for documented_name, pattern in patterns.items():
        assert any(pattern.match(name) for name in real), f"{what}: '{documented_name}' is documented but not written"


def test_checkpoint_folders_are_named_by_the_jobs_steps_summed(fitted):
    """greet steps 3 times, arith once (both in the first window): step 1 + 1, then greet's 2nd and 3rd steps; the
    end-of-fit save at step 4 replaces the periodic one."""
    names = sorted(p.name for p in (fitted / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003", "step-00000004"]
    for windows, name in enumerate(names, start=1):
        manifest = checkpoint.read_manifest(fitted / "checkpoints" / name)
        steps = {job: checkpoint.read_driver_state(fitted / "checkpoints" / name, job)["step"] for job in manifest["jobs"]}
        assert manifest["step"] == sum(steps.values()) == int(name[len("step-"):])
        assert manifest["windows"] == windows


def test_the_resume_line_counts_steps_as_the_folder_is_named(fitted, train_checkpoint, examples_data, tmp_path, capsys):
    out = Path(shutil.copytree(fitted, tmp_path / "run"))
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # stopped after greet's 2nd step
    result = lf.fit(_jobs(examples_data), _run(train_checkpoint, out, progress=True))
    assert result["greet"].steps == 3
    assert f"resumed from {out / 'checkpoints' / 'step-00000003'} (3 job steps already done)" in capsys.readouterr().out


def test_the_documented_files_are_the_files_of_a_checkpoint(fitted):
    folder = checkpoint.latest_checkpoint(fitted)
    real = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    documented = _table("## Files of a checkpoint", "file")
    _match_both_ways(real, list(documented), "checkpoint files")
    for path in documented:  # the module's own description lists the same files
        assert path in checkpoint.__doc__, f"lorafusion/checkpoint/__init__.py does not describe '{path}'"


def test_the_documented_keys_are_the_keys_of_each_file(fitted):
    folder = checkpoint.latest_checkpoint(fitted)
    manifest = json.loads((folder / "manifest.json").read_text())
    documented = _table("### manifest.json", "key")
    required = {key for key, text in documented.items() if "only when" not in text}
    assert required <= set(manifest) <= set(documented), sorted(manifest)
    assert f'"{manifest["format"]}"' in documented["format"] and manifest["format"] in checkpoint.__doc__

    record = checkpoint.read_driver_state(folder, "greet")
    keys = {k for k in record if k != "position"} | {f"position.{k}" for k in record["position"]}
    assert keys == set(_table("### jobs/&lt;job&gt;/driver.json", "key"))
    for key in [*documented, *keys]:  # the module's own description names the same keys
        assert f'"{key.rsplit(".", 1)[-1]}"' in checkpoint.__doc__, f"lorafusion/checkpoint/__init__.py lacks '{key}'"

    with safe_open(str(folder / "jobs" / "greet" / "stage-0.safetensors"), framework="pt") as shard:
        tensors, metadata = set(shard.keys()), shard.metadata()
    section = "### jobs/&lt;job&gt;/stage-&lt;s&gt;.safetensors"
    _match_both_ways(tensors, list(_table(section, "tensor")), "shard tensors")
    assert set(metadata) == set(_table(section, "metadata"))
    assert f'"{metadata["format"]}"' in _table(section, "metadata")["format"] and metadata["format"] in checkpoint.__doc__


def test_the_documented_resume_free_settings_are_the_code_s():
    text = DOC.read_text().split("## Choosing the checkpoint to resume from", 1)[1].split("\n## ", 1)[0]
    run_fields = {f.name for f in dataclasses.fields(lf.RunConfig)}
    assert set(re.findall(r"`([a-z_]+)`", text)) & run_fields == checkpoint.RESUME_FREE_RUN_FIELDS
