"""JSONL datasets for LoRA jobs, tokenised into `Sample`s, and each job's deterministic order.

A dataset file holds one JSON object per line (blank lines are skipped), in one of three formats:

- `{"prompt": str, "completion": str}` -> `[bos] prompt completion [eos]`; loss on the
  completion tokens and the eos.
- `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` -> the
  conversation rendered by the tokenizer's `chat_template` (a Jinja2 string as in HF
  `tokenizer_config.json`, given `messages`, `bos_token`, `eos_token`, `add_generation_prompt`);
  loss on each assistant turn's content and the end-of-turn text the template puts after it.
  At least one assistant message is required.
- `{"text": str}` -> `[bos] text [eos]`; loss on every token after bos.

bos/eos are only placed when the tokenizer has them.

Default chat template, used when the tokenizer has none (`DEFAULT_CHAT_TEMPLATE`): the bos
token, then for each message `<|ROLE|>` + newline + content + the eos token, e.g.

    <|bos|><|user|>\\nHi<|eos|><|assistant|>\\nHello!<|eos|>

and `<|assistant|>` + newline as the generation prompt. With the byte-level tokenizer the
`<|ROLE|>` markers are plain bytes; bos and eos are single special tokens.

Assistant turns are located by rendering prefixes of the conversation: the text between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i + 1])` is assistant
turn i. This works for any template whose rendering of earlier turns does not depend on later
ones; other templates are rejected with an error rather than masked wrongly.

Labels are shifted: `labels[t]` is the token the model must predict at position t
(`input_ids[t + 1]`) when that token carries loss, else `IGNORE_INDEX`.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lorafusion.data.tokenizer import TextTokenizer
from lorafusion.validation import is_number

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "OVERFLOW_MODES",
    "Sample",
    "SampleStream",
    "load_jsonl_dataset",
]

IGNORE_INDEX = -100
OVERFLOW_MODES = ("reject", "truncate")
ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_ACCEPTED_FORMATS = (
    '{"prompt": str, "completion": str}, '
    '{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} '
    'or {"text": str}'
)
# Format name -> the keys that select it.
_FORMAT_KEYS = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One tokenised training sequence."""

    input_ids: tuple[int, ...]
    """Token ids fed to the model."""
    labels: tuple[int, ...]
    """labels[t] = input_ids[t + 1] where that token carries loss, else IGNORE_INDEX."""
    source: str
    """Where the sample came from, as `path:line`."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"Sample from {self.source}: {len(self.input_ids)} input_ids but "
                f"{len(self.labels)} labels; build labels with one entry per token"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class _RowError(ValueError):
    """A problem with one row; the loader prefixes it with the job name and `path:line`."""


def load_jsonl_dataset(
    path: str | Path,
    tokenizer: TextTokenizer,
    *,
    max_seq_len: int,
    overflow: str = "reject",
    name: str = "",
    limit_name: str = "max_seq_len",
    truncate_hint: str = "set `overflow: truncate`",
) -> list[Sample]:
    """Tokenise every row of a JSONL dataset; any bad row raises before a sample is returned.

    `overflow="reject"` fails on a sample longer than `max_seq_len`; `"truncate"` keeps its
    first `max_seq_len` tokens and drops it (with a warning) if no loss token is left. Errors call the limit
    `limit_name` (the setting the user would change) and suggest truncation as `truncate_hint` says it.
    """
    prefix = f"job '{name}': " if name else ""
    _check_options(path, max_seq_len, overflow, prefix)
    samples: list[Sample] = []
    for line_number, row in _read_rows(Path(path), prefix):
        where = f"{path}:{line_number}"
        try:
            input_ids, loss_mask = _tokenize_row(row, tokenizer)
            sample = _fit_sample(input_ids, loss_mask, where, max_seq_len, overflow, limit_name, truncate_hint)
        except _RowError as err:
            raise ValueError(f"{prefix}{where}: {err}") from None
        if sample is not None:
            samples.append(sample)
    if not samples:
        raise ValueError(
            f"{prefix}{path}: no samples left after truncation to {limit_name}={max_seq_len}; "
            f"raise {limit_name} or shorten the prompts so completions fit"
        )
    return samples


def _check_options(path: str | Path, max_seq_len: int, overflow: str, prefix: str) -> None:
    if overflow not in OVERFLOW_MODES:
        raise ValueError(
            f"{prefix}{path}: overflow={overflow!r} is not supported; "
            f"use one of {', '.join(repr(mode) for mode in OVERFLOW_MODES)}"
        )
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(
            f"{prefix}{path}: max_seq_len={max_seq_len!r} must be an integer >= 2 tokens; "
            "set it to the longest sequence the job may train on"
        )


def _read_rows(path: Path, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, JSON object) for every non-blank line of `path`."""
    if not path.is_file():
        raise ValueError(
            f"{prefix}{path}: dataset file not found (looked for {path.resolve()}); fix the dataset path (in a "
            "jobs YAML a relative path is taken from the YAML's folder, in Python from the working directory)"
        )
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                rows.append((line_number, _parse_line(line, f"{path}:{line_number}", prefix)))
    if not rows:
        raise ValueError(
            f"{prefix}{path}: the file is empty (no samples); "
            f"add one JSON object per line: {_ACCEPTED_FORMATS}"
        )
    return rows


