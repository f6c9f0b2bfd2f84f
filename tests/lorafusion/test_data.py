"""Tests for lorafusion.data: tokenizers, JSONL datasets and per-job sample order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, processors

from lorafusion.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    Sample,
    SampleStream,
    TextTokenizer,
    build_byte_level_tokenizer,
    load_dataset,
    load_tokenizer,
    save_tokenizer,
)

BOS, EOS, PAD = 256, 257, 258
X = IGNORE_INDEX
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples" / "data"
# A Llama-3 style template: header tokens, trimmed content, <|eot_id|> ends every turn.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


# ----------------------------------------------------------------------------- fixtures


def _byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture
def byte_tok() -> TextTokenizer:
    return TextTokenizer(
        tokenizer=build_byte_level_tokenizer(),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )


@pytest.fixture
def bare_tok() -> TextTokenizer:
    """Byte tokenizer without bos/eos, as for a model that uses neither."""
    return TextTokenizer(tokenizer=build_byte_level_tokenizer())


def _write_jsonl(tmp_path: Path, lines: list[str | dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    rendered = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(rendered) + "\n", encoding="utf-8")
    return path


def _load_one(path: Path, tokenizer: TextTokenizer, **kwargs) -> Sample:
    (sample,) = load_dataset(path, tokenizer, max_seq_len=kwargs.pop("max_seq_len", 512),
                                   **kwargs)
    return sample


def _expected_labels(input_ids: list[int], loss_mask: list[bool]) -> tuple[int, ...]:
    """Reference shift: label t is token t + 1 when that token carries loss."""
    shifted = [tok if loss else X for tok, loss in zip(input_ids[1:], loss_mask[1:])]
    return (*shifted, X)


# ----------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_is_lossless_one_token_per_byte() -> None:
    tokenizer = build_byte_level_tokenizer()
    text = "héllo wörld 🙂\n\t  ½ — 日本語"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == _byte_ids(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 259
    assert [tokenizer.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")] == [BOS, EOS, PAD]


def test_text_tokenizer_ids_and_decode(byte_tok: TextTokenizer) -> None:
    assert (byte_tok.bos_id, byte_tok.eos_id, byte_tok.pad_id) == (BOS, EOS, PAD)
    assert byte_tok.vocab_size == 259
    assert byte_tok.encode("ab") == [97, 98]
    assert byte_tok.decode([BOS, 97, EOS]) == "<|bos|>a<|eos|>"
    assert byte_tok.decode([BOS, 97, EOS], skip_special_tokens=True) == "a"


def test_save_and_load_tokenizer_round_trip(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, build_byte_level_tokenizer(), chat_template=LLAMA3_TEMPLATE,
                   model_max_length=512)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|bos|>" and config["model_max_length"] == 512
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (BOS, EOS, PAD)
    assert loaded.chat_template == LLAMA3_TEMPLATE
    assert loaded.encode("Grüße") == _byte_ids("Grüße")


def test_save_tokenizer_without_template_omits_key(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, build_byte_level_tokenizer(), pad_token=None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and "model_max_length" not in config
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template is None and loaded.pad_id is None


def test_save_tokenizer_rejects_unknown_special_token_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bos_token='<s>' is not in the tokenizer vocabulary"):
        save_tokenizer(tmp_path / "out", build_byte_level_tokenizer(), bos_token="<s>")
    assert not (tmp_path / "out").exists()


def test_load_tokenizer_hf_style_config(tmp_path: Path) -> None:
    """AddedToken dicts, explicit null bos (Qwen2) and config.json fallback with an id list."""
    build_byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None,
        "pad_token": {"content": "<|pad|>", "lstrip": False, "special": True},
    }))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 256,
                                                      "eos_token_id": [257, 258]}))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (None, EOS, PAD)


def test_load_tokenizer_chat_template_file(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, build_byte_level_tokenizer())
    (tmp_path / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    assert load_tokenizer(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE


def test_load_tokenizer_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json: tokenizer file not found; point"):
        load_tokenizer(tmp_path)


def test_encode_adds_no_special_tokens_even_with_post_processor(tmp_path: Path) -> None:
    """Llama-3's tokenizer.json prepends bos in its post-processor; encode must not."""
    tokenizer = build_byte_level_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", BOS)]
    )
    assert tokenizer.encode("a").ids == [BOS, 97]
    save_tokenizer(tmp_path, tokenizer)
    assert load_tokenizer(tmp_path).encode("a") == [97]


