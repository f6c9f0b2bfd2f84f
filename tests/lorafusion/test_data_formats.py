"""Datasets beyond JSONL: Parquet, Arrow and saved HF `datasets` folders, column mapping (`fields`), and errors
that name the file, the row and the column."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import lorafusion as lf
from lorafusion.data import TextTokenizer, build_byte_level_tokenizer, load_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pa_ipc = pytest.importorskip("pyarrow.ipc")
pa_feather = pytest.importorskip("pyarrow.feather")

SHAPES = {
    "prompt_completion": [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+4=", "completion": "7"}],
    "messages": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "LoRA"},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes"}]},
    ],
    "text": [{"text": "the quick brown fox"}, {"text": "jumps"}],
}
# shape -> the names a dataset of one's own might use, and the `fields` that maps them.
RENAMED = {
    "prompt_completion": {"prompt": "question", "completion": "answer"},
    "messages": {"messages": "conversation"},
    "text": {"text": "body"},
}


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(tokenizer=build_byte_level_tokenizer(), bos_token="<|bos|>", eos_token="<|eos|>")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write(fmt: str, path: Path, rows: list[dict]) -> str:
    """`rows` stored as `fmt`; returns the dataset string a job would name."""
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys; absent ones are null
    table = pa.table({column: [row.get(column) for row in rows] for column in columns})
    if fmt == "parquet":
        pq.write_table(table, path.with_suffix(".parquet"))
        return str(path.with_suffix(".parquet"))
    if fmt == "arrow_file":
        with pa_ipc.new_file(path.with_suffix(".arrow"), table.schema) as writer:
            writer.write_table(table)
        return str(path.with_suffix(".arrow"))
    if fmt == "arrow_stream":  # the layout `datasets` writes its shards in
        with pa_ipc.new_stream(path.with_suffix(".arrow"), table.schema) as writer:
            writer.write_table(table)
        return str(path.with_suffix(".arrow"))
    if fmt == "feather":
        pa_feather.write_feather(table, path.with_suffix(".feather"))
        return str(path.with_suffix(".feather"))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def _ids(samples) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(s.input_ids, s.labels) for s in samples]


FORMATS = ["parquet", "arrow_file", "arrow_stream", "feather", "datasets"]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_jsonl_samples(tmp_path, tok, fmt, shape):
    rows = SHAPES[shape]
    expected = load_dataset(_jsonl(tmp_path / "rows.jsonl", rows), tok, max_seq_len=256)
    source = _write(fmt, tmp_path / "rows", rows)
    samples = load_dataset(source, tok, max_seq_len=256)
    assert _ids(samples) == _ids(expected) and len(samples) == 2
    assert samples[1].source == f"{source} row 1"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fields_map_the_columns(tmp_path, tok, fmt, shape):
    rows = SHAPES[shape]
    expected = load_dataset(_jsonl(tmp_path / "plain.jsonl", rows), tok, max_seq_len=256)
    renamed = [{RENAMED[shape].get(key, key): value for key, value in row.items()} for row in rows]
    renamed = [{**row, "id": index} for index, row in enumerate(renamed)]  # other columns are ignored
    source = str(_jsonl(tmp_path / "own.jsonl", renamed)) if fmt == "jsonl" else _write(fmt, tmp_path / "own", renamed)
    samples = load_dataset(source, tok, max_seq_len=256, fields=RENAMED[shape])
    assert _ids(samples) == _ids(expected)


def test_a_mapped_column_wins_over_one_named_like_the_key(tmp_path, tok):
    source = _jsonl(tmp_path / "rows.jsonl", [{"text": "ignored", "body": "hello"}])
    (sample,) = load_dataset(source, tok, max_seq_len=64, fields={"text": "body"})
    assert sample.input_ids[1:-1] == tuple(b"hello")


def test_a_key_may_read_the_column_named_like_another_key(tmp_path, tok):
    """fields {prompt: text}: column 'text' is the prompt, so the row is not also a {text} row."""
    source = _jsonl(tmp_path / "rows.jsonl", [{"text": "2+2=", "label": "4"}])
    (sample,) = load_dataset(source, tok, max_seq_len=64, fields={"prompt": "text", "completion": "label"})
    (expected,) = load_dataset(_jsonl(tmp_path / "plain.jsonl", SHAPES["prompt_completion"][:1]), tok, max_seq_len=64)
    assert _ids([sample]) == _ids([expected])


def test_struct_fields_a_message_lacks_stay_absent(tmp_path):
    """In a table every message has every struct field (null where absent); the template sees the JSONL's keys."""
    template = ("{% for m in messages %}{% if m.name is defined %}[{{ m.name }}]{% endif %}{{ m.role }}: {{ m.content }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok = TextTokenizer(tokenizer=build_byte_level_tokenizer(), eos_token="<|eos|>", chat_template=template)
    rows = [{"messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Yo"}]}]
    (expected,) = load_dataset(_jsonl(tmp_path / "rows.jsonl", rows), tok, max_seq_len=64)
    assert tok.decode(expected.input_ids, skip_special_tokens=True) == "[ann]user: Hiassistant: Yo"
    assert _ids(load_dataset(_write("parquet", tmp_path / "rows", rows), tok, max_seq_len=64)) == _ids([expected])


