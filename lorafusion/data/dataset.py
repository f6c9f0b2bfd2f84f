"""Datasets for LoRA jobs, tokenised into `Sample`s, and each job's deterministic order.

A dataset is a JSONL, Parquet or Arrow file or a saved HF `datasets` folder (see `lorafusion.data.sources`);
each row has one of three shapes:

- `{"prompt": str, "completion": str}` -> `[bos] prompt completion [eos]`; loss on the
  completion tokens and the eos.
- `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` -> the
  conversation rendered by the tokenizer's `chat_template` (a Jinja2 string as in HF
  `tokenizer_config.json`, given `messages`, `bos_token`, `eos_token`, `add_generation_prompt`);
  loss on each assistant turn's content and the end-of-turn text the template puts after it.
  At least one assistant message is required.
- `{"text": str}` -> `[bos] text [eos]`; loss on every token after bos.

bos/eos are only placed when the tokenizer has them. `fields` maps these keys to the names a dataset uses,
e.g. `{"prompt": "question", "completion": "answer"}`; keys it leaves out keep their own names.

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
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lorafusion.data.sources import read_rows
from lorafusion.data.tokenizer import TextTokenizer
from lorafusion.validation import is_number

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "OVERFLOW_MODES",
    "ROW_KEYS",
    "Sample",
    "SampleStream",
    "check_fields",
    "load_dataset",
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
ROW_KEYS = ("prompt", "completion", "messages", "text")
"""The keys a row is read by; `fields` may map each to a column of another name."""


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One tokenised training sequence."""

    input_ids: tuple[int, ...]
    """Token ids fed to the model."""
    labels: tuple[int, ...]
    """labels[t] = input_ids[t + 1] where that token carries loss, else IGNORE_INDEX."""
    source: str
    """Where the sample came from: `path:line` (JSONL) or `path row i` (tables, 0-based)."""

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
    """A problem with one row; the loader prefixes it with the job name and the row's location."""


@dataclass(frozen=True)
class _Columns:
    """Where a row's keys are read from, and how errors name them."""

    names: dict[str, str | None]
    """Row key (ROW_KEYS) -> its name in the dataset; None when `fields` gives the key's own name to another key."""
    tabular: bool
    """Rows of a table (Parquet, Arrow, `datasets`): 'column', and a null cell is an absent one."""

    @classmethod
    def of(cls, fields: dict[str, str], tabular: bool) -> _Columns:
        # `fields: {prompt: text}` reads column 'text' as the prompt, so no row is taken for a {text} row by it
        claimed = set(fields.values())
        return cls({key: fields.get(key, None if key in claimed else key) for key in ROW_KEYS}, tabular)

    def __getitem__(self, key: str) -> str | None:
        return self.names[key]

    def label(self, key: str) -> str:
        name = self.names[key]
        if name is None:
            return f"{key!r} (its column is read for another key in fields; add fields.{key})"
        return repr(name) if name == key else f"{name!r} (fields.{key})"

    @property
    def noun(self) -> str:
        return "column" if self.tabular else "key"


def check_fields(fields: Any, where: str = "") -> dict[str, str]:
    """`fields` as a dict of ROW_KEYS -> column name; ValueError (prefixed by `where`) naming the entry and the fix."""
    example = "e.g. fields: {prompt: question, completion: answer}"
    if not isinstance(fields, dict):
        raise ValueError(f"{where}fields={fields!r} must map row keys to your column names, {example}")
    unknown = sorted(str(key) for key in fields if key not in ROW_KEYS)
    if unknown:
        raise ValueError(f"{where}fields has key(s) {unknown}; map only {list(ROW_KEYS)}, {example}")
    for key, column in fields.items():
        if not isinstance(column, str) or not column:
            raise ValueError(f"{where}fields.{key}={column!r} must be the name of a column of the dataset, {example}")
    columns = list(fields.values())
    shared = sorted({column for column in columns if columns.count(column) > 1})
    if shared:
        raise ValueError(f"{where}fields reads {shared} for more than one key ({fields}); give each key its own "
                         "column")
    return dict(fields)


def load_dataset(
    source: str | Path,
    tokenizer: TextTokenizer,
    *,
    max_seq_len: int,
    overflow: str = "reject",
    name: str = "",
    limit_name: str = "max_seq_len",
    truncate_hint: str = "set `overflow: truncate`",
    fields: dict[str, str] | None = None,
    default_split: str | None = None,
) -> list[Sample]:
    """Tokenise every row of a dataset (JSONL, Parquet, Arrow, `datasets` folder); any bad row raises before a
    sample is returned.

    `overflow="reject"` fails on a sample longer than `max_seq_len`; `"truncate"` keeps its
    first `max_seq_len` tokens and drops it (with a warning) if no loss token is left. Errors call the limit
    `limit_name` (the setting the user would change) and suggest truncation as `truncate_hint` says it.
    `fields` maps row keys to the dataset's column names; `default_split` is the split of a DatasetDict folder
    read when the source names none (see `lorafusion.data.sources`).
    """
    prefix = f"job '{name}': " if name else ""
    _check_options(source, max_seq_len, overflow, prefix)
    fields = check_fields(fields or {}, prefix)
    rows, tabular = read_rows(source, prefix, default_split)
    columns = _Columns.of(fields, tabular)
    samples: list[Sample] = []
    count = 0
    for where, row in rows:
        count += 1
        try:
            input_ids, loss_mask = _tokenize_row(row, tokenizer, columns)
            sample = _fit_sample(input_ids, loss_mask, where, max_seq_len, overflow, limit_name, truncate_hint)
        except _RowError as err:
            raise ValueError(f"{prefix}{where}: {err}") from None
        if sample is not None:
            samples.append(sample)
    if not count:
        fix = "add rows" if tabular else "add one JSON object per line"
        raise ValueError(f"{prefix}{source}: the file is empty (no samples); {fix}: {_ACCEPTED_FORMATS}")
    if not samples:
        raise ValueError(
            f"{prefix}{source}: no samples left after truncation to {limit_name}={max_seq_len}; "
            f"raise {limit_name} or shorten the prompts so completions fit"
        )
    return samples


