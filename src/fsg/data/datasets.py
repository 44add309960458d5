"""Datasets — CIFAR-10/100, image folders, the synthetic task — as one :class:`ImageDataset`.

Three sources, one result type (:class:`ImageDataset`: ``uint8`` images ``(N, 3, H, W)``, ``int64``
labels, class names and the per-channel mean/std used to normalise them):

* :func:`load_cifar` — CIFAR-10 / CIFAR-100 in the official "python version" format (pickled
  batches), from the extracted folder, from the official ``.tar.gz`` archive (extracted safely into
  ``root``), or downloaded (``download=True``; md5-checked, written atomically).
* :func:`load_image_folder` — ``split/class/*.jpg|*.png`` trees, as a directory or a ``.tar.gz``
  (read member by member from memory, never extracted). Every image is decoded once with Pillow
  and the decoded tensors are cached (``torch.save``) in ``cache_dir``, keyed by the source's
  path, size and mtime, so a changed source invalidates its cache.
* ``load_dataset("synthetic")`` — the built-in task of :mod:`fsg.data.synthetic` in the same
  wrapper (float images; see :func:`load_dataset`).

Batching, augmentation and normalisation: :mod:`fsg.data.loader`.

Errors about missing or bad data are :class:`DataError` (a ``RuntimeError``) with a one-line
message; missing data raises :class:`DataNotFoundError` (also a ``FileNotFoundError``), a bad
download :class:`ChecksumError`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor


__all__ = [
    "ImageDataset", "DataError", "DataNotFoundError", "ChecksumError",
    "load_dataset", "load_cifar", "load_image_folder", "default_cache_dir", "DATASETS",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_CLASSES",
]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5, 0.5, 0.5)
CIFAR100_STD = (0.5, 0.5, 0.5)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")

#: Official archives (https://www.cs.toronto.edu/~kriz/cifar.html), their md5 sums, and layout.
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}
_CIFAR_LAYOUT = {
    # name: (folder, archive, train files, test files, meta file, label key, class-names key)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "meta",
                 "fine_labels", "fine_label_names"),
}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1


class DataError(RuntimeError):
    """Missing, corrupt or malformed data (one-line message saying what and where)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data is not where it was expected (the message says which files, where, and how to get
    them)."""


class ChecksumError(DataError):
    """A downloaded archive does not have the expected md5 (nothing is left on disk)."""


# --------------------------------------------------------------------------------------------------
# The dataset type


@dataclass
class ImageDataset:
    """An in-memory image-classification split.

    ``images``: ``uint8`` tensor ``(N, 3, H, W)`` (channels first, RGB; for the synthetic task a
    float tensor ``(N, C, H, W)``, see :func:`load_dataset`); ``labels``: ``int64`` ``(N,)``;
    ``classes``: class names (``labels`` index them); ``mean``/``std``: per-channel statistics of
    pixel values in [0, 1] (of raw values for float images) used by :func:`normalize`; ``name``:
    the dataset's name; ``split``: ``"train"`` or ``"test"``.
    """

    images: Tensor
    labels: Tensor
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    name: str = ""
    split: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, dtype={self.images.dtype}, "
                f"classes={len(self.classes)})")


# --------------------------------------------------------------------------------------------------
# CIFAR, official python format


def _get(d: dict, key: str):
    """``d[key]`` for a batch unpickled with ``encoding="bytes"`` (bytes or str keys)."""
    if key in d:
        return d[key]
    bkey = key.encode()
    if bkey in d:
        return d[bkey]
    raise KeyError(key)


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"could not read CIFAR batch {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"CIFAR batch {path} holds a {type(d).__name__}, expected a dict")
    return d


def _text(s) -> str:
    return s.decode("utf-8") if isinstance(s, (bytes, bytearray)) else str(s)


def _has_files(folder: str, files: Sequence[str]) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in files)


def _is_safe_member(m: tarfile.TarInfo) -> bool:
    name = m.name.replace("\\", "/")
    if name.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return False
    if ".." in name.split("/"):
        return False
    return m.isfile() or m.isdir()


def _safe_extract(archive: str, root: str, folder: str) -> None:
    """Extract ``archive`` into ``root`` (via a temporary folder in ``root``, then moved into
    place). Members with absolute paths, ``..`` components, links or devices are rejected."""
    tmp = tempfile.mkdtemp(prefix=".fsg-extract-", dir=root)
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                bad = [m.name for m in members if not _is_safe_member(m)]
                if bad:
                    raise DataError(f"refusing to extract {archive}: unsafe member {bad[0]!r} "
                                    f"(absolute path, '..', link or device)")
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    tf.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"could not extract {archive}: {type(e).__name__}: {e}") from None
        src = os.path.join(tmp, folder)
        if not os.path.isdir(src):
            raise DataError(f"archive {archive} does not contain the folder {folder}/")
        dst = os.path.join(root, folder)
        if not os.path.exists(dst):
            os.replace(src, dst)
        else:  # a partial folder is already there: move the files in one by one
            for dirpath, _, files in os.walk(src):
                rel = os.path.relpath(dirpath, src)
                os.makedirs(os.path.join(dst, rel), exist_ok=True)
                for fn in files:
                    os.replace(os.path.join(dirpath, fn), os.path.join(dst, rel, fn))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(url: str, dest: str, md5: str) -> None:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, md5-checked, then
    renamed); the temp file is removed on any failure."""
    folder = os.path.dirname(dest) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".part", dir=folder)
    try:
        h = hashlib.md5(usedforsecurity=False)
        print(f"fsg: downloading {url} -> {dest}", file=sys.stderr)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    while True:
                        chunk = resp.read(1 << 20)
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise DataError(f"could not download {url}: {reason} (download needs network "
                                f"access; or place the file at {dest} yourself)") from None
        got = h.hexdigest()
        if got != md5:
            raise ChecksumError(f"checksum mismatch for {url}: md5 {got}, expected {md5} "
                                f"(download discarded; try again)")
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _cifar_folder(root: str, name: str, needed: Sequence[str], download: bool) -> str:
    """The folder holding ``needed``: ``root/<folder>``, or ``root`` itself, else extracted from
    ``root/<archive>``, else downloaded (if ``download``), else :class:`DataNotFoundError`."""
    folder, archive = _CIFAR_LAYOUT[name][:2]
    root = os.path.abspath(os.path.expanduser(root))
    sub = os.path.join(root, folder)
    if _has_files(sub, needed):
        return sub
    if _has_files(root, needed):
        return root
    arc = os.path.join(root, archive)
    if not os.path.isfile(arc) and download:
        _download(CIFAR_URLS[name], arc, CIFAR_MD5[name])
    if os.path.isfile(arc):
        _safe_extract(arc, root, folder)
        if _has_files(sub, needed):
            return sub
        missing = [f for f in needed if not os.path.isfile(os.path.join(sub, f))]
        raise DataError(f"archive {arc} does not contain {folder}/{missing[0]}")
    files = "{" + ",".join(needed) + "}" if len(needed) > 1 else needed[0]
    raise DataNotFoundError(
        f"{_PRETTY[name]} not found: expected {os.path.join(sub, files)} or the archive {arc}; "
        f"get {CIFAR_URLS[name]} (md5 {CIFAR_MD5[name]}) into {root}, or pass download=True "
        f"(needs network access)")