def test_load_tokenizer_word_level_vocab(tmp_path: Path) -> None:
    """Any tokenizers-library file loads, not only the byte-level one."""
    tokenizer = Tokenizer(models.WordLevel({"hi": 0, "[UNK]": 1, "</s>": 2}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_id == 2 and loaded.bos_id is None and loaded.vocab_size == 3


# ----------------------------------------------------------------------------- formats


def test_prompt_completion_tokens_and_labels(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    sample = _load_one(_write_jsonl(tmp_path, [{"prompt": "ab", "completion": "c"}]), byte_tok)
    assert sample.input_ids == (BOS, 97, 98, 99, EOS)
    assert sample.labels == (X, X, 99, EOS, X)
    assert sample.num_loss_tokens == 2 and len(sample) == 5
    assert sample.source == f"{tmp_path / 'data.jsonl'}:1"


def test_prompt_completion_without_bos_eos(tmp_path: Path, bare_tok: TextTokenizer) -> None:
    sample = _load_one(_write_jsonl(tmp_path, [{"prompt": "ab", "completion": "cd"}]), bare_tok)
    assert sample.input_ids == (97, 98, 99, 100)
    assert sample.labels == (X, 99, 100, X)


def test_text_tokens_and_labels(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    sample = _load_one(_write_jsonl(tmp_path, [{"text": "xy"}]), byte_tok)
    assert sample.input_ids == (BOS, 120, 121, EOS)
    assert sample.labels == (120, 121, EOS, X)


def test_text_without_bos_trains_from_second_token(tmp_path: Path, bare_tok) -> None:
    sample = _load_one(_write_jsonl(tmp_path, [{"text": "xyz"}]), bare_tok)
    assert sample.input_ids == (120, 121, 122)
    assert sample.labels == (121, 122, X)


def test_blank_lines_skipped_and_sources_keep_line_numbers(tmp_path, byte_tok) -> None:
    path = _write_jsonl(tmp_path, [{"text": "a"}, "", "   ", {"text": "b"}])
    samples = load_dataset(path, byte_tok, max_seq_len=16)
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["1", "4"]


def test_messages_default_template(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": "ok"},
    ]
    sample = _load_one(_write_jsonl(tmp_path, [{"messages": messages}]), byte_tok)
    pieces = [  # (token ids, trained on)
        ([BOS] + _byte_ids("<|system|>\nS") + [EOS], False),
        (_byte_ids("<|user|>\nhi") + [EOS] + _byte_ids("<|assistant|>\n"), False),
        (_byte_ids("yo") + [EOS], True),
        (_byte_ids("<|user|>\n?") + [EOS] + _byte_ids("<|assistant|>\n"), False),
        (_byte_ids("ok") + [EOS], True),
    ]
    input_ids = [tok for ids, _ in pieces for tok in ids]
    loss_mask = [loss for ids, loss in pieces for _ in ids]
    assert list(sample.input_ids) == input_ids
    assert sample.labels == _expected_labels(input_ids, loss_mask)
    assert sample.num_loss_tokens == 6
    assert byte_tok.decode(sample.input_ids).startswith("<|bos|><|system|>\nS<|eos|><|user|>")


def _llama3_tokenizer(template: str | None) -> TextTokenizer:
    tokenizer = build_byte_level_tokenizer()
    tokenizer.add_special_tokens(LLAMA3_SPECIALS)  # ids 259, 260, 261
    return TextTokenizer(tokenizer=tokenizer, bos_token="<|bos|>", eos_token="<|eot_id|>",
                         chat_template=template)


def test_messages_jinja_template_vs_default(tmp_path: Path) -> None:
    start, end, eot = 259, 260, 261
    path = _write_jsonl(tmp_path, [{"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " yo \n"},
    ]}])
    sample = _load_one(path, _llama3_tokenizer(LLAMA3_TEMPLATE))
    prompt = ([BOS, start] + _byte_ids("user") + [end] + _byte_ids("\n\nhi") + [eot]
              + [start] + _byte_ids("assistant") + [end] + _byte_ids("\n\n"))
    reply = _byte_ids("yo") + [eot]  # the template trims the content
    assert list(sample.input_ids) == prompt + reply
    assert sample.labels == _expected_labels(prompt + reply,
                                             [False] * len(prompt) + [True] * len(reply))

    default = _load_one(path, _llama3_tokenizer(None))
    assert default.input_ids != sample.input_ids
    assert default.input_ids[:11] == (BOS, *_byte_ids("<|user|>\nh"))
    assert default.num_loss_tokens == len(_byte_ids(" yo \n")) + 1


def test_messages_template_not_prefix_stable_is_rejected(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
    ]}])
    last_only = "{{ messages[-1]['content'] if messages else '' }}"
    with pytest.raises(ValueError, match=r"data\.jsonl:1: cannot locate assistant turn "
                                         r"messages\[1\].*use a template"):
        load_dataset(path, _llama3_tokenizer(last_only), max_seq_len=64)


