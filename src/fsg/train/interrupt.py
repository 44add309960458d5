"""Ctrl-C and SIGTERM during a run: deferred to the end of a training step or of the end-of-epoch
bookkeeping (a second one aborts at once), then :class:`TrainingInterrupted` with a one-line
message saying where the run stopped and how to resume it."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["TrainingInterrupted", "InterruptGuard", "STOP_SIGNALS"]

#: The signals a run stops on, finishing its step and saving first: Ctrl-C and ``kill``/container stop.
class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C or SIGTERM; ``checkpoint`` is the path written
    (``None`` when the interrupt came inside a step and no consistent state could be saved),
    ``message`` one line saying where the run stopped and how to resume it, ``signum`` the signal
    (``signal.SIGINT`` for Ctrl-C and for a ``KeyboardInterrupt`` from elsewhere, or
    ``signal.SIGTERM``): the ``fsg`` command exits with ``128 + signum``, 130 or 143."""

    def __init__(self, message: str, checkpoint: Optional[Path], step: int, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message, self.checkpoint, self.step, self.signum = message, checkpoint, step, int(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGuard:
    """SIGINT and SIGTERM handling for the loop: inside :meth:`critical` such a signal is deferred
    to the end of the block (a second one raises at once); elsewhere it raises
    ``KeyboardInterrupt`` at once. ``torn`` is set when a ``KeyboardInterrupt`` escaped from
    inside a critical block; ``signum`` is the last signal received (``None``: none, e.g. a
    ``KeyboardInterrupt`` raised by other code)."""

    def __init__(self):
        self.deferring = False
        self.requested = False
        self.torn = False
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        if self.deferring and not self.requested:
            self.requested = True
            what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\nfsg: {what} received: finishing the current step, then saving a checkpoint "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    def _install(self, handler) -> Dict[int, Any]:
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                try:
                    previous[sig] = signal.signal(sig, handler)
                except (ValueError, OSError):  # pragma: no cover
                    pass
        return previous

    @staticmethod
    def _uninstall(previous: Dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        self._previous = self._install(self._handler)
        return self

    def __exit__(self, *exc):
        self._uninstall(self._previous)
        self._previous = {}
        return False

    @contextlib.contextmanager
    def saving(self):
        """Ctrl-C and SIGTERM are ignored (with a note) while the interrupt checkpoint is written."""
        def note(signum, frame):
            print("\nfsg: saving the checkpoint, please wait", file=sys.stderr, flush=True)

        previous = self._install(note)
        try:
            yield
        finally:
            self._uninstall(previous)

    @contextlib.contextmanager
    def critical(self):
        self.deferring = True
        try:
            yield
        except KeyboardInterrupt:
            self.torn = True
            raise
        finally:
            self.deferring = False
        if self.requested:
            raise KeyboardInterrupt