def _parse_line(line: str, where: str, prefix: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{prefix}{where}: invalid JSON ({err.msg} at column {err.colno}); "
            "write exactly one JSON object per line"
        ) from None
    if not isinstance(row, dict):
        raise ValueError(
            f"{prefix}{where}: expected a JSON object, got {type(row).__name__}; "
            f"write one object per line: {_ACCEPTED_FORMATS}"
        )
    return row


def _tokenize_row(row: dict[str, Any], tokenizer: TextTokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether the model is trained to predict it."""
    row_format = _detect_format(row)
    if row_format == "prompt_completion":
        return _tokenize_prompt_completion(row, tokenizer)
    if row_format == "messages":
        return _tokenize_messages(row["messages"], tokenizer)
    return _tokenize_text(row, tokenizer)


def _detect_format(row: dict[str, Any]) -> str:
    found = [fmt for fmt, keys in _FORMAT_KEYS.items() if any(key in row for key in keys)]
    if not found:
        raise _RowError(
            f"no recognised keys (got {sorted(row)}); use one of the accepted formats: "
            f"{_ACCEPTED_FORMATS}"
        )
    if len(found) > 1:
        keys = sorted(key for fmt in found for key in _FORMAT_KEYS[fmt] if key in row)
        raise _RowError(f"keys {keys} mix several formats; keep the keys of one format only")
    for key in _FORMAT_KEYS[found[0]]:
        if key not in row:
            raise _RowError(f"missing key {key!r}; a prompt/completion row needs both keys")
    return found[0]


def _require_str(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"{key!r} must be a string, got {type(value).__name__}; quote the value")
    return value


def _tokenize_prompt_completion(
    row: dict[str, Any], tokenizer: TextTokenizer
) -> tuple[list[int], list[bool]]:
    prompt = tokenizer.encode(_require_str(row, "prompt"))
    completion = tokenizer.encode(_require_str(row, "completion"))
    bos, eos = _optional_id(tokenizer.bos_id), _optional_id(tokenizer.eos_id)
    input_ids = bos + prompt + completion + eos
    loss_mask = [False] * (len(bos) + len(prompt)) + [True] * (len(completion) + len(eos))
    return input_ids, loss_mask


def _tokenize_text(row: dict[str, Any], tokenizer: TextTokenizer) -> tuple[list[int], list[bool]]:
    text = tokenizer.encode(_require_str(row, "text"))
    bos, eos = _optional_id(tokenizer.bos_id), _optional_id(tokenizer.eos_id)
    input_ids = bos + text + eos
    return input_ids, [False] * len(bos) + [True] * (len(text) + len(eos))


def _optional_id(token_id: int | None) -> list[int]:
    return [] if token_id is None else [token_id]


def _tokenize_messages(messages: Any, tokenizer: TextTokenizer) -> tuple[list[int], list[bool]]:
    _check_messages(messages)
    input_ids: list[int] = []
    loss_mask: list[bool] = []
    for text, is_assistant in _chat_segments(messages, tokenizer):
        ids = tokenizer.encode(text)
        input_ids += ids
        loss_mask += [is_assistant] * len(ids)
    return input_ids, loss_mask


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _RowError(
            f"'messages' must be a non-empty list, got {messages!r:.60}; "
            'write [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]'
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _RowError(
                f"messages[{index}] must be an object with a string 'content', got "
                f"{message!r:.60}; write {{\"role\": ..., \"content\": \"...\"}}"
            )
        if message.get("role") not in ROLES:
            raise _RowError(
                f"messages[{index}] has role {message.get('role')!r}; use one of {list(ROLES)}"
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise _RowError(
            "messages has no assistant turn, so there is nothing to train on; "
            'add a {"role": "assistant", "content": ...} message'
        )


def _chat_segments(
    messages: list[dict[str, Any]], tokenizer: TextTokenizer
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is assistant turn) pieces, in order."""
    template = _compile_template(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    variables = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}

    def render(prefix: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return template.render(
                messages=prefix, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as err:
            raise _RowError(
                f"the chat template failed to render this conversation ({err}); "
                "fix the row or the tokenizer's chat_template"
            ) from None

    full = render(messages, False)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], True)
        through = render(messages[: index + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise _RowError(
                f"cannot locate assistant turn messages[{index}]: the chat template renders "
                "earlier turns differently once later turns follow; use a template whose "
                "prefix renderings are prefixes of the full conversation"
            )
        segments += [(full[cursor : len(before)], False), (full[len(before) : len(through)], True)]
        cursor = len(through)
    segments.append((full[cursor:], False))
    return [(text, is_assistant) for text, is_assistant in segments if text]


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Same environment settings as transformers' apply_chat_template, so HF templates render
    # identically. No strftime_now: templates then fall back to a fixed date, keeping the
    # tokenisation deterministic.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_template_exception
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise _RowError(
            f"the chat template is not valid Jinja2 ({err}); fix chat_template in "
            "tokenizer_config.json"
        ) from None


def _raise_template_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _fit_sample(
    input_ids: list[int], loss_mask: list[bool], where: str, max_seq_len: int, overflow: str, limit_name: str,
    truncate_hint: str,
) -> Sample | None:
    """Apply the overflow policy; None when truncation leaves no loss token."""
    # Position 0 is never a target: nothing precedes it.
    if not any(loss_mask[1:]):
        raise _RowError(
            "the sample has no loss tokens (nothing after the first token is trained on); "
            "give it a non-empty completion / assistant reply / text"
        )
    if len(input_ids) > max_seq_len:
        if overflow == "reject":
            raise _RowError(
                f"the sample has {len(input_ids)} tokens but {limit_name}={max_seq_len}; "
                f"raise {limit_name} to at least {len(input_ids)} or {truncate_hint}"
            )
        input_ids, loss_mask = input_ids[:max_seq_len], loss_mask[:max_seq_len]
        if not any(loss_mask[1:]):
            warnings.warn(
                f"{where}: dropped: no loss tokens left after truncation to "
                f"{limit_name}={max_seq_len}",
                stacklevel=3,
            )
            return None
    labels = [
        target if is_loss else IGNORE_INDEX
        for target, is_loss in zip(input_ids[1:], loss_mask[1:])
    ]
    return Sample(input_ids=tuple(input_ids), labels=(*labels, IGNORE_INDEX), source=where)


class SampleStream:
    """A job's endless, deterministic sample order, cut into global batches.

    Epoch e is the permutation drawn from `PCG64([seed, epoch])`; the epochs are concatenated
    and global batch `step` is stream positions [step * gbs, (step + 1) * gbs).
    """

    # Batches move forward through the stream, so only the latest few epochs are worth keeping.
    _CACHED_EPOCHS = 4

    def __init__(self, *, num_samples: int, global_batch_size: int, seed: int) -> None:
        for field_name, value, minimum in (
            ("num_samples", num_samples, 1),
            ("global_batch_size", global_batch_size, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"SampleStream: {field_name}={value!r} must be an integer >= {minimum}; "
                    f"pass a valid {field_name}"
                )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._epochs: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_batch_size)

    def steps_for_epochs(self, num_epochs: float) -> int:
        """Global batches needed to cover `num_epochs` passes (fractions allowed)."""
        if not (is_number(num_epochs) and num_epochs > 0):
            raise ValueError(
                f"SampleStream.steps_for_epochs: num_epochs={num_epochs!r} must be a positive "
                "finite number; pass e.g. 1 or 2.5"
            )
        # Decimal text of the float, so 0.3 epochs means exactly 3/10 (no 3.0000000000000004).
        exact = Fraction(str(num_epochs)) * self.num_samples / self.global_batch_size
        return math.ceil(exact)

    def batch(self, step: int) -> list[int]:
        """Sample indices of global batch `step` (0-based)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"SampleStream.batch: step={step!r} must be an integer >= 0; "
                "pass the 0-based global batch index"
            )
        start = step * self.global_batch_size
        end = start + self.global_batch_size
        indices: list[int] = []
        for epoch in range(start // self.num_samples, (end - 1) // self.num_samples + 1):
            offset = epoch * self.num_samples
            lo, hi = max(start - offset, 0), min(end - offset, self.num_samples)
            indices += self._permutation(epoch)[lo:hi].tolist()
        return indices

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            generator = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epochs[epoch] = generator.permutation(self.num_samples)  # [num_samples]
            if len(self._epochs) > self._CACHED_EPOCHS:
                del self._epochs[next(iter(self._epochs))]  # the oldest computed epoch
        return self._epochs[epoch]