def load_cifar(root: str, name: str = "cifar10", split: str = "train",
               download: bool = False) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from the official "python version" files.

    ``root`` holds the extracted folder (``cifar-10-batches-py/`` with ``data_batch_1..5``,
    ``test_batch``, ``batches.meta``; ``cifar-100-python/`` with ``train``, ``test``, ``meta``), or
    is that folder itself, or holds the official archive (``cifar-10-python.tar.gz`` /
    ``cifar-100-python.tar.gz``), which is then extracted into ``root`` (members with absolute
    paths, ``..``, links or devices are rejected). With ``download=True`` and nothing present, the
    archive is downloaded from ``CIFAR_URLS[name]`` into ``root`` with urllib, its md5 checked
    against ``CIFAR_MD5[name]`` and written atomically (temp file + rename; the temp file is deleted
    on failure), then extracted. Batches are unpickled with ``encoding="bytes"``; bytes and str keys
    both work. Each row of ``data`` is 3072 bytes: the R, G and B planes of a 32×32 image,
    row-major, so it reshapes to ``(3, 32, 32)`` directly.

    Missing data raises :class:`DataNotFoundError` naming the expected files and how to get them;
    a bad download :class:`ChecksumError`; malformed files :class:`DataError`.
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected 'cifar10' or 'cifar100'")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, _, train_files, test_files, meta_file, label_key, names_key = _CIFAR_LAYOUT[name]
    files = train_files if split == "train" else test_files
    folder = _cifar_folder(root, name, tuple(files) + (meta_file,), download)

    datas, labels = [], []
    for fn in files:
        path = os.path.join(folder, fn)
        d = _unpickle(path)
        try:
            data = np.asarray(_get(d, "data"), dtype=np.uint8)
            lab = np.asarray(_get(d, label_key), dtype=np.int64)
        except KeyError as e:
            raise DataError(f"CIFAR batch {path} has no {e.args[0]!r} entry") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise DataError(f"CIFAR batch {path}: data has shape {data.shape} and {len(lab)} "
                            f"labels, expected (N, 3072) and N labels")
        datas.append(data)
        labels.append(lab)
    meta_path = os.path.join(folder, meta_file)
    try:
        classes = [_text(c) for c in _get(_unpickle(meta_path), names_key)]
    except KeyError:
        raise DataError(f"CIFAR meta file {meta_path} has no {names_key!r} entry") from None

    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32).copy())
    y = torch.from_numpy(np.concatenate(labels))
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        raise DataError(f"{_PRETTY[name]} labels in {folder} are outside [0, {len(classes)})")
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return ImageDataset(images, y, classes, mean, std, name=name, split=split)


