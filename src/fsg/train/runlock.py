"""One run per run directory: ``<out>/.lock``, and the clean-up of interrupted saves.

:class:`RunLock` is held by a training process (rank 0) for the life of its run. On Linux (and
every system with ``fcntl``) it is an advisory ``flock`` on ``<out>/.lock``, which holds the pid
of its owner: the kernel releases it when the process ends in any way (``kill -9`` included), so
a lock file left by a dead process is simply taken over. Without ``fcntl`` the file itself is the
lock (created exclusively) and a file naming a process that no longer exists is taken over. A
second process finds the lock held and gets :class:`RunLockedError` (a ``ValueError``, one line
naming the holder's pid) before it has written anything. The lock file is removed on release.

:func:`remove_stale_temporaries` deletes the temporary files fsg's atomic writer
(:func:`fsg.train.checkpoint.save_checkpoint`, ``atomic_write_text``) leaves when its process is killed
mid-write: ``.<name>.<8 random characters>.tmp`` for the files of a run directory. It is called
only by the holder of the lock, so it never removes the file another run is writing.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import List, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunLock", "RunLockedError", "remove_stale_temporaries", "LOCK_NAME", "RUN_FILES"]

LOCK_NAME = ".lock"
#: The files of a run directory fsg writes atomically (their temporaries are fsg's own).
RUN_FILES = ("last.pt", "model.pt", "config.json", "metrics.jsonl", "metrics.csv")
_TEMP = re.compile(r"^\.(" + "|".join(re.escape(n) for n in RUN_FILES) + r")\.[a-z0-9_]{8}\.tmp$")

PathLike = Union[str, os.PathLike]


class RunLockedError(ValueError):
    """The run directory is in use by another live process."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover
        return False
    return True


def _read_pid(path: Path) -> Optional[int]:
    try:
        text = path.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


class RunLock:
    """The lock of run directory ``out`` (created when missing): ``acquire()`` / ``release()``,
    or a context manager. ``acquire`` raises :class:`RunLockedError` when another live process
    holds it."""

    def __init__(self, out: PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy(self) -> RunLockedError:
        pid = _read_pid(self.path)
        who = f"pid {pid}" if pid else "another process"
        return RunLockedError(f"{str(self.out)!r} is in use by another fsg run ({who}, lock {self.path}): wait for "
                              "it to end, stop it (Ctrl-C or kill: it saves first), or choose another --out")

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - exclusive creation, stale files of dead pids taken over
            for _ in range(3):
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    pid = _read_pid(self.path)
                    if pid is not None and _pid_alive(pid):
                        raise self._busy() from None
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                self._fd = fd
                break
            else:
                raise self._busy()
        else:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise self._busy() from None
                    raise
                # the holder before us may have removed the file between our open and our flock:
                # then we locked an unlinked file; start again with the current one
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self._fd = fd
                    break
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: nobody else holds this file
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(out: PathLike) -> List[str]:
    """Delete the temporaries of fsg's atomic writes of run files left in ``out`` by a process
    killed mid-write (``.last.pt.<random>.tmp``, ...; nothing else); returns their names. Call it
    only while holding the directory's :class:`RunLock`."""
    removed = []
    try:
        names = sorted(os.listdir(out))
    except FileNotFoundError:
        return removed
    for name in names:
        if _TEMP.match(name):
            try:
                os.unlink(os.path.join(out, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
