"""Models: the CIFAR ResNets of the paper (METHOD.md §6) and small nets for demos and tests.

All are plain ``nn.Module``\\ s; :func:`fsg.binarize` turns them into BNNs.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["SmallCNN", "MLP", "BasicBlock", "CifarResNet", "resnet", "MODELS", "get_model", "load_pretrained",
           "PretrainedError", "ACTIVATIONS", "model_spec", "arch_spec", "short_list", "mismatch"]

#: Hidden-layer nonlinearities of the built-in models. ``relu`` is the paper's. With 1-bit
#: activations (``fsg.binarize(..., activations=True)``) a binarized layer sees ``sign(input)``,
#: and after a ReLU that is ``+1`` everywhere: such models need ``hardtanh`` (as IR-Net's 1W1A
#: CIFAR ResNets), which keeps the sign of the BatchNorm output.
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "hardtanh": torch.nn.functional.hardtanh}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SmallCNN(nn.Module):
    """A small CNN for tiny images: ``[conv3×3-BN-ReLU-maxpool] × 2``, global average pool,
    linear classifier. Used by ``fsg demo`` and the tests. ``activation``: see :data:`ACTIVATIONS`;
    with ``hardtanh`` a BatchNorm1d (``bn_fc``) precedes the classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, activation: str = "relu"):
        super().__init__()
        self.activation = activation
        self._act = _activation(activation)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        # with hardtanh (1-bit activations) the pooled features are mostly positive: normalise them
        # so that sign() of the classifier's input is not constant (the ResNets' bn_fc)
        self.bn_fc = nn.BatchNorm1d(2 * width) if activation == "hardtanh" else None
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self._act(self.bn1(self.conv1(x))))
        x = self.pool(self._act(self.bn2(self.conv2(x)))).mean((2, 3))
        return self.fc(x if self.bn_fc is None else self.bn_fc(x))


