"""Data: real image datasets, the synthetic task and the batching loader — no torchvision.

* :mod:`fsg.data.datasets` — CIFAR-10/100 (official python-format files, archive or download),
  ``split/class/*.jpg`` folders or tarballs (decoded once, cached) and the synthetic task, as one
  :class:`ImageDataset` (``uint8`` images, labels, class names, per-channel mean/std); errors are
  one-line :class:`DataError` exceptions.
* :mod:`fsg.data.loader` — :class:`DataLoader`: per-epoch shuffling from a generator seeded by
  ``(seed, epoch)``, CIFAR augmentation (random crop of the zero-padded image + flip, vectorised
  over the batch) and normalisation in torch, a ``state_dict`` that resumes mid-epoch exactly, and
  on a GPU the whole dataset on the device (``resident``).
* :mod:`fsg.data.synthetic` — the built-in synthetic image task (no download).
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