def _check_options(source: str | Path, max_seq_len: int, overflow: str, prefix: str) -> None:
    if overflow not in OVERFLOW_MODES:
        raise ValueError(
            f"{prefix}{source}: overflow={overflow!r} is not supported; "
            f"use one of {', '.join(repr(mode) for mode in OVERFLOW_MODES)}"
        )
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(
            f"{prefix}{source}: max_seq_len={max_seq_len!r} must be an integer >= 2 tokens; "
            "set it to the longest sequence the job may train on"
        )


def _tokenize_row(row: dict[str, Any], tokenizer: TextTokenizer, columns: _Columns) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether the model is trained to predict it."""
    row_format = _detect_format(row, columns)
    if row_format == "prompt_completion":
        return _tokenize_prompt_completion(row, tokenizer, columns)
    if row_format == "messages":
        return _tokenize_messages(row[columns["messages"]], tokenizer, columns)
    return _tokenize_text(row, tokenizer, columns)


def _detect_format(row: dict[str, Any], columns: _Columns) -> str:
    found = [fmt for fmt, keys in _FORMAT_KEYS.items() if any(columns[key] in row for key in keys)]
    if not found:
        mapped = {key: name for key, name in columns.names.items() if name != key}
        hint = f"with your fields {mapped}" if mapped else "or map your names to these with `fields:`"
        raise _RowError(
            f"no recognised {columns.noun}s (got {sorted(row)}); use one of the accepted formats: "
            f"{_ACCEPTED_FORMATS}, {hint}"
        )
    if len(found) > 1:
        keys = sorted(columns[key] for fmt in found for key in _FORMAT_KEYS[fmt] if columns[key] in row)
        raise _RowError(f"{columns.noun}s {keys} mix several formats; keep the {columns.noun}s of one format only")
    for key in _FORMAT_KEYS[found[0]]:
        if columns[key] not in row:
            null = " (or null)" if columns.tabular else ""
            raise _RowError(f"missing {columns.noun} {columns.label(key)}{null}; a prompt/completion row needs both "
                            f"{columns.noun}s")
    return found[0]


def _require_str(row: dict[str, Any], key: str, columns: _Columns) -> str:
    value = row[columns[key]]
    if not isinstance(value, str):
        fix = "store text in that column (cast it to string)" if columns.tabular else "quote the value"
        raise _RowError(f"{columns.label(key)} must be a string, got {type(value).__name__}; {fix}")
    return value


def _tokenize_prompt_completion(
    row: dict[str, Any], tokenizer: TextTokenizer, columns: _Columns
) -> tuple[list[int], list[bool]]:
    prompt = tokenizer.encode(_require_str(row, "prompt", columns))
    completion = tokenizer.encode(_require_str(row, "completion", columns))
    bos, eos = _optional_id(tokenizer.bos_id), _optional_id(tokenizer.eos_id)
    input_ids = bos + prompt + completion + eos
    loss_mask = [False] * (len(bos) + len(prompt)) + [True] * (len(completion) + len(eos))
    return input_ids, loss_mask


def _tokenize_text(row: dict[str, Any], tokenizer: TextTokenizer, columns: _Columns) -> tuple[list[int], list[bool]]:
    text = tokenizer.encode(_require_str(row, "text", columns))
    bos, eos = _optional_id(tokenizer.bos_id), _optional_id(tokenizer.eos_id)
    input_ids = bos + text + eos
    return input_ids, [False] * len(bos) + [True] * (len(text) + len(eos))


def _optional_id(token_id: int | None) -> list[int]:
    return [] if token_id is None else [token_id]


def _tokenize_messages(messages: Any, tokenizer: TextTokenizer, columns: _Columns) -> tuple[list[int], list[bool]]:
    _check_messages(messages, columns)
    input_ids: list[int] = []
    loss_mask: list[bool] = []
    for text, is_assistant in _chat_segments(messages, tokenizer):
        ids = tokenizer.encode(text)
        input_ids += ids
        loss_mask += [is_assistant] * len(ids)
    return input_ids, loss_mask


def _check_messages(messages: Any, columns: _Columns) -> None:
    name = columns["messages"]
    if not isinstance(messages, list) or not messages:
        raise _RowError(
            f"{columns.label('messages')} must be a non-empty list, got {messages!r:.60}; "
            'write [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]'
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _RowError(
                f"{name}[{index}] must be an object with a string 'content', got "
                f"{message!r:.60}; write {{\"role\": ..., \"content\": \"...\"}}"
            )
        if message.get("role") not in ROLES:
            raise _RowError(
                f"{name}[{index}] has role {message.get('role')!r}; use one of {list(ROLES)}"
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise _RowError(
            f"{name} has no assistant turn, so there is nothing to train on; "
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
