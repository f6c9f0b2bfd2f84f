"""`base_model` as a local checkpoint folder or an HF Hub id (`org/name`), resolved through huggingface_hub's cache.

A folder that exists always wins. Anything else shaped like a Hub id is looked up with `snapshot_download`:
with HF_HUB_OFFLINE=1 only in the local cache (nothing is downloaded), otherwise downloading what lorafusion
reads (config, safetensors weights, tokenizer files) into it. The cache is HF_HUB_CACHE, else $HF_HOME/hub,
else ~/.cache/huggingface/hub, read at each call (huggingface_hub reads them once, at import), so a setting
made after import still counts. The run keeps the id as given: run.json and the exported adapters'
`base_model_name_or_path` name the Hub id, not the snapshot folder.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

__all__ = ["hub_cache_dir", "is_hub_id", "local_model_dir"]

# An HF repo id with its namespace, each part starting with a letter or digit. The namespace is required: a bare
# name (a relative folder such as `ckpt`) stays a path, and the Hub's old namespace-less ids all have an org now
# (gpt2 is openai-community/gpt2).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# The files lorafusion reads from a checkpoint (lorafusion.models.hf, lorafusion.data.tokenizer); a download
# fetches only these, not a repo's other weight formats.
_CHECKPOINT_FILES = ["config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(name: str) -> bool:
    """Whether `name` is shaped like an HF Hub model id (`org/name`), as opposed to another path."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name


def hub_cache_dir() -> Path:
    """huggingface_hub's model cache under the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def _offline() -> bool:
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def local_model_dir(base_model: str | Path) -> Path:
    """The checkpoint folder `base_model` names: itself when it is a folder that exists (or is no Hub id, so the
    checkpoint reader reports it), else the Hub id's snapshot in the HF cache; ValueError naming the id, the cache
    and the fix when the id cannot be resolved."""
    path = Path(base_model)
    if path.is_dir() or not is_hub_id(str(base_model)):
        return path
    return _snapshot(str(base_model), str(hub_cache_dir()), _offline())


@functools.lru_cache(maxsize=8)  # a run opens the checkpoint several times; online, each lookup is a request
def _snapshot(repo_id: str, cache_dir: str, offline: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise ValueError(f"base_model '{repo_id}' is not a local folder, and resolving it as an HF Hub id needs "
                         "huggingface_hub, which is not installed; pip install huggingface_hub, or point base_model "
                         "at a local checkpoint folder") from None
    not_local = f"base_model '{repo_id}' is not a local folder (looked for {Path(repo_id).resolve()})"
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=offline,
                                      allow_patterns=_CHECKPOINT_FILES))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1, so nothing is downloaded" if offline else "the HF Hub cannot be reached"
        online = ", unset HF_HUB_OFFLINE" if offline else ""
        raise ValueError(
            f"{not_local}, and the HF Hub model '{repo_id}' is not in the HF cache {cache_dir} ({why}); download it "
            f"where there is network (`hf download {repo_id}` with the same HF_HOME / HF_HUB_CACHE){online}, or "
            "point base_model at a local checkpoint folder (in a jobs YAML a relative path is taken from the YAML's "
            "folder)") from None
    except (HfHubHTTPError, HFValidationError) as err:  # unknown, gated or private repo; a malformed id
        raise ValueError(
            f"{not_local}, and the HF Hub has no model '{repo_id}' this machine may read ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); check the id, log in (`hf auth login`) for a gated or private model, or "
            "point base_model at a local checkpoint folder") from None
