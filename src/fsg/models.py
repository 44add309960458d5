"""Models: the CIFAR ResNets of the paper (METHOD.md §6) and small nets for demos and tests.

All are plain ``nn.Module``\\ s; :func:`fsg.binarize` turns them into BNNs.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

__all__ = ["SmallCNN", "MLP", "BasicBlock", "CifarResNet", "resnet", "MODELS", "get_model"]


class SmallCNN(nn.Module):
    """A small CNN for tiny images: ``[conv3×3-BN-ReLU-maxpool] × 2``, global average pool,
    linear classifier. Used by ``fsg demo`` and the tests."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    """Fully connected net ``in → hidden → … → out`` with ReLU; flattens its input."""

    def __init__(self, in_features: int, hidden: List[int], out_features: int):
        super().__init__()
        dims = [in_features] + list(hidden) + [out_features]
        layers: List[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; 1×1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + sc)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: conv3×3(3→16)-BN-ReLU, three stages of ``n`` basic blocks
    (16, 32, 64 channels, stride 1, 2, 2), global average pool, BatchNorm1d(64), linear.

    Parameter names match the pre-trained checkpoints in ``shared/pretrained`` (which lack the
    ``bn_fc`` BatchNorm1d entry; it starts fresh)."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, width, stride))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn_fc = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.bn_fc(x.mean((2, 3))))


def resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet of the given depth (6n+2)."""
    return CifarResNet(depth, num_classes)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "small-cnn": SmallCNN,
    **{f"resnet{d}": (lambda d=d: lambda num_classes=10, **_: CifarResNet(d, num_classes))() for d in (20, 32, 44, 56, 110)},
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: ``small-cnn``, ``resnet20/32/44/56/110``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