# --------------------------------------------------------------------------------------------------
# Image folders (directory or tarball), decoded once and cached


def default_cache_dir() -> str:
    """``$FSG_CACHE`` if set, else ``~/.cache/fsg``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("FSG_CACHE") or "~/.cache/fsg"))


def _is_image_name(fn: str) -> bool:
    return not fn.startswith(".") and fn.lower().endswith(_IMAGE_EXTS)


def _source_stem(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _dir_split_root(path: str, split: str) -> Optional[str]:
    """``path/split`` or ``path/<only subfolder>/split``."""
    if os.path.isdir(os.path.join(path, split)):
        return os.path.join(path, split)
    subs = [e for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    if len(subs) == 1 and os.path.isdir(os.path.join(subs[0].path, split)):
        return os.path.join(subs[0].path, split)
    return None


def _dir_items(path: str, split: str) -> List[Tuple[str, str, os.stat_result]]:
    """``(class, file path, stat)`` of the images of ``split`` in a directory tree, sorted."""
    top = _dir_split_root(path, split)
    if top is None:
        return []
    items = []
    for cls in sorted(e.name for e in os.scandir(top) if e.is_dir() and not e.name.startswith(".")):
        for e in sorted(os.scandir(os.path.join(top, cls)), key=lambda e: e.name):
            if e.is_file() and _is_image_name(e.name):
                items.append((cls, e.path, e.stat()))
    return items


def _tar_items(path: str, split: str) -> List[Tuple[str, str, bytes]]:
    """``(class, member name, bytes)`` of the images of ``split`` in a tarball (``split/class/f``
    or ``<top>/split/class/f``), read member by member into memory, sorted."""
    found: Dict[str, List[Tuple[str, str, bytes]]] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = [p for p in m.name.replace("\\", "/").split("/") if p not in ("", ".")]
                if len(parts) == 3 and parts[0] == split:
                    prefix = ""
                elif len(parts) == 4 and parts[1] == split:
                    prefix = parts[0]
                else:
                    continue
                if not _is_image_name(parts[-1]) or parts[-2].startswith("."):
                    continue
                f = tf.extractfile(m)
                found.setdefault(prefix, []).append((parts[-2], m.name, f.read()))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"could not read tarball {path}: {type(e).__name__}: {e}") from None
    if len(found) > 1:
        raise DataError(f"tarball {path} has {split}/ images under several top-level folders: "
                        f"{sorted(p or '.' for p in found)}")
    items = next(iter(found.values()), [])
    items.sort(key=lambda t: (t[0], t[1]))
    return items


def _decode(sources: Sequence, names: Sequence[str], where: str) -> Tensor:
    """Decode images (paths or bytes) with Pillow into one ``uint8`` tensor ``(N, 3, H, W)``."""
    out = None
    first = None
    for i, (src, name) in enumerate(zip(sources, names)):
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                arr = np.asarray(im.convert("RGB"))
        except DataError:
            raise
        except Exception as e:  # PIL raises many types on bad files
            raise DataError(f"could not decode image {name} in {where}: {type(e).__name__}: "
                            f"{e}") from None
        if out is None:
            out = np.empty((len(sources),) + arr.shape, dtype=np.uint8)
            first = (name, arr.shape)
        elif arr.shape != first[1]:
            raise DataError(f"images in {where} differ in size: {name} is "
                            f"{arr.shape[1]}x{arr.shape[0]}, {first[0]} is "
                            f"{first[1][1]}x{first[1][0]} (all images must have the same size)")
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _channel_stats(images: Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of ``uint8`` images scaled to [0, 1] (exact, from per-channel
    histograms of the 256 values)."""
    v = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        h = images[:, c].reshape(-1).bincount(minlength=256).to(torch.float64)
        n = max(1.0, float(h.sum()))
        m = float((h * v).sum()) / n
        var = max(0.0, float((h * v * v).sum()) / n - m * m)
        mean.append(round(m, 6))
        std.append(round(math.sqrt(var), 6))
    return tuple(mean), tuple(std)


