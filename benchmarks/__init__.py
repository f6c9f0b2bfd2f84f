"""Reproducible performance numbers; each `bench_<thing>.py` appends rows to `results/<thing>.csv`."""