class MLP(nn.Module):
    """Fully connected net ``in → hidden → … → out`` with ReLU (or ``activation="hardtanh"``);
    flattens its input."""

    def __init__(self, in_features: int, hidden: List[int], out_features: int, activation: str = "relu"):
        super().__init__()
        _activation(activation)
        self.activation = activation
        dims = [in_features] + list(hidden) + [out_features]
        layers: List[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU() if activation == "relu" else nn.Hardtanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; 1×1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self._act = _activation(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self._act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return self._act(out + sc)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: conv3×3(3→16)-BN-ReLU, three stages of ``n`` basic blocks
    (16, 32, 64 channels, stride 1, 2, 2), global average pool, BatchNorm1d(64), linear.

    Parameter names match the pre-trained checkpoints in ``shared/pretrained`` (which lack the
    ``bn_fc`` BatchNorm1d entry; it starts fresh). ``activation``: ``relu`` (the paper's) or
    ``hardtanh`` (for 1-bit activations, see :data:`ACTIVATIONS`). ``classifier_bn``: the
    BatchNorm1d before the classifier, as in the FSG code's network (default); ``False`` gives
    MetaQuant's own ResNet (pool → linear), for comparisons with its tables."""

    def __init__(self, depth: int = 20, num_classes: int = 10, activation: str = "relu", classifier_bn: bool = True):
        super().__init__()
        self.activation = activation
        self.classifier_bn = bool(classifier_bn)
        self._act = _activation(activation)
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
                blocks.append(BasicBlock(planes, width, stride, activation))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn_fc = nn.BatchNorm1d(64) if classifier_bn else None
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self._act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = x.mean((2, 3))
        return self.fc(x if self.bn_fc is None else self.bn_fc(x))


def resnet(depth: int = 20, num_classes: int = 10, activation: str = "relu", classifier_bn: bool = True) -> CifarResNet:
    """CIFAR ResNet of the given depth (6n+2)."""
    return CifarResNet(depth, num_classes, activation, classifier_bn)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "small-cnn": SmallCNN,
    **{f"resnet{d}": (lambda d=d: lambda num_classes=10, activation="relu", classifier_bn=True, **_:
                      CifarResNet(d, num_classes, activation, classifier_bn))()
       for d in (20, 32, 44, 56, 110)},
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: ``small-cnn``, ``resnet20/32/44/56/110``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


# ----------------------------------------------------------------------------------------------
# architecture specs: how to rebuild a model (stored in checkpoints and exported files)


def arch_spec(name: str, activation: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """The architecture spec ``{"name": name, "kwargs": {...}}`` for :func:`get_model`.
    ``activation`` is recorded only when it is not the default ``"relu"`` (``hardtanh`` for 1W1A
    models), so that specs of ReLU models stay loadable by an fsg that predates the option."""
    spec: Dict[str, Any] = {"name": name, "kwargs": dict(kwargs)}
    if isinstance(activation, str) and activation != "relu":
        spec["kwargs"]["activation"] = activation
    return spec


def model_spec(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"name", "kwargs"}`` such that ``get_model(name, **kwargs)`` rebuilds the architecture of
    ``model`` (binarized or not), for fsg's built-in models (:class:`SmallCNN`, the CIFAR ResNets
    of :data:`MODELS`); ``None`` otherwise."""
    activation = getattr(model, "activation", None)
    if type(model) is SmallCNN:
        return arch_spec("small-cnn", activation, in_channels=int(model.conv1.in_channels),
                         num_classes=int(model.fc.out_features), width=int(model.conv1.out_channels))
    if type(model) is CifarResNet and f"resnet{int(model.depth)}" in MODELS:
        kwargs: Dict[str, Any] = {"num_classes": int(model.fc.out_features)}
        if not model.classifier_bn:  # recorded only when off: specs stay loadable by older fsg versions
            kwargs["classifier_bn"] = False
        return arch_spec(f"resnet{int(model.depth)}", activation, **kwargs)
    return None


# ----------------------------------------------------------------------------------------------
# pre-trained full-precision weights

_PARAMETRIZED = ".parametrizations.weight.original"


class PretrainedError(ValueError):
    """Pre-trained weights that cannot be loaded into the model (one-line message)."""


def short_list(keys: Sequence[str], limit: int = 6) -> str:
    """``keys`` joined by commas for a one-line message: the first ``limit``, then ``(+N more)``."""
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def mismatch(missing: Sequence[str], unexpected: Sequence[str], shape_bad: Sequence[str]) -> str:
    """How a state dict fails to fit a model, in one line ("missing a, b; unexpected c; shape
    mismatch d (file …, model …)"); empty when it fits."""
    problems = []
    if missing:
        problems.append(f"missing {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {short_list(unexpected)}")
    if shape_bad:
        problems.append(f"shape mismatch {short_list(shape_bad, 4)}")
    return "; ".join(problems)


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike],
                    optional: Sequence[str] = ("bn_fc.",)) -> List[str]:
    """Load a full-precision ``state_dict`` file into ``model`` (in place); returns the keys of
    ``model`` that the file lacked and that therefore keep their fresh initialisation.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``; it may be a
    plain ``state_dict`` or a dict wrapping one under ``"state_dict"`` or ``"model"``, and a
    ``"module."`` prefix (``nn.DataParallel``) is stripped. Keys of ``model`` under one of the
    prefixes in ``optional`` may be missing from the file (the CIFAR ResNet's ``bn_fc``, the
    BatchNorm1d before the classifier, is absent from the papers' pre-trained networks); every
    other key must be present with the same shape, and the file may hold no other key — else a
    :class:`PretrainedError` (a ``ValueError``) lists the offending keys, and ``model`` is left
    unchanged.

    ``model`` may already be binarized: a file key ``X.weight`` then fills the latent weight
    ``X.parametrizations.weight.original``.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise PretrainedError(f"pre-trained weights not found: {p!r}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        reason = " ".join(str(e).split())
        if "weights_only" in reason or "Weights only load failed" in reason:
            reason = "it holds Python objects other than tensors (refusing to unpickle them)"
        elif len(reason) > 100:
            reason = reason[:97] + "..."
        raise PretrainedError(f"cannot read pre-trained weights {p!r}: {type(e).__name__}: {reason}") from None
    if isinstance(sd, dict) and sd.get("format") == "fsg-checkpoint":
        raise PretrainedError(
            f"{p!r} is an fsg training checkpoint, not a state_dict: use the model.pt written by 'fsg pretrain'"
        )
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict) and not any(
            isinstance(v, torch.Tensor) for v in sd.values()
        ):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedError(f"{p!r} is not a state_dict (expected a dict of tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}

    own = model.state_dict()
    # canonical (unparametrized) name -> the model's key
    canon = {(k[: -len(_PARAMETRIZED)] + ".weight" if k.endswith(_PARAMETRIZED) else k): k for k in own}
    unexpected = sorted(k for k in sd if k not in canon)
    missing = [c for c in canon if c not in sd]
    required_missing = [c for c in missing if not any(c.startswith(o) for o in optional)]
    shape_bad = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[canon[k]].shape)})"
        for k in sd if k in canon and sd[k].shape != own[canon[k]].shape
    ]
    problems = mismatch(required_missing, unexpected, shape_bad)
    if problems:
        raise PretrainedError(f"pre-trained weights {p!r} do not fit {type(model).__name__}: {problems}")
    result = model.load_state_dict({canon[k]: v for k, v in sd.items()}, strict=False)
    assert not result.unexpected_keys
    return [canon[c] for c in missing]
