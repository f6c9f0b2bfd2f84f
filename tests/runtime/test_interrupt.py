"""The signal handling of a fit (runtime/interrupt.py): the first SIGINT/SIGTERM asks to stop, a second exits at
once, the process's own handlers come back afterwards."""

from __future__ import annotations

import os
import signal

import pytest

from lorafusion.result import FitInterrupted
from runtime.interrupt import StopSignals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_second_exits_at_once(sig):
    before = signal.getsignal(sig)
    said, asked = [], []
    with pytest.raises(KeyboardInterrupt):
        with StopSignals(said.append) as stop:
            os.kill(os.getpid(), sig)
            asked.append(stop.signum)  # reached only if the first signal did not raise (Python's default for SIGINT)
            os.kill(os.getpid(), sig)
            pytest.fail("the second signal should have raised")
    assert asked == [sig] and "press Ctrl-C again to exit at once" in said[0]
    assert signal.getsignal(sig) == before


def test_exit_codes_are_the_shells():
    assert FitInterrupted("m", signal.SIGINT).exit_code == 130
    assert FitInterrupted("m", signal.SIGTERM).exit_code == 143
    assert isinstance(FitInterrupted("m", signal.SIGINT), KeyboardInterrupt)
