"""One way to record benchmark rows: every row gets the device, the commit and the date, then is printed
and appended to `benchmarks/results/<name>.csv` (header written once; new columns extend the header)."""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import subprocess
from pathlib import Path

__all__ = ["RESULTS_DIR", "device_name", "commit", "append_rows", "emit_rows"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    """The GPU's name when torch sees one, else the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}" + (f" ({threads} threads)" if threads else "")


def commit() -> str:
    """Short hash of HEAD, with '+dirty' when the working tree has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def append_rows(name: str, rows: list[dict], results_dir: Path = RESULTS_DIR) -> Path:
    """Stamp `rows` with device/commit/date, print them and append them to `<results_dir>/<name>.csv`."""
    stamp = {"device": device_name(), "commit": commit(), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    rows = [{**stamp, **row} for row in rows]
    path = Path(results_dir) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows: list[dict] = []
    fields: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old_rows = list(reader)
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old_rows + rows)
    for row in rows:
        print(", ".join(f"{k}={v}" for k, v in row.items() if k not in stamp))
    return path


def emit_rows(name: str, rows: list[dict], record: bool) -> list[dict]:
    """append_rows when `record`, else only print the rows (a script's --no-record); returns the rows."""
    if record:
        append_rows(name, rows)
    else:
        for row in rows:
            print(row)
    return rows
