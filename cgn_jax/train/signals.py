"""Stopping a training loop cleanly on SIGTERM (preempted cloud VMs) or Ctrl-C.

The first signal only sets a flag, so the loop finishes its step and writes a
checkpoint before exiting; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading


class StopOnSignal:
    """Context manager: `stop.signum` becomes the first SIGTERM / SIGINT received."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
