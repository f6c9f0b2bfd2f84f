"""Ctrl-C and SIGTERM during a fit: the first one stops the fit at the next window boundary (the windows in flight
finish, every job is checkpointed, whatever the fit started is shut down); a second one exits at once.

Only the driver's main thread installs the handlers (Python delivers signals there); a fit run from another thread
keeps the process's own handlers.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["StopSignals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active, SIGINT/SIGTERM set `signum` (the fit polls it between windows) instead of raising."""

    def __init__(self, say=None) -> None:
        self.signum: int | None = None
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second one: no checkpoint, exit now (the with-blocks still clean up)
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        self._say(f"\n{signal.Signals(signum).name}: finishing the work in flight and writing a checkpoint "
                  "(press Ctrl-C again to exit at once, without one)")
