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
                   model without the dataset (fsg.io.export; older checkpoints lack it)
    }

:func:`save_checkpoint` writes to a temporary file in the destination directory, flushes and
fsyncs it, then renames it over the destination (``os.replace``), so a reader sees either the
old file or the new one, never a partial one; the temporary file is removed on any failure
(Ctrl-C included). :func:`load_checkpoint` raises :class:`CheckpointError` (a ``ValueError``)
with a one-line message for a missing, truncated, corrupted or foreign file, and changes nothing.
:func:`read_header` and :func:`read_config` read the light entries (configuration, counters,
history) without reading the tensors: the file is memory-mapped.
"""

from __future__ import annotations

import collections
import pickle
import random
from pathlib import Path
from typing import Any, Dict, Union

import torch

from fsg.files import PathLike, atomic_write, one_line

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "read_header",
    "read_config",
    "rng_state",
    "set_rng_state",
    "check_plain",
]

FORMAT = "fsg-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("kind", "config", "trainer", "data", "scheduler", "epoch", "step", "history", "rng")

class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, foreign or incomplete."""


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


def save_checkpoint(path: PathLike, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    The format tag and version are added. ``payload`` must hold only tensors and plain
    containers (checked first: a ``TypeError`` names the offending entry and nothing is written).
    On any failure the temporary file is removed and a previous file at ``path`` is left intact.
    """
    from fsg import __version__

    if not isinstance(payload, dict):
        raise TypeError(f"a checkpoint payload must be a dict, got {type(payload).__name__}")
    data = {"format": FORMAT, "version": VERSION, "fsg_version": str(__version__),
            "torch_version": str(torch.__version__)}
    data.update({k: v for k, v in payload.items() if k not in ("format", "version")})
    check_plain(data)
    return atomic_write(path, lambda f: torch.save(data, f))


# ----------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu", *,
                    mmap: bool = False) -> Dict[str, Any]:
    """Read an fsg checkpoint with ``torch.load(..., weights_only=True)``.

    ``mmap``: map the file's tensors into memory instead of reading them (their pages are read
    only when touched; for reading a few entries of a large checkpoint, see :func:`read_header`).

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
        data = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only load failed" in msg:
            raise CheckpointError(
                f"{str(p)!r} is not an fsg checkpoint: it holds Python objects other than tensors and "
                "plain containers (refusing to unpickle them)"
            ) from None
        raise CheckpointError(f"{str(p)!r} is truncated or corrupted ({one_line(msg, 80)})") from None
    except Exception as e:  # noqa: BLE001 - zip reader, unpickler and storage errors alike
        raise CheckpointError(
            f"{str(p)!r} is truncated or corrupted ({type(e).__name__}: {one_line(e, 80)})"
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


#: The entries :func:`read_header` leaves out: the tensors of the trainer and the generators.
HEAVY_KEYS = ("trainer", "rng")


def read_header(path: PathLike) -> Dict[str, Any]:
    """The light entries of a checkpoint (format, kind, config, data, scheduler, epoch, batch,
    step, running, history, elapsed, model_spec — everything but ``trainer`` and ``rng``),
    checked as by :func:`load_checkpoint`, without reading its tensors: the file is
    memory-mapped, so even a checkpoint of gigabytes costs a few pages."""
    data = load_checkpoint(path, mmap=True)
    return {k: v for k, v in data.items() if k not in HEAVY_KEYS}


def read_config(path: PathLike) -> Dict[str, Any]:
    """A checkpoint's configuration (the ``TrainConfig.to_dict()`` it was written with), read
    cheaply (:func:`read_header`). Raises :class:`CheckpointError` as :func:`load_checkpoint`."""
    return dict(read_header(path)["config"])


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
