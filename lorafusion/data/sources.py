"""The rows of a dataset on disk, whatever holds them: JSONL, Parquet, Arrow, or a saved HF `datasets` folder.

A source is named by one string:

- `data.jsonl` (or any other file name): one JSON object per line, blank lines skipped.
- `data.parquet`: a Parquet file; `data.arrow` / `data.feather`: an Arrow IPC file (or stream) — each row
  a table row, a null cell read as an absent key (a table has every column in every row).
- a folder written by `Dataset.save_to_disk`: its rows, read with `datasets.load_from_disk`.
- a folder written by `DatasetDict.save_to_disk`: one split, chosen as `folder:split` (e.g. `gsm8k:test`);
  without `:split`, its only split, else the caller's default split (a job's `dataset` takes `train`, its
  `eval_dataset` names its split, so a run never evaluates on training rows by accident).

A path that exists is always taken whole, so a file name containing ':' still works. Rows are located as
`path:line` (JSONL, 1-based like an editor) or `path row i` (tables, 0-based like `dataset[i]`).

Parquet and Arrow need pyarrow, `datasets` folders need `datasets`: the `lorafusion[data]` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

__all__ = ["PARQUET_SUFFIXES", "ARROW_SUFFIXES", "read_rows", "split_source"]

PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather")
_DATA_EXTRA = "pip install 'lorafusion[data]'"
_ROWS_PER_BATCH = 4096  # table rows turned into Python dicts at a time, so a big file is never all dicts at once


def split_source(source: str | Path) -> tuple[Path, str | None]:
    """(path, split): `folder:split` names one split of a saved DatasetDict; an existing path is taken whole."""
    text = str(source)
    if not Path(text).exists() and ":" in text:
        folder, split = text.rsplit(":", 1)
        if split and Path(folder).is_dir():
            return Path(folder), split
    return Path(text), None


def read_rows(
    source: str | Path, prefix: str, default_split: str | None = None
) -> tuple[Iterator[tuple[str, dict[str, Any]]], bool]:
    """((where, row) for every row of `source`, whether its rows come from a table); a ValueError (prefixed by
    `prefix`) naming the file and the fix when the file cannot be read, raised before any row is returned."""
    path, split = split_source(source)
    if not path.exists():
        raise ValueError(
            f"{prefix}{source}: dataset file not found (looked for {path.resolve()}); fix the dataset path (in a "
            "jobs YAML a relative path is taken from the YAML's folder, in Python from the working directory)"
        )
    if split is not None and not (path / "dataset_dict.json").is_file():
        raise ValueError(f"{prefix}{source}: ':{split}' names a split, but {path} is not a saved DatasetDict "
                         f"(no dataset_dict.json); drop ':{split}'")
    if path.is_dir():
        table, label = _read_saved_dataset(path, split, default_split, prefix)
        return _table_rows(table, label), True
    if path.suffix.lower() in PARQUET_SUFFIXES + ARROW_SUFFIXES:
        return _table_rows(_read_table_file(path, prefix), str(path)), True
    return iter(_jsonl_rows(path, prefix)), False


def _jsonl_rows(path: Path, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                where = f"{path}:{line_number}"
                rows.append((where, _parse_line(line, where, prefix)))
    return rows


def _parse_line(line: str, where: str, prefix: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{prefix}{where}: invalid JSON ({err.msg} at column {err.colno}); write exactly one JSON object per line"
        ) from None
    if not isinstance(row, dict):
        raise ValueError(f"{prefix}{where}: expected a JSON object, got {type(row).__name__}; write one object per "
                         'line: {"prompt": str, "completion": str}, {"messages": [...]} or {"text": str}')
    return row


def _import(module: str, what: str, prefix: str) -> Any:
    """The optional module that reads `what`, or a ValueError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ValueError(f"{prefix}{what} needs the '{package}' package, which is not installed; {_DATA_EXTRA} "
                         "(or convert the data to JSONL)") from None


def _read_table_file(path: Path, prefix: str) -> Any:
    """The pyarrow Table in a Parquet or Arrow IPC file."""
    kind = "Parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "Arrow IPC"
    pa = _import("pyarrow", f"{path}: reading a {kind} file", prefix)
    parquet, ipc = _import("pyarrow.parquet", kind, prefix), _import("pyarrow.ipc", kind, prefix)
    try:
        if kind == "Parquet":
            return parquet.read_table(path)
        try:
            return ipc.open_file(path).read_all()
        except pa.ArrowInvalid:  # `datasets` and many writers use the stream format, which has no file footer
            return ipc.open_stream(path).read_all()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{prefix}{path}: not a readable {kind} file ({err}); write it again (pandas "
                         f"DataFrame.to_{'parquet' if kind == 'Parquet' else 'feather'}, pyarrow) or point the "
                         "dataset at the right file") from None


def _read_saved_dataset(path: Path, split: str | None, default_split: str | None, prefix: str) -> tuple[Any, str]:
    """(pyarrow Table, label for row locations) of a `save_to_disk` folder, one split of a DatasetDict."""
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not (path / "state.json").is_file():
        raise ValueError(f"{prefix}{path}: is a folder but not a saved HF dataset (no state.json or "
                         "dataset_dict.json); point the dataset at a JSONL, Parquet or Arrow file, or at a folder "
                         "written by Dataset.save_to_disk")
    datasets = _import("datasets", f"{path}: reading a saved HF dataset folder", prefix)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, json and Arrow errors for a damaged folder
        raise ValueError(f"{prefix}{path}: the saved HF dataset cannot be read ({type(err).__name__}: {err}); "
                         "save it again with save_to_disk") from None
    label = str(path)
    if is_dict:
        split = _choose_split(path, list(loaded), split, default_split, prefix)
        loaded, label = loaded[split], f"{path}:{split}"
    return loaded.with_format("arrow")[:], label  # [:] applies any indices mapping (select, shuffle)


def _choose_split(path: Path, splits: list[str], split: str | None, default: str | None, prefix: str) -> str:
    if split is not None and split not in splits:
        raise ValueError(f"{prefix}{path}:{split}: the DatasetDict has no split '{split}' (its splits: {splits}); "
                         f"name one of them as {path}:<split>")
    if split is not None:
        return split
    if len(splits) == 1:
        return splits[0]
    if default is not None and default in splits:
        return default
    raise ValueError(f"{prefix}{path}: a DatasetDict with splits {splits}; say which one to read as "
                     f"{path}:<split>, e.g. {path}:{splits[-1]}")


def _table_rows(table: Any, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a pyarrow Table as dicts; a null cell is left out, as a JSONL row leaves out a key it lacks."""
    index = 0
    for batch in table.to_batches(max_chunksize=_ROWS_PER_BATCH):
        for row in batch.to_pylist():
            yield f"{label} row {index}", _without_nulls(row)
            index += 1


def _without_nulls(value: Any) -> Any:
    """`value` with null entries of every mapping left out: a struct column has each field in every element (a
    message without a `name` gets name=None), and a chat template testing `message.name is defined` must see
    what the JSONL row it came from says."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value
