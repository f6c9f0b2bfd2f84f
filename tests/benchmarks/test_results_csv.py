import csv

from benchmarks.results_csv import append_rows


def test_append_rows_stamps_and_extends_header(tmp_path):
    append_rows("x", [{"a": 1}], results_dir=tmp_path)
    append_rows("x", [{"a": 2, "b": 3}], results_dir=tmp_path)
    with (tmp_path / "x.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["a"] for r in rows] == ["1", "2"]
    assert rows[0]["b"] == "" and rows[1]["b"] == "3"
    assert all(r["device"] and r["commit"] and r["date"] for r in rows)
