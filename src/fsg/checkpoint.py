"""Checkpoints of training runs: atomic writes, strict and safe reads.

A checkpoint is one ``torch.save`` file holding a dict of tensors and plain containers only (so
it is read back with ``torch.load(..., weights_only=True)``, which cannot execute code)::

    {
      "format": "fsg-checkpoint", "version": 1,
      "kind": "train" | "pretrain",
      "fsg_version": "...", "torch_version": "...",
      "config":    TrainConfig.to_dict(),
      "trainer":   Trainer.state_dict()      # model, estimator (+ HGS / LSTM states), optimizers,
                                             # step count, recorded ∂L/∂Ŵ and W̃, parameter .grad
      "data":      the training DataLoader's state_dict() (epoch, batch position, seed)
      "scheduler": the learning-rate scheduler's state_dict()
      "epoch":     epochs completed,   "step": training steps completed,
      "batch":     batches done in the current epoch (0 at an epoch boundary),
      "running":   the running sums of the current epoch and of the current logging window,
      "history":   per-epoch metric rows so far,   "elapsed": seconds of the run so far,
      "rng":       {"torch": ByteTensor, "python": random.getstate(), "numpy": {...}},
      "model_spec": {"name": "resnet20", "kwargs": {"num_classes": 10}} or None: rebuilds the
                   model without the dataset (fsg.export; older checkpoints lack it)
    }

:func:`save_checkpoint` writes to a temporary file in the destination directory, flushes and
fsyncs it, then renames it over the destination (``os.replace``), so a reader sees either the
old file or the new one, never a partial one; the temporary file is removed on any failure
(Ctrl-C included). :func:`load_checkpoint` raises :class:`CheckpointError` (a ``ValueError``)
with a one-line message for a missing, truncated, corrupted or foreign file, and changes nothing.
"""

from __future__ import annotations

import collections
import errno
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_text",
    "rng_state",
    "set_rng_state",
    "check_plain",
]

FORMAT = "fsg-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("kind", "config", "trainer", "data", "scheduler", "epoch", "step", "history", "rng")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, foreign or incomplete."""


def _one_line(text: object, limit: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# writing

# exact types (subclasses such as torch's TorchVersion or NumPy scalars are refused by the loader)
_PLAIN = (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)
_DICTS = (dict, collections.OrderedDict)
_SEQS = (list, tuple)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` unless ``obj`` holds only tensors, numbers, strings, ``None`` and
    dict/list/tuple containers of them — what ``torch.load(weights_only=True)`` reads back."""
    stack = [(obj, where)]
    while stack:
        o, path = stack.pop()
        if isinstance(o, torch.Tensor) and type(o) in (torch.Tensor, torch.nn.Parameter):
            continue
        if type(o) in _PLAIN:
            continue
        if type(o) in _DICTS:
            for k, v in o.items():
                if type(k) not in (str, int, float, bool, type(None), tuple):
                    raise TypeError(f"{path}: key {k!r} of type {type(k).__name__} cannot be stored")
                stack.append((v, f"{path}[{k!r}]"))
        elif type(o) in _SEQS:
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(o))
        else:
            raise TypeError(
                f"{path}: a {type(o).__module__}.{type(o).__qualname__} cannot be stored in a checkpoint "
                "(only tensors, numbers, strings, None and dict/list/tuple)"
            )


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
            return OSError(errno.EIO, f"could not write {path} ({_one_line(e, 100)})")
    code = cause.errno
    what = os.strerror(code) if code else (cause.strerror or str(cause))
    return OSError(code, f"{what[:1].lower()}{what[1:]} writing {path}")


def _atomic_write(path: PathLike, write) -> Path:
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


def save_checkpoint(path: PathLike, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    The format tag and version are added. ``payload`` must hold only tensors and plain
    containers (checked first: a ``TypeError`` names the offending entry and nothing is written).
    On any failure the temporary file is removed and a previous file at ``path`` is left intact.
    """
    from . import __version__

    if not isinstance(payload, dict):
        raise TypeError(f"a checkpoint payload must be a dict, got {type(payload).__name__}")
    data = {"format": FORMAT, "version": VERSION, "fsg_version": str(__version__),
            "torch_version": str(torch.__version__)}
    data.update({k: v for k, v in payload.items() if k not in ("format", "version")})
    check_plain(data)
    return _atomic_write(path, lambda f: torch.save(data, f))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a text file atomically (same procedure as :func:`save_checkpoint`)."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read an fsg checkpoint with ``torch.load(..., weights_only=True)``.

    Raises :class:`CheckpointError` with a one-line message when the file is missing, is not a
    file, is truncated or corrupted, is not an fsg checkpoint (a plain ``state_dict``, another
    program's pickle), was written by a newer format version, or lacks an entry. Reads only.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {str(p)!r}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(p)!r} is empty (truncated?)")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(p)!r}: {e.strerror or e}") from None
    if magic != b"PK\x03\x04":  # fsg writes torch's zip format; anything else is not ours
        raise CheckpointError(
            f"{str(p)!r} is not an fsg checkpoint (not a PyTorch zip archive: another program's file, or corrupted)"
        )
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only load failed" in msg:
            raise CheckpointError(
                f"{str(p)!r} is not an fsg checkpoint: it holds Python objects other than tensors and "
                "plain containers (refusing to unpickle them)"
            ) from None
        raise CheckpointError(f"{str(p)!r} is truncated or corrupted ({_one_line(msg, 80)})") from None
    except Exception as e:  # noqa: BLE001 - zip reader, unpickler and storage errors alike
        raise CheckpointError(
            f"{str(p)!r} is truncated or corrupted ({type(e).__name__}: {_one_line(e, 80)})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = "a plain state_dict or another program's file" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise CheckpointError(f"{str(p)!r} is not an fsg checkpoint (it looks like {what})")
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{str(p)!r}: unknown checkpoint format version {version!r}")
    if version > VERSION:
        raise CheckpointError(
            f"{str(p)!r} was written by a newer fsg (checkpoint format {version}, this fsg reads up to {VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{str(p)!r} is incomplete: missing {', '.join(missing)}")
    if not isinstance(data["config"], dict) or not isinstance(data["trainer"], dict):
        raise CheckpointError(f"{str(p)!r} is malformed: config and trainer must be dicts")
    return data


# ----------------------------------------------------------------------------------------------
# random number generator states


def rng_state() -> Dict[str, Any]:
    """The states of torch's CPU generator, Python's ``random`` and NumPy's global generator
    (when NumPy is importable), as tensors and plain containers."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {
        "kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
        "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # pragma: no cover - fewer devices now
            pass
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
