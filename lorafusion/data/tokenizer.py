"""Tokenizers for LoRA jobs: a lossless byte-level one for tiny demo models, or HF tokenizer.json.

Every job encodes its dataset with a `TextTokenizer`. It wraps a plain `tokenizers.Tokenizer`
(which is what a Hugging Face `tokenizer.json` is, e.g. Llama-3 or Qwen2) together with the
special-token strings and chat template from the HF-style `tokenizer_config.json`.

`encode` never adds special tokens, even when `tokenizer.json` has a post-processor that would
(Llama-3 prepends `<|begin_of_text|>`): the dataset code places bos/eos itself, so a tokenizer
that adds them too would silently double them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lorafusion.hub import local_model_dir

__all__ = [
    "DEFAULT_BOS_TOKEN",
    "DEFAULT_EOS_TOKEN",
    "DEFAULT_PAD_TOKEN",
    "TextTokenizer",
    "build_byte_level_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
]

DEFAULT_BOS_TOKEN = "<|bos|>"
DEFAULT_EOS_TOKEN = "<|eos|>"
DEFAULT_PAD_TOKEN = "<|pad|>"

_NUM_BYTES = 256
_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_MODEL_CONFIG_FILE = "config.json"
# Newer transformers versions save the chat template next to tokenizer_config.json.
_CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True, kw_only=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a dataset needs."""

    tokenizer: Tokenizer
    """The underlying tokenizer (the contents of a `tokenizer.json`)."""
    bos_token: str | None = None
    """Beginning-of-sequence token text, or None when the model uses none (Qwen2)."""
    eos_token: str | None = None
    """End-of-sequence / end-of-turn token text, or None."""
    pad_token: str | None = None
    """Padding token text, or None."""
    chat_template: str | None = None
    """Jinja2 chat template as in HF `tokenizer_config.json`, or None for the default one."""

    def __post_init__(self) -> None:
        for field_name in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, field_name)
            if token is not None and self.tokenizer.token_to_id(token) is None:
                raise ValueError(
                    f"TextTokenizer.{field_name}={token!r} is not in the tokenizer vocabulary; "
                    f"add it as a special token to tokenizer.json or set {field_name} to None"
                )

    @property
    def bos_id(self) -> int | None:
        return _token_id(self.tokenizer, self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return _token_id(self.tokenizer, self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return _token_id(self.tokenizer, self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added around it."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept as their text unless skipped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _token_id(tokenizer: Tokenizer, token: str | None) -> int | None:
    return None if token is None else tokenizer.token_to_id(token)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    # The remaining bytes (controls, space, ...) are shifted past 255 so each gets a visible char.
    others = [byte for byte in range(_NUM_BYTES) if byte not in mapping]
    mapping.update({byte: chr(_NUM_BYTES + i) for i, byte in enumerate(others)})
    return mapping


def build_byte_level_tokenizer() -> Tokenizer:
    """A lossless byte tokenizer: id b is byte b (0..255), then `<|bos|>`, `<|eos|>`, `<|pad|>`.

    A BPE model without merges over the ByteLevel alphabet gives exactly one token per UTF-8
    byte, so any text encodes and decodes back unchanged (vocab size 259). As with every HF
    tokenizer, the literal text of a special token (e.g. `"<|eos|>"`) encodes to that token.
    """
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[byte]: byte for byte in range(_NUM_BYTES)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([DEFAULT_BOS_TOKEN, DEFAULT_EOS_TOKEN, DEFAULT_PAD_TOKEN])
    return tokenizer


def save_tokenizer(
    directory: str | Path,
    tokenizer: Tokenizer,
    *,
    bos_token: str | None = DEFAULT_BOS_TOKEN,
    eos_token: str | None = DEFAULT_EOS_TOKEN,
    pad_token: str | None = DEFAULT_PAD_TOKEN,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> None:
    """Write `tokenizer.json` and an HF-style `tokenizer_config.json` into `directory`."""
    # Validates the special tokens before anything is written.
    TextTokenizer(
        tokenizer=tokenizer, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token
    )
    if model_max_length is not None and model_max_length < 1:
        raise ValueError(
            f"save_tokenizer: model_max_length={model_max_length} must be a positive "
            "number of tokens; pass the model's context length or None"
        )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / _TOKENIZER_FILE))
    (directory / _TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(checkpoint_dir: str | Path) -> TextTokenizer:
    """Load `tokenizer.json` (+ `tokenizer_config.json`, `config.json`) from a checkpoint folder (or HF Hub id).

    Special tokens come from `tokenizer_config.json`; a key that is absent there falls back to
    `config.json`'s `<name>_token_id`, while an explicit null (Qwen2's bos) means "none".
    """
    directory = local_model_dir(checkpoint_dir)
    tokenizer_path = directory / _TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ValueError(
            f"{tokenizer_path}: tokenizer file not found; point the job at a checkpoint folder "
            "that contains tokenizer.json, or write one with lorafusion.data.save_tokenizer"
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer_config = _read_json_object(directory / _TOKENIZER_CONFIG_FILE)
    model_config = _read_json_object(directory / _MODEL_CONFIG_FILE)
    special = {
        name: _special_token(name, tokenizer, tokenizer_config, model_config)
        for name in ("bos", "eos", "pad")
    }
    try:
        return TextTokenizer(
            tokenizer=tokenizer,
            bos_token=special["bos"],
            eos_token=special["eos"],
            pad_token=special["pad"],
            chat_template=_chat_template(directory, tokenizer_config),
        )
    except ValueError as err:
        raise ValueError(f"{directory / _TOKENIZER_CONFIG_FILE}: {err}") from err


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the optional file is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err}); fix or delete the file") from err
    if not isinstance(value, dict):
        raise ValueError(
            f"{path}: expected a JSON object, got {type(value).__name__}; fix the file"
        )
    return value


def _special_token(
    name: str, tokenizer: Tokenizer, tokenizer_config: dict[str, Any], model_config: dict[str, Any]
) -> str | None:
    key = f"{name}_token"
    if key in tokenizer_config:
        value = tokenizer_config[key]
        # HF serialises AddedToken objects as {"content": "<s>", "lstrip": false, ...}.
        return value["content"] if isinstance(value, dict) else value
    token_id = model_config.get(f"{name}_token_id")
    # Llama-3.1 lists several eos ids in config.json; the first is the canonical one.
    if isinstance(token_id, list):
        token_id = token_id[0] if token_id else None
    return None if token_id is None else tokenizer.id_to_token(token_id)


def _chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    template = tokenizer_config.get("chat_template")
    # Some checkpoints store named templates: [{"name": "default", "template": "..."}, ...].
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    if template is None and (directory / _CHAT_TEMPLATE_FILE).is_file():
        template = (directory / _CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return template
