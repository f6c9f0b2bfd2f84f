"""Per-job metrics files and the driver's progress lines."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from lorafusion.loggers import RunLoggers

__all__ = ["MetricsWriter", "Progress"]


class MetricsWriter:
    """Appends JSON lines to <output_dir>/<job>/metrics.jsonl, and hands each record to the run's loggers."""

    def __init__(self, output_dir: str, job: str, loggers: RunLoggers | None = None) -> None:
        self.path = Path(output_dir) / job / "metrics.jsonl"
        self.job, self.loggers = job, loggers

    def clear(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.loggers is not None:
            self.loggers.log(self.job, record)


class Progress:
    """One line per job every `every` steps: step/total, loss, lr, throughput."""

    def __init__(self, totals: dict[str, int], *, every: int, enabled: bool, stream: TextIO | None = None,
                 variants: dict[str, str] | None = None) -> None:
        """variants: job -> its adapter type (and optimizer), shown beside the job's name."""
        self.totals, self.every, self.enabled, self.stream = totals, every, enabled, stream
        self.labels = {n: f"{n} [{variants[n]}]" if variants and n in variants else n for n in totals}
        self.width = max((len(n) for n in self.labels.values()), default=4)

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)  # stdout as it is now, not at import

    def step(self, job: str, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        total = self.totals[job]
        if step % self.every and step != total:
            return
        bar_len = 20
        done = math.floor(bar_len * step / total)
        bar = "█" * done + "·" * (bar_len - done)
        self._say(f"  {self.labels[job]:<{self.width}} {bar} {step:>5}/{total:<5} loss {loss:8.4f}  lr {lr:.2e}  "
                  f"{tokens_per_s:8.0f} tok/s")

    def eval(self, job: str, step: int, loss: float) -> None:
        self._say(f"  {self.labels.get(job, job):<{self.width}} eval @ step {step}: loss {loss:.4f}")

    def note(self, text: str) -> None:
        self._say(text)
