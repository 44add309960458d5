"""Crash-safe file writes: a reader sees the old file or the new one, never a partial one.

:func:`atomic_write` writes into a temporary file beside the destination, flushes and fsyncs it,
renames it over the destination (``os.replace``) and fsyncs the directory. On any failure
(Ctrl-C included) the temporary file is removed and the destination is left as it was; a failed
write (full disk, quota, I/O error — also when ``torch.save`` hides it in a ``RuntimeError``)
raises ``OSError`` with one line, e.g. ``no space left on device writing <path>``. Checkpoints,
exports, run configs, grid reports and the image cache are all written this way.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ["PathLike", "atomic_write", "atomic_write_text", "one_line"]

PathLike = Union[str, os.PathLike]


def one_line(text: object, limit: int = 160) -> str:
    """``text`` on one line (runs of whitespace collapsed), cut to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """A writable file that remembers the ``OSError`` its ``write`` raised: ``torch.save`` turns
    a failed write (a full disk) into ``RuntimeError: ... unexpected pos ...``, hiding the cause."""

    def __init__(self, f):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


#: what ``torch.save``'s writer says when a write to its file failed
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _disk_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _write_error(e: BaseException, recorded: Optional[OSError], path: Path, directory: Path) -> Optional[OSError]:
    """One-line ``OSError`` saying why writing ``path`` failed, for an exception of the writer
    that is an ``OSError``, hides one (``torch.save``'s ``RuntimeError``), or is torch's
    write-failure ``RuntimeError`` with no cause attached (then a disk without free space is
    reported as such); ``None`` for anything else (re-raised as is)."""
    cause = recorded
    seen = e
    while cause is None and seen is not None:
        if isinstance(seen, OSError):
            cause = seen
        seen = seen.__cause__ or seen.__context__
    if cause is None:
        if not (isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES)):
            return None
        if _disk_full(directory):
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        else:
            return OSError(errno.EIO, f"could not write {path} ({one_line(e, 100)})")
    code = cause.errno
    what = os.strerror(code) if code else (cause.strerror or str(cause))
    return OSError(code, f"{what[:1].lower()}{what[1:]} writing {path}")


def atomic_write(path: PathLike, write) -> Path:
    """Write ``path`` atomically: ``write(f)`` into a temporary file beside it, flush, fsync,
    rename. On any failure the temporary file is removed and ``path`` is left as it was; a failed
    write (full disk, quota, I/O error — also when ``torch.save`` hides it in a ``RuntimeError``)
    raises ``OSError`` with one line, e.g. ``no space left on device writing <path>``."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    f = None
    try:
        try:
            os.fchmod(fd, 0o644)
        except (OSError, AttributeError):
            pass
        with os.fdopen(fd, "wb") as raw:
            f = _RecordingFile(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, Exception):
            clean = _write_error(e, f.error if f is not None else None, path, directory)
            if clean is not None:
                raise clean from None
        raise
    _fsync_dir(directory)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a text file atomically (same procedure as :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
