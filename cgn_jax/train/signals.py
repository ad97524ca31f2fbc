"""Stopping a training loop cleanly on SIGTERM (preempted cloud VMs) or Ctrl-C.

The first signal only sets a flag, so the loop finishes its step and writes a
checkpoint before exiting; a second Ctrl-C interrupts at once. JAX dispatches steps
asynchronously, so "finishes its step" also means finishing every step already queued:
`BoundedQueue` keeps that short.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable


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


class BoundedQueue:
    """Keeps the steps queued on the device under about `seconds` of work.

    Without it the host runs up to a whole log window ahead of the device: 100 steps, which
    at the CPU's ~1 s per step would keep a SIGTERM waiting well past a preemption grace
    period (30 s on Compute Engine). Call `after_step(outputs)` after dispatching each step.
    It measures the step time at each wait and waits again after `seconds` worth of steps.
    Where steps take milliseconds this is one wait per thousands of steps, and it costs nothing.
    """

    def __init__(self, seconds: float = 5.0, *, block: Callable[[Any], Any] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if block is None:
            import jax

            block = jax.block_until_ready
        self.seconds, self._block, self._clock = float(seconds), block, clock
        self.every, self._since, self._last = 1, 0, None

    def after_step(self, outputs) -> None:
        self._since += 1
        if self._since < self.every:
            return
        self._block(outputs)
        now = self._clock()
        if self._last is not None:  # the first wait includes the compilation: only start the clock
            per_step = (now - self._last) / self._since
            self.every = max(1, int(self.seconds / max(per_step, 1e-9)))
        self._last, self._since = now, 0