def _atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename (no partial cache file)."""
    from fsg.files import atomic_write

    atomic_write(path, lambda f: torch.save(obj, f))


def _load_folder_split(path: str, split: str, cache_dir) -> Optional[dict]:
    """Decoded ``split`` of an image folder (from the cache when valid), or None if it has no
    images. Returns a dict with ``images``, ``labels``, ``classes``, ``mean``, ``std``."""
    path = os.path.abspath(os.path.expanduser(path))
    is_dir = os.path.isdir(path)
    if not is_dir and not os.path.isfile(path):
        raise DataNotFoundError(f"image folder {path} not found: expected a directory or a .tar.gz "
                                f"holding {split}/<class>/*.jpg|*.png")
    dir_items = _dir_items(path, split) if is_dir else None
    # cache key: source path + size + mtime (every image's, for a directory) + split
    h = hashlib.sha256(f"v{_CACHE_VERSION}\0{split}\0".encode())
    if is_dir:
        for cls, p, st in dir_items:
            h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    else:
        st = os.stat(path)
        h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
    key = h.hexdigest()
    cache_file = None
    if cache_dir is not False:
        cdir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
        pid = hashlib.sha256(path.encode()).hexdigest()[:10]
        prefix = f"imagefolder-{_source_stem(path)}-{split}-{pid}-"
        cache_file = os.path.join(cdir, prefix + key[:16] + ".pt")
        if os.path.isfile(cache_file):
            try:
                d = torch.load(cache_file, map_location="cpu", weights_only=True)
                if isinstance(d, dict) and d.get("key") == key and d.get("source") == path:
                    return d
            except Exception:
                pass  # unreadable cache: rebuild it

    if is_dir:
        items = dir_items
        classes = sorted({c for c, _, _ in items})
        srcs = [p for _, p, _ in items]
        names = [os.path.relpath(p, path) for p in srcs]
    else:
        items = _tar_items(path, split)
        classes = sorted({c for c, _, _ in items})
        srcs = [b for _, _, b in items]
        names = [n for _, n, _ in items]
    if not items:
        return None
    images = _decode(srcs, names, path)
    del srcs
    idx = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([idx[it[0]] for it in items], dtype=torch.int64)
    mean, std = _channel_stats(images)
    d = {"images": images, "labels": labels, "classes": classes, "mean": list(mean),
         "std": list(std), "key": key, "source": path, "split": split}
    if cache_file is not None:
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            _atomic_save(d, cache_file)
            for fn in os.listdir(os.path.dirname(cache_file)):  # drop stale caches of this source
                full = os.path.join(os.path.dirname(cache_file), fn)
                if fn.startswith(prefix) and fn.endswith(".pt") and full != cache_file:
                    os.unlink(full)
        except (OSError, RuntimeError) as e:  # a full disk, an unwritable cache: the data are decoded anyway
            msg = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
            warnings.warn(f"fsg.data: could not write the image cache {cache_file} ({msg}); continuing without it",
                          stacklevel=3)
    return d


def load_image_folder(path: str, split: str = "train", cache_dir=None) -> ImageDataset:
    """An image-classification split laid out ``split/<class>/*.jpg|*.jpeg|*.png``.

    ``path`` is a directory or a tarball (``.tar.gz``/``.tgz``/``.tar``); the layout may sit under
    one top-level folder (``<top>/split/<class>/...``). Classes are the subfolder names, sorted;
    within a class files are taken in name order; hidden files and other extensions are ignored.
    A tarball is read member by member from memory (nothing is extracted to disk). Every image is
    decoded once with Pillow (converted to RGB) and all must have the same size (else
    :class:`DataError`); the stacked ``uint8`` ``(N, 3, H, W)`` tensor is cached with
    ``torch.save`` in ``cache_dir`` (default :func:`default_cache_dir`: ``$FSG_CACHE`` or
    ``~/.cache/fsg``; ``False`` disables caching), keyed by the source path, its size and mtime
    (for a directory: of every image file), so a changed source is decoded again; the cache is
    written atomically and stale caches of the same source are removed. Nothing is ever written
    next to the data, so read-only sources work; an unwritable or full cache dir only warns.

    ``mean``/``std``: CIFAR-10's if the folder has exactly CIFAR-10's ten class names, else the
    per-channel statistics of the folder's *training* images (those of ``split`` if it has no
    ``train`` split).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = _load_folder_split(path, split, cache_dir)
    if d is None:
        raise DataNotFoundError(f"no images found in {os.path.abspath(path)}: expected "
                                f"{split}/<class>/*.jpg|*.png (optionally under one top-level "
                                f"folder)")
    classes = list(d["classes"])
    if classes == sorted(CIFAR10_CLASSES):
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        stats = d
        if split != "train":
            stats = _load_folder_split(path, "train", cache_dir) or d
        mean, std = tuple(stats["mean"]), tuple(stats["std"])
    return ImageDataset(d["images"], d["labels"], classes, mean, std,
                        name=_source_stem(os.path.abspath(path)), split=split)


# --------------------------------------------------------------------------------------------------
# One entry point


def load_dataset(name: str, data_dir: Optional[str] = None, split: str = "train",
                 download: bool = False, cache_dir=None, **synthetic_kwargs) -> ImageDataset:
    """Load ``split`` (``"train"``/``"test"``) of a dataset by name.

    * ``"cifar10"``, ``"cifar100"``: official python-format files under ``data_dir`` (default
      ``$FSG_DATA`` or ``./data``), see :func:`load_cifar` (``download`` applies here).
    * ``"imagefolder"``: ``data_dir`` is a directory or ``.tar.gz``, see
      :func:`load_image_folder` (``cache_dir`` applies here).
    * ``"synthetic"``: :func:`fsg.data.synthetic.make_synthetic` (keyword arguments pass through to it,
      e.g. ``channels=3, size=32``). Its images are already standardised floats, so they are kept
      as float ``(N, C, H, W)`` (not ``uint8``; ``C`` is 1 by default) with ``mean = 0`` and
      ``std = 1`` per channel, and :func:`normalize` leaves them unchanged; augmentation pads
      them with zeros (the data's mean) like any other images.
    """
    if name in ("cifar10", "cifar100"):
        root = data_dir or os.environ.get("FSG_DATA") or "data"
        return load_cifar(root, name, split, download=download)
    if name == "imagefolder":
        if not data_dir:
            raise ValueError("load_dataset('imagefolder') needs data_dir (a directory or .tar.gz)")
        return load_image_folder(data_dir, split, cache_dir=cache_dir)
    if name == "synthetic":
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        from fsg.data.synthetic import make_synthetic
        train, test = make_synthetic(**synthetic_kwargs)
        s = train if split == "train" else test
        c = s.x.shape[1]
        return ImageDataset(s.x.float(), s.y.long(), [f"class_{k}" for k in range(s.num_classes)],
                            (0.0,) * c, (1.0,) * c, name="synthetic", split=split)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