def test_messages_template_raise_exception(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [{"messages": [{"role": "assistant", "content": "yo"}]}])
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(ValueError, match=r"data\.jsonl:1: the chat template failed to render "
                                         r"this conversation \(user first\); fix"):
        load_dataset(path, _llama3_tokenizer(template), max_seq_len=64)


# ----------------------------------------------------------------------------- errors


def _assert_load_error(path: Path, tokenizer: TextTokenizer, pattern: str, **kwargs) -> None:
    kwargs.setdefault("max_seq_len", 64)
    with pytest.raises(ValueError, match=pattern):
        load_dataset(path, tokenizer, **kwargs)


def test_error_missing_file(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    _assert_load_error(tmp_path / "nope.jsonl", byte_tok,
                       r"nope\.jsonl: dataset file not found \(looked for .*nope\.jsonl\); fix the dataset path")


def test_error_empty_file(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    _assert_load_error(path, byte_tok, r"empty\.jsonl: the file is empty \(no samples\); "
                                       r"add one JSON object per line")


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"text": "a",}', r"data\.jsonl:2: invalid JSON .*; write exactly one JSON object"),
        ('["text", "a"]', r"data\.jsonl:2: expected a JSON object, got list; write one object"),
        ('{"input": "a"}', r"data\.jsonl:2: no recognised keys \(got \['input'\]\); use one of "
                           r"the accepted formats: \{\"prompt\": str, \"completion\": str\}"),
        ('{"prompt": "a"}', r"data\.jsonl:2: missing key 'completion'; a prompt/completion row "
                            r"needs both"),
        ('{"prompt": "a", "completion": "b", "text": "c"}',
         r"data\.jsonl:2: keys \['completion', 'prompt', 'text'\] mix several formats; keep"),
        ('{"prompt": 1, "completion": "b"}', r"data\.jsonl:2: 'prompt' must be a string, "
                                             r"got int; quote the value"),
        ('{"text": null}', r"data\.jsonl:2: 'text' must be a string, got NoneType"),
        ('{"messages": "hi"}', r"data\.jsonl:2: 'messages' must be a non-empty list.*write \["),
        ('{"messages": []}', r"data\.jsonl:2: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": 3}]}',
         r"data\.jsonl:2: messages\[0\] must be an object with a string 'content'"),
        ('{"messages": [{"role": "bot", "content": "x"}]}',
         r"data\.jsonl:2: messages\[0\] has role 'bot'; use one of \['system', 'user', "
         r"'assistant'\]"),
        ('{"messages": [{"role": "user", "content": "x"}]}',
         r"data\.jsonl:2: messages has no assistant turn.*; add a \{\"role\": \"assistant\""),
    ],
)
def test_error_bad_rows(tmp_path: Path, byte_tok: TextTokenizer, line: str, pattern: str) -> None:
    path = _write_jsonl(tmp_path, [{"text": "ok"}, line])
    _assert_load_error(path, byte_tok, pattern)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "abc", "completion": ""},
        {"text": "a"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ],
)
def test_error_zero_loss_tokens(tmp_path: Path, bare_tok: TextTokenizer, row: dict) -> None:
    path = _write_jsonl(tmp_path, [row])
    _assert_load_error(path, bare_tok, r"data\.jsonl:1: the sample has no loss tokens.*; give it "
                                       r"a non-empty completion")


