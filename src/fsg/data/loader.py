"""Batches in torch: CIFAR augmentation (random crop from the zero-padded image + horizontal flip,
vectorised over the batch), normalisation, and :class:`DataLoader`, whose per-epoch order comes
from a generator seeded by ``(seed, epoch)`` and whose ``state_dict`` resumes mid-epoch exactly. On
a GPU it keeps the whole dataset on the device and augments there (``resident``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fsg.data.datasets import ImageDataset
from fsg.distributed import shard_bounds

__all__ = ["DataLoader", "random_crop_flip", "draw_crop_flip", "apply_crop_flip", "normalize", "epoch_generator"]




def draw_crop_flip(n: int, generator: torch.Generator, padding: int = 4
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """The random numbers of :func:`random_crop_flip` for ``n`` images, in this order:
    ``offsets = torch.randint(0, 2*padding + 1, (n, 2), generator=generator)`` (column 0 = row
    offset ``dy``, column 1 = column offset ``dx`` into the padded image), then
    ``flip = torch.rand(n, generator=generator) < 0.5``. Returns ``(dy, dx, flip)``."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return offsets[:, 0], offsets[:, 1], flip


def apply_crop_flip(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int = 4
                    ) -> Tensor:
    """Crop ``images`` ``(B, C, H, W)`` at ``(dy[b], dx[b])`` from the image zero-padded by
    ``padding`` on every side (an H×W window of the padded image), then mirror left-right where
    ``flip[b]``. Vectorised: one pad and one advanced-indexing gather for the whole batch. Works
    for any dtype (zero = black for ``uint8``); the parameters are moved to the images' device."""
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = dy.to(dev).view(b, 1) + torch.arange(h, device=dev)          # (B, H)
    cols = dx.to(dev).view(b, 1) + torch.arange(w, device=dev)          # (B, W)
    cols = torch.where(flip.to(dev).view(b, 1), cols.flip(1), cols)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def random_crop_flip(images_uint8: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """CIFAR augmentation of a batch ``(B, C, H, W)``: a random H×W crop of the image zero-padded
    by ``padding`` on each side (as torchvision's ``RandomCrop(H, padding=padding)``), then a
    horizontal flip with probability 0.5 — per image, vectorised over the batch. The random numbers
    come from ``generator`` as documented in :func:`draw_crop_flip`; pass ``uint8`` images so the
    padding is black (pad before normalising)."""
    dy, dx, flip = draw_crop_flip(images_uint8.shape[0], generator, padding)
    return apply_crop_flip(images_uint8, dy, dx, flip, padding)


def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``float32`` ``(x/255 - mean) / std`` per channel for ``uint8`` images ``(B, C, H, W)``;
    float images are taken as already scaled: ``(x - mean) / std``."""
    c = images_uint8.shape[1]
    dev = images_uint8.device
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, c, 1, 1)
    x = images_uint8.to(torch.float32)
    if images_uint8.dtype == torch.uint8:
        x = x / 255.0
    return (x - m) / s


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator for epoch ``epoch`` of a loader seeded ``seed``: seeded from a hash of
    ``(seed, epoch)``, so epoch ``e``'s order and augmentation do not depend on earlier epochs."""
    digest = hashlib.sha256(f"fsg.data:{int(seed)}:{int(epoch)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class DataLoader:
    """Mini-batches ``(x, y)`` of an :class:`ImageDataset`: ``x`` ``float32`` ``(B, C, H, W)``
    normalised by the dataset's mean/std (:func:`normalize`), ``y`` ``int64`` ``(B,)``, both on
    ``device``.

    Training (``train=True``): each epoch's order is ``torch.randperm(N)`` from
    :func:`epoch_generator` ``(seed, epoch)``, and (if ``augment``, default ``train``) each batch
    then gets :func:`random_crop_flip` (pad 4) with random numbers drawn from the same generator,
    batch after batch, on the ``uint8`` images before normalisation. Evaluation: dataset order, no
    augmentation. ``drop_last`` drops a final short batch. ``len()`` is the number of batches.

    Position: the loader tracks ``epoch`` and ``batch`` (batches of that epoch already yielded).
    Iterating continues from there, and finishing an epoch moves to the next one, so ``for x, y
    in loader`` once per epoch just works; :meth:`set_epoch` selects an epoch explicitly (from its
    first batch, unless it is the current epoch, so a resumed position survives the customary
    ``set_epoch`` at the top of the loop). :meth:`state_dict` ``{"epoch", "batch", "seed"}`` saved
    mid-epoch and given to :meth:`load_state_dict` makes the next iteration yield exactly the
    remaining batches of that epoch, identical to an uninterrupted run (the skipped batches'
    random numbers are re-drawn and discarded).

    Sharding (``world_size > 1``, multi-process training): ``batch_size`` is the *global* batch;
    this loader yields rank ``rank``'s contiguous slice of each global batch
    (:func:`fsg.distributed.shard_bounds`). The order and the crop/flip numbers are drawn for the
    whole global batch exactly as in one process, so the union of the ranks' batches is the
    one-process batch, image for image. Training: a final global batch smaller than
    ``world_size`` is skipped by every rank (each rank must take part in every step); evaluation:
    a rank whose slice is empty skips that batch.

    Device-resident data (``resident``, default: ``device`` is not the CPU): the whole image and
    label tensors are moved to ``device`` once, at the first iteration (and again only if the
    dataset's tensors are replaced), and every batch is gathered, cropped, flipped and normalised
    there: per step only the batch's indices and its crop/flip numbers (a few hundred bytes) go
    to the device, not the images. The random numbers are still drawn from the CPU generator
    exactly as above, so a CUDA run sees the same batches and augmentations as a CPU run. On the
    CPU (``resident=False``) the batch is gathered from the CPU tensors as before.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, train: bool, seed: int = 0,
                 drop_last: bool = False, augment: Optional[bool] = None, device="cpu",
                 padding: int = 4, rank: int = 0, world_size: int = 1, resident: Optional[bool] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if train and batch_size < world_size:
            raise ValueError(f"batch size {batch_size} is smaller than the {world_size} processes: the batch size "
                             "is the global batch, split over the processes; raise it")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.augment = self.train if augment is None else bool(augment)
        self.device = torch.device(device)
        self.padding = int(padding)
        self.rank, self.world_size = int(rank), int(world_size)
        self.resident = self.device.type != "cpu" if resident is None else bool(resident)
        self._resident_cache: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None
        self.epoch = 0
        self.batch = 0

    def _device_tensors(self) -> Tuple[Tensor, Tensor]:
        """The dataset's images and labels on ``device``: moved once, then cached (moved again
        only when the dataset's tensors are replaced)."""
        ds, cache = self.dataset, self._resident_cache
        if cache is None or cache[0] is not ds.images or cache[1] is not ds.labels:
            self._resident_cache = None  # free the old copy before making the new one
            cache = (ds.images, ds.labels, ds.images.to(self.device), ds.labels.to(self.device))
            self._resident_cache = cache
        return cache[2], cache[3]

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _batch_sizes(self) -> List[int]:
        n, b = len(self.dataset), self.batch_size
        return [min(b, n - i) for i in range(0, len(self) * b, b)]

    def set_epoch(self, epoch: int) -> None:
        """Go to epoch ``epoch`` (from its first batch if it differs from the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        if self.batch >= len(self):  # the current epoch is used up: start the next one
            self.epoch, self.batch = self.epoch + 1, 0
        ds, n = self.dataset, len(self.dataset)
        sizes = self._batch_sizes()
        g = epoch_generator(self.seed, self.epoch) if (self.train or self.augment) else None
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        start = self.batch
        if self.augment:
            for k in range(start):  # replay the skipped batches' draws
                draw_crop_flip(sizes[k], g, self.padding)
        for k in range(start, len(sizes)):
            idx = order[k * self.batch_size: k * self.batch_size + sizes[k]]
            if self.augment:  # drawn for the whole global batch, as in one process
                dy, dx, flip = draw_crop_flip(sizes[k], g, self.padding)
            lo, hi = shard_bounds(sizes[k], self.rank, self.world_size)
            self.batch = k + 1
            if hi == lo or (self.train and sizes[k] < self.world_size):
                continue
            idx = idx[lo:hi]
            if self.resident:  # gather on the device: only indices and crop/flip numbers move
                images, labels = self._device_tensors()
                if self.augment:  # one small host-to-device copy for idx, dy, dx, flip
                    moved = torch.stack([idx, dy[lo:hi], dx[lo:hi], flip[lo:hi].long()]).to(self.device)
                    i, bdy, bdx, bflip = moved.unbind(0)
                    bflip = bflip.bool()
                else:
                    i = idx.to(self.device)
                x, y = images[i], labels[i]
                if self.augment:
                    x = apply_crop_flip(x, bdy, bdx, bflip, self.padding)
            else:
                x = ds.images[idx].to(self.device, non_blocking=True)
                y = ds.labels[idx].to(self.device, non_blocking=True)
                if self.augment:
                    x = apply_crop_flip(x, dy[lo:hi], dx[lo:hi], flip[lo:hi], self.padding)
            x = normalize(x, ds.mean, ds.std)
            yield x, y
        self.epoch, self.batch = self.epoch + 1, 0

    def __repr__(self) -> str:
        shard = f", rank={self.rank}, world_size={self.world_size}" if self.world_size > 1 else ""
        where = f", device={str(self.device)!r}" + (", resident=True" if self.resident else "") if (
            self.device.type != "cpu" or self.resident) else ""
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, train={self.train}, "
                f"augment={self.augment}, seed={self.seed}, epoch={self.epoch}, batch={self.batch}{shard}{where})")
