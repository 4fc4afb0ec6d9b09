"""Signals during a merge: SIGINT (Ctrl-C), SIGTERM (``timeout``, Slurm, ``docker stop``) and SIGHUP (a closed
terminal) all end a merge the same way: as an exception in the main thread, so the temporary output is removed
(fastmerge.io.OutputDir) and nothing is left behind.

Python raises KeyboardInterrupt for SIGINT by itself; SIGTERM and SIGHUP kill a process at once by default,
so while a merge runs they raise :class:`Interrupted` instead (``interruptible``). During the command line's
start-up, while torch and numpy are imported, a signal is only recorded (``deferred``): code inside those
imports can catch and drop a KeyboardInterrupt, after which the merge would run to the end.
"""

from __future__ import annotations

import contextlib
import signal
import threading

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A merge was stopped by a signal; ``signum`` says which (the command's exit status is 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interruptible():
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread for the duration, where they
    have Python's default handling; a handler the program installed itself is left alone. Restored after."""
    saved = {}
    if _main():
        for s in ENDING:
            h = signal.getsignal(s)
            if h in (signal.SIG_DFL, signal.default_int_handler):
                saved[s] = signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


class deferred:
    """Record SIGINT, SIGTERM and SIGHUP instead of acting on them (``pending``: the first one received, or
    None); on exit the previous handlers come back. For start-up code that must not be cut short silently."""

    def __init__(self):
        self.pending: int | None = None
        self._saved: dict = {}

    def _record(self, signum, frame):
        if self.pending is None:
            self.pending = signum

    def __enter__(self) -> deferred:
        if _main():
            for s in ENDING:
                self._saved[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)
