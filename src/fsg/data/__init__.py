"""Data: real image datasets, the synthetic task and the batching loader — no torchvision.

Three sources, one result type (:class:`ImageDataset`: ``uint8`` images ``(N, 3, H, W)``, ``int64``
labels, class names and the per-channel mean/std used to normalise them):

* :func:`load_cifar` — CIFAR-10 / CIFAR-100 in the official "python version" format (pickled
  batches), from the extracted folder, from the official ``.tar.gz`` archive (extracted safely into
  ``root``), or downloaded (``download=True``; md5-checked, written atomically).
* :func:`load_image_folder` — ``split/class/*.jpg|*.png`` trees, as a directory or a ``.tar.gz``
  (read member by member from memory, never extracted). Every image is decoded once with Pillow
  and the decoded tensors are cached (``torch.save``) in ``cache_dir``, keyed by the source's
  path, size and mtime, so a changed source invalidates its cache.
* ``load_dataset("synthetic")`` — the built-in task of :mod:`fsg.synthetic` in the same wrapper
  (float images; see :func:`load_dataset`).

:class:`DataLoader` batches a dataset in torch: per-epoch shuffling from a generator seeded by
``(seed, epoch)``, CIFAR augmentation (random crop from the zero-padded image + horizontal flip,
vectorised over the batch, see :func:`random_crop_flip`) and normalisation (:func:`normalize`),
with a ``state_dict`` that resumes mid-epoch exactly. On a GPU it keeps the whole dataset on the
device and augments there (``resident``).

Errors about missing or bad data are :class:`DataError` (a ``RuntimeError``) with a one-line
message; missing data raises :class:`DataNotFoundError` (also a ``FileNotFoundError``), a bad
download :class:`ChecksumError`.
"""

from fsg.data.datasets import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DATASETS,
                               ChecksumError, DataError, DataNotFoundError, ImageDataset, default_cache_dir,
                               load_cifar, load_dataset, load_image_folder)
from fsg.data.loader import (DataLoader, apply_crop_flip, draw_crop_flip, epoch_generator, normalize,
                             random_crop_flip)
from fsg.data import synthetic

__all__ = [
    "ImageDataset", "DataLoader", "DataError", "DataNotFoundError", "ChecksumError",
    "load_dataset", "load_cifar", "load_image_folder", "random_crop_flip", "draw_crop_flip",
    "apply_crop_flip", "normalize", "epoch_generator", "default_cache_dir", "DATASETS",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_CLASSES", "synthetic",
]
