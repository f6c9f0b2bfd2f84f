"""Execution: the stage worker's training loop and the fit driver."""

from runtime.fit import fit

__all__ = ["fit"]
