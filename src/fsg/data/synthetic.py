"""A built-in synthetic image-classification task (no download), for demos and tests.

Each class ``k`` has a fixed random prototype image ``P_k`` (smooth noise, seeded). A sample of
class ``k`` is ``a·roll(P_k, (dy, dx)) + σ·ε`` with a random contrast ``a ∈ [0.5, 1.5]``, a
random circular shift ``|dy|, |dx| ≤ max_shift`` and Gaussian noise ``ε``. Small convnets learn
it to high accuracy in a few hundred steps; a linear model does not (the shifts break it).
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SyntheticImages", "make_synthetic", "batches"]


class SyntheticImages:
    """The synthetic task as an in-memory dataset: ``x`` (N, C, H, W) float, ``y`` (N,) long."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int):
        self.x, self.y, self.num_classes = x, y, num_classes

    def __len__(self) -> int:
        return len(self.y)


def _prototypes(num_classes: int, channels: int, size: int, g: torch.Generator) -> Tensor:
    coarse = torch.randn(num_classes, channels, size // 4, size // 4, generator=g)
    p = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (p - p.mean((1, 2, 3), keepdim=True)) / p.std((1, 2, 3), keepdim=True)


def make_synthetic(n_train: int = 4096, n_test: int = 1024, num_classes: int = 10, channels: int = 1,
                   size: int = 16, noise: float = 0.8, max_shift: int = 3, seed: int = 0
                   ) -> Tuple[SyntheticImages, SyntheticImages]:
    """Train and test splits of the synthetic task (same prototypes, independent samples)."""
    if n_train < 1 or n_test < 1 or num_classes < 2 or size < 4:
        raise ValueError("make_synthetic needs n_train, n_test >= 1, num_classes >= 2 and size >= 4")
    g = torch.Generator().manual_seed(seed)
    protos = _prototypes(num_classes, channels, size, g)

    def sample(n: int) -> SyntheticImages:
        y = torch.randint(num_classes, (n,), generator=g)
        x = protos[y]
        shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)
        x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
        a = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
        x = a * x + noise * torch.randn(x.shape, generator=g)
        return SyntheticImages(x, y, num_classes)

    return sample(n_train), sample(n_test)


def batches(data: SyntheticImages, batch_size: int, shuffle: bool = True,
            generator: torch.Generator = None) -> Iterator[Tuple[Tensor, Tensor]]:
    """One epoch of ``(x, y)`` mini-batches."""
    idx = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for i in range(0, len(data), batch_size):
        j = idx[i:i + batch_size]
        yield data.x[j], data.y[j]
