"""`base_model` as an HF Hub id, resolved offline through a huggingface_hub cache the tests lay out themselves;
and one fit that reads a Parquet dataset on a base model given by its Hub id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import lorafusion as lf
from lorafusion.config import load_config
from lorafusion.data import load_tokenizer
from lorafusion.hub import is_hub_id, local_model_dir
from lorafusion.models import read_architecture

huggingface_hub = pytest.importorskip("huggingface_hub")

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(cache_dir: Path, checkpoint: Path, repo_id: str = REPO_ID) -> Path:
    """huggingface_hub's cache layout (models--org--name/refs/main -> snapshots/<commit>/), holding `checkpoint`'s
    files as blobs the snapshot links to; returns the snapshot folder."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"  # real blobs are named by content hash; nothing checks it offline
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, train_checkpoint, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    snapshot = _cache(cache, train_checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_huggingface_hub_reads_the_layout_the_tests_make(offline_cache):
    (repo,) = huggingface_hub.scan_cache_dir(offline_cache.parents[2]).repos
    assert repo.repo_id == REPO_ID and [r.commit_hash for r in repo.revisions] == [COMMIT]


def test_hub_id_resolves_through_the_cache_offline(offline_cache, train_checkpoint):
    assert local_model_dir(REPO_ID) == offline_cache
    assert read_architecture(REPO_ID) == read_architecture(train_checkpoint)
    assert load_tokenizer(REPO_ID).encode("hello") == load_tokenizer(train_checkpoint).encode("hello")


def test_hf_home_names_the_cache(tmp_path, train_checkpoint, monkeypatch):
    snapshot = _cache(tmp_path / "home" / "hub", train_checkpoint, "org2/model")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_model_dir("org2/model") == snapshot


def test_a_local_folder_wins_over_the_hub_id(offline_cache, tmp_path, train_checkpoint, monkeypatch):
    local = tmp_path / "work" / REPO_ID
    shutil.copytree(train_checkpoint, local)
    monkeypatch.chdir(tmp_path / "work")
    assert local_model_dir(REPO_ID) == Path(REPO_ID)


def test_missing_hub_id_offline_names_id_cache_and_fix(offline_cache):
    with pytest.raises(ValueError) as caught:
        read_architecture("tiny-org/absent")
    message = str(caught.value)
    assert message.startswith("base_model 'tiny-org/absent' is not a local folder (looked for ")
    assert f"the HF Hub model 'tiny-org/absent' is not in the HF cache {offline_cache.parents[2]} " in message
    assert "HF_HUB_OFFLINE=1, so nothing is downloaded" in message and "`hf download tiny-org/absent`" in message


@pytest.mark.parametrize(("name", "hub"), [("org/name", True), ("gpt2", False), ("Qwen/Qwen2.5-0.5B", True),
                                           ("/abs/path", False), ("./model", False), ("a/b/c", False),
                                           ("../model", False), ("org/na--me", False), ("~/model", False)])
def test_what_counts_as_a_hub_id(name, hub):
    assert is_hub_id(name) is hub


def test_yaml_keeps_a_hub_id_and_anchors_a_folder(tmp_path, train_checkpoint):
    shutil.copytree(train_checkpoint, tmp_path / "models" / "llama")
    config = {"run": {"base_model": REPO_ID, "output_dir": "out"}, "jobs": [{"name": "j", "dataset": "d.jsonl"}]}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(config))
    config["run"]["base_model"] = "models/llama"
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    assert load_config(tmp_path / "hub.yaml")[1].base_model == REPO_ID
    assert load_config(tmp_path / "local.yaml")[1].base_model == str(tmp_path / "models" / "llama")


def test_fit_on_a_hub_id_with_a_parquet_dataset(offline_cache, tmp_path, train_checkpoint, examples_data):
    """The same adapter as the local checkpoint with the JSONL the Parquet file was made from; the adapter
    names the Hub id as its base model."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    import torch
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (examples_data / "arith.jsonl").read_text().splitlines()[:16]]
    (tmp_path / "arith.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arith.parquet")
    adapter = lf.LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"])
    outputs = {}
    for model, data in ((REPO_ID, "arith.parquet"), (str(train_checkpoint), "arith.jsonl")):
        out = tmp_path / f"out-{data}"
        job = lf.JobSpec(name="j", dataset=str(tmp_path / data), adapter=adapter, global_batch_size=4, max_steps=2)
        result = lf.fit([job], lf.RunConfig(base_model=model, output_dir=str(out), progress=False, engine="local",
                                            max_tokens_per_microbatch=256))
        assert result["j"].status == "finished"
        outputs[data] = out / "j" / "adapter"
    hub_config = json.loads((outputs["arith.parquet"] / "adapter_config.json").read_text())
    assert hub_config["base_model_name_or_path"] == REPO_ID
    hub, local = (load_file(str(outputs[d] / "adapter_model.safetensors")) for d in ("arith.parquet", "arith.jsonl"))
    assert hub.keys() == local.keys() and all(torch.equal(hub[k], local[k]) for k in hub)
    # the adapter names the Hub id: lf.squeeze finds its base model through the same cache
    squeezed = lf.squeeze(outputs["arith.parquet"], rank=1, output_dir=tmp_path / "squeezed")
    assert json.loads((tmp_path / "squeezed" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO_ID
    assert squeezed.rank == 1 and len(squeezed.errors) == 4