def test_rows_of_mixed_shapes_in_one_table(tmp_path, tok):
    """A table has every column in every row: null cells are absent keys, as in the JSONL it came from."""
    rows = [SHAPES["text"][0], SHAPES["prompt_completion"][0], SHAPES["messages"][0]]
    expected = load_dataset(_jsonl(tmp_path / "rows.jsonl", rows), tok, max_seq_len=256)
    assert _ids(load_dataset(_write("parquet", tmp_path / "rows", rows), tok, max_seq_len=256)) == _ids(expected)


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"answer": "x"}, r"job 'j': fields has key\(s\) \['answer'\]; map only \['prompt', 'completion', "),
        ({"prompt": 3}, r"job 'j': fields\.prompt=3 must be the name of a column"),
        ({"prompt": "q", "completion": "q"}, r"job 'j': fields reads \['q'\] for more than one key"),
        (["prompt"], r"job 'j': fields=\['prompt'\] must map row keys to your column names"),
    ],
)
def test_fields_are_checked_when_the_job_is_made(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        lf.JobSpec(name="j", dataset="data.jsonl", fields=fields)


# ----------------------------------------------------------------------------- errors name file, row, column


def _error(source, tok, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        load_dataset(source, tok, max_seq_len=64, **kwargs)
    return str(caught.value)


def test_error_missing_mapped_column_names_file_row_and_column(tmp_path, tok):
    source = _write("parquet", tmp_path / "qa", [{"question": "a", "response": "b"}])
    message = _error(source, tok, fields={"prompt": "question", "completion": "answer"}, name="qa")
    assert message.startswith(f"job 'qa': {source} row 0: missing column 'answer' (fields.completion)"), message
    assert "a prompt/completion row needs both columns" in message


def test_error_no_known_column_suggests_fields(tmp_path, tok):
    source = _write("parquet", tmp_path / "qa", [{"question": "a", "response": "b"}])
    message = _error(source, tok)
    assert message.startswith(f"{source} row 0: no recognised columns (got ['question', 'response'])"), message
    assert "map your names to these with `fields:`" in message


def test_error_wrong_type_names_row_and_column(tmp_path, tok):
    source = _write("parquet", tmp_path / "n", [{"question": "a", "answer": 1}, {"question": "b", "answer": 2}])
    message = _error(source, tok, fields={"prompt": "question", "completion": "answer"})
    assert message.startswith(f"{source} row 0: 'answer' (fields.completion) must be a string, got int; store text "
                              "in that column"), message


def test_error_null_cell_names_its_row(tmp_path, tok):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": None}]
    source = _write("arrow_stream", tmp_path / "rows", rows)
    assert _error(source, tok).startswith(f"{source} row 2: missing column 'completion' (or null)")


def test_error_bad_message_in_a_saved_dataset(tmp_path, tok):
    rows = [SHAPES["messages"][0], {"messages": [{"role": "bot", "content": "x"}]}]
    source = _write("datasets", tmp_path / "chat", rows)
    assert _error(source, tok, fields=None).startswith(f"{source} row 1: messages[0] has role 'bot'")


@pytest.mark.parametrize(("name", "kind"), [("bad.parquet", "Parquet"), ("bad.arrow", "Arrow IPC"),
                                            ("bad.feather", "Arrow IPC")])
def test_error_unreadable_file(tmp_path, tok, name, kind):
    path = tmp_path / name
    path.write_bytes(b"not a table at all\n")
    message = _error(path, tok)
    assert message.startswith(f"{path}: not a readable {kind} file ("), message
    assert "write it again" in message


def test_error_empty_table(tmp_path, tok):
    source = _write("parquet", tmp_path / "empty", [])
    assert re.match(rf"{re.escape(source)}: the file is empty \(no samples\); add rows", _error(source, tok))


def test_error_folder_that_is_not_a_dataset(tmp_path, tok):
    (tmp_path / "folder").mkdir()
    message = _error(tmp_path / "folder", tok)
    assert "is a folder but not a saved HF dataset (no state.json or dataset_dict.json)" in message


@pytest.mark.parametrize(("fmt", "blocked", "what"), [
    ("parquet", ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"), "reading a Parquet file needs the 'pyarrow' package"),
    ("datasets", ("datasets",), "reading a saved HF dataset folder needs the 'datasets' package"),
])
def test_error_names_the_extra_when_a_package_is_missing(tmp_path, tok, monkeypatch, fmt, blocked, what):
    source = _write(fmt, tmp_path / "rows", SHAPES["text"])
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    message = _error(source, tok)
    assert message.startswith(f"{source}: {what}, which is not installed; pip install 'lorafusion[data]'"), message


def test_error_damaged_saved_dataset(tmp_path, tok):
    source = Path(_write("datasets", tmp_path / "rows", SHAPES["text"]))
    for shard in source.glob("*.arrow"):
        shard.unlink()
    message = _error(source, tok)
    assert message.startswith(f"{source}: the saved HF dataset cannot be read ("), message
    assert message.endswith("save it again with save_to_disk")


# ----------------------------------------------------------------------------- DatasetDict folders


@pytest.fixture
def dataset_dict(tmp_path) -> Path:
    datasets = pytest.importorskip("datasets")
    splits = {"train": SHAPES["text"], "test": SHAPES["prompt_completion"][:1]}
    folder = tmp_path / "dict"
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(folder))
    return folder


def test_dataset_dict_split_choice(tmp_path, tok, dataset_dict):
    train = load_dataset(_jsonl(tmp_path / "train.jsonl", SHAPES["text"]), tok, max_seq_len=64)
    test = load_dataset(_jsonl(tmp_path / "test.jsonl", SHAPES["prompt_completion"][:1]), tok, max_seq_len=64)
    assert _ids(load_dataset(dataset_dict, tok, max_seq_len=64, default_split="train")) == _ids(train)
    assert _ids(load_dataset(f"{dataset_dict}:test", tok, max_seq_len=64)) == _ids(test)
    assert load_dataset(f"{dataset_dict}:test", tok, max_seq_len=64)[0].source == f"{dataset_dict}:test row 0"


def test_dataset_dict_errors(tok, dataset_dict):
    assert _error(dataset_dict, tok).startswith(
        f"{dataset_dict}: a DatasetDict with splits ['train', 'test']; say which one to read as {dataset_dict}:<split>")
    assert _error(f"{dataset_dict}:dev", tok).startswith(
        f"{dataset_dict}:dev: the DatasetDict has no split 'dev' (its splits: ['train', 'test'])")
    single = dataset_dict / "train"  # each split is itself a saved Dataset
    assert _error(f"{single}:train", tok).startswith(f"{single}:train: ':train' names a split, but {single} is not a "
                                                     "saved DatasetDict (no dataset_dict.json); drop ':train'")


def test_jobs_take_train_and_name_the_eval_split(tmp_path, dataset_dict, train_checkpoint):
    """prepare_run reads `dataset` from the train split; an eval_dataset without a split is refused, not
    silently read from train."""
    from lorafusion.prepare import prepare_run

    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "out"), engine="local")
    job = lf.JobSpec(name="j", dataset=str(dataset_dict), eval_dataset=f"{dataset_dict}:test", max_steps=1)
    prepared = prepare_run([job], run).jobs[0]
    assert [s.source for s in prepared.samples] == [f"{dataset_dict}:train row {i}" for i in range(2)]
    assert [s.source for s in prepared.eval_samples] == [f"{dataset_dict}:test row 0"]
    unnamed = lf.JobSpec(name="j", dataset=str(dataset_dict), eval_dataset=str(dataset_dict), max_steps=1)
    with pytest.raises(ValueError, match=r"job 'j': .*dict: a DatasetDict with splits \['train', 'test'\]; say "):
        prepare_run([unnamed], run)


def test_cli_eval_reads_a_parquet_with_renamed_columns(tmp_path, train_checkpoint, examples_data, capsys):
    from lorafusion.cli import main

    rows = [json.loads(line) for line in (examples_data / "arith_eval.jsonl").read_text().splitlines()]
    source = _write("parquet", tmp_path / "eval", [{"q": r["prompt"], "a": r["completion"]} for r in rows])
    assert main(["eval", str(train_checkpoint), str(examples_data / "arith_eval.jsonl")]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(train_checkpoint), source, "--field", "prompt=q", "--field", "completion=a"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == expected
    assert main(["eval", str(train_checkpoint), source, "--field", "prompt"]) == 2
    assert "write each as KEY=COLUMN" in capsys.readouterr().err


def test_fields_in_a_jobs_yaml(tmp_path):
    job = lf.JobSpec(name="qa", dataset=str(tmp_path / "qa.parquet"), fields={"prompt": "question", "completion": "a"})
    (tmp_path / "jobs.yaml").write_text(json.dumps({"run": {"base_model": "ckpt", "output_dir": "out"},
                                                    "jobs": [job.to_dict()]}))  # JSON is YAML
    (loaded,), _ = lf.load_config(tmp_path / "jobs.yaml")
    assert loaded == job