def test_error_too_long_under_reject(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    path = _write_jsonl(tmp_path, [{"text": "short"}, {"text": "x" * 20}])
    _assert_load_error(path, byte_tok, r"data\.jsonl:2: the sample has 22 tokens but "
                                       r"max_seq_len=16; raise max_seq_len to at least 22 or "
                                       r"set `overflow: truncate`", max_seq_len=16)


def test_error_unknown_overflow(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    path = _write_jsonl(tmp_path, [{"text": "a"}])
    _assert_load_error(path, byte_tok, r"overflow='drop' is not supported; use one of 'reject', "
                                       r"'truncate'", overflow="drop")


def test_error_bad_max_seq_len(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    path = _write_jsonl(tmp_path, [{"text": "a"}])
    _assert_load_error(path, byte_tok, r"max_seq_len=0 must be an integer >= 2", max_seq_len=0)


def test_error_names_the_job(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    path = _write_jsonl(tmp_path, ["not json"])
    _assert_load_error(path, byte_tok, rf"^job 'sql': {re.escape(str(path))}:1: invalid JSON",
                       name="sql")


# ----------------------------------------------------------------------------- overflow


def test_truncate_keeps_prefix_and_rederives_labels(tmp_path, byte_tok: TextTokenizer) -> None:
    path = _write_jsonl(tmp_path, [{"prompt": "ab", "completion": "cdefgh"}])
    sample = _load_one(path, byte_tok, max_seq_len=5, overflow="truncate")
    assert sample.input_ids == (BOS, 97, 98, 99, 100)
    assert sample.labels == (X, X, 99, 100, X)


def test_truncate_drops_sample_without_loss_tokens(tmp_path, byte_tok: TextTokenizer) -> None:
    path = _write_jsonl(tmp_path, [{"prompt": "abcdefgh", "completion": "z"}, {"text": "ok"}])
    with pytest.warns(UserWarning, match=r"data\.jsonl:1: dropped: no loss tokens left"):
        samples = load_dataset(path, byte_tok, max_seq_len=4, overflow="truncate")
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["2"]


def test_truncate_dropping_everything_is_an_error(tmp_path, byte_tok: TextTokenizer) -> None:
    path = _write_jsonl(tmp_path, [{"prompt": "abcdefgh", "completion": "z"}])
    pattern = r"data\.jsonl: no samples left after truncation.*raise max_seq_len"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=pattern):
        load_dataset(path, byte_tok, max_seq_len=4, overflow="truncate")


def test_reject_and_truncate_agree_when_everything_fits(tmp_path, byte_tok) -> None:
    path = _write_jsonl(tmp_path, [{"text": "abc"}, {"prompt": "p", "completion": "q"}])
    assert (load_dataset(path, byte_tok, max_seq_len=5)
            == load_dataset(path, byte_tok, max_seq_len=5, overflow="truncate"))


# ----------------------------------------------------------------------------- SampleStream


def test_stream_is_deterministic_and_seed_dependent() -> None:
    first = SampleStream(num_samples=50, global_batch_size=8, seed=3)
    again = SampleStream(num_samples=50, global_batch_size=8, seed=3)
    other = SampleStream(num_samples=50, global_batch_size=8, seed=4)
    steps = range(20)
    assert [first.batch(s) for s in steps] == [again.batch(s) for s in reversed(steps)][::-1]
    assert [first.batch(s) for s in steps] != [other.batch(s) for s in steps]


@pytest.mark.parametrize(("num_samples", "gbs"), [(10, 3), (7, 7), (5, 12), (13, 1)])
def test_stream_epochs_cover_every_sample_once(num_samples: int, gbs: int) -> None:
    stream = SampleStream(num_samples=num_samples, global_batch_size=gbs, seed=0)
    num_epochs = 4
    steps = -(-num_epochs * num_samples // gbs)
    flat = [index for step in range(steps) for index in stream.batch(step)]
    assert all(len(stream.batch(step)) == gbs for step in range(steps))
    for epoch in range(num_epochs):
        visited = flat[epoch * num_samples : (epoch + 1) * num_samples]
        assert sorted(visited) == list(range(num_samples))
    # Epochs are fresh permutations, not one permutation repeated.
    assert flat[:num_samples] != flat[num_samples : 2 * num_samples]


def test_stream_step_counts() -> None:
    stream = SampleStream(num_samples=10, global_batch_size=4, seed=0)
    assert stream.steps_per_epoch == 3
    assert stream.steps_for_epochs(1) == 3
    assert stream.steps_for_epochs(2) == 5
    assert stream.steps_for_epochs(0.3) == 1
    assert stream.steps_for_epochs(1.2) == 3


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_samples": 0, "global_batch_size": 2, "seed": 0}, r"num_samples=0 must be"),
        ({"num_samples": 4, "global_batch_size": 0, "seed": 0}, r"global_batch_size=0 must be"),
        ({"num_samples": 4, "global_batch_size": 2, "seed": -1}, r"seed=-1 must be"),
    ],
)
def test_stream_rejects_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SampleStream(**kwargs)


def test_stream_rejects_bad_step_and_epochs() -> None:
    stream = SampleStream(num_samples=4, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"step=-1 must be an integer >= 0"):
        stream.batch(-1)
    with pytest.raises(ValueError, match=r"num_epochs=0 must be a positive finite number"):
        stream.steps_for_epochs(0)


# ----------------------------------------------------------------------------- demo data


@pytest.mark.parametrize(
    ("name", "min_tokens", "max_tokens"),
    [
        ("greet.jsonl", 15, 40),
        ("arith.jsonl", 10, 25),
        ("arith_eval.jsonl", 10, 25),
        ("reverse.jsonl", 40, 160),
        ("chat.jsonl", 200, 512),
    ],
)
def test_demo_datasets_load(byte_tok: TextTokenizer, name: str, min_tokens: int,
                            max_tokens: int) -> None:
    samples = load_dataset(EXAMPLES_DIR / name, byte_tok, max_seq_len=512)
    lengths = [len(sample) for sample in samples]
    assert min_tokens <= min(lengths) and max(lengths) <= max_tokens
    assert all(sample.num_loss_tokens > 0 for sample in samples)


def test_arith_eval_is_disjoint_from_training(byte_tok: TextTokenizer) -> None:
    def prompts(name: str) -> set[str]:
        lines = (EXAMPLES_DIR / name).read_text().splitlines()
        return {json.loads(line)["prompt"] for line in lines}

    assert not prompts("arith.jsonl") & prompts("arith_eval.jsonl")
