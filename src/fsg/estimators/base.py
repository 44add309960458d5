"""The estimator interface (:class:`Estimator`, :class:`LayerContext`), the registry and the
argument checks the estimators share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn


__all__ = ["LayerContext", "Estimator", "ESTIMATORS", "register_estimator", "get_estimator", "STATE_DTYPES"]


@dataclass
class LayerContext:
    """What the trainer knows about binarized layer ``index`` at the start of step ``t``.

    ``grad`` and ``w_tilde`` come from step ``t−1``'s forward/backward (``g⁽ᵗ⁻¹⁾ = ∂L/∂Ŵ`` and
    ``W̃⁽ᵗ⁻¹⁾``); ``weight`` is the current latent ``W``; ``calibration`` is ``c(W)``;
    ``prev_update`` is ``W.grad`` left by step ``t−1`` (the refined gradient, or the STE gradient
    after the observe step).
    """

    index: int
    name: str
    weight: Tensor
    grad: Tensor
    w_tilde: Tensor
    calibration: Tensor
    prev_update: Optional[Tensor]


class Estimator(nn.Module):
    """Base class. Subclasses set :attr:`lookahead` and implement :meth:`directions`.

    ``lookahead = True`` (every hypernetwork method): step 0 only observes; each later step
    computes directions from the previous step's gradient, forwards at ``W − η·D`` and updates
    with ``U``. ``lookahead = False``: the trainer forwards at ``W``; after the backward it calls
    :meth:`directions` with the *current* gradient and uses ``U`` (a fixed estimator needs no
    look-ahead). ``natural_gradient = True`` keeps autograd's STE gradient as ``W.grad``.
    """

    lookahead: bool = True
    natural_gradient: bool = False

    def setup(self, layer_names: Sequence[str], layer_shapes: Sequence[torch.Size]) -> None:
        """Called once by the trainer with the binarized layers (in order)."""
        self.layer_names = list(layer_names)
        self.layer_shapes = [torch.Size(s) for s in layer_shapes]

    def directions(self, ctx: LayerContext) -> Tuple[Tensor, Tensor]:  # pragma: no cover
        """Return ``(D, U)`` for one layer; see the module docstring."""
        raise NotImplementedError

    def observe(self, index: int, grad: Tensor, w_tilde: Tensor) -> None:
        """Called after every backward with the new ``∂L/∂Ŵ`` and ``W̃`` of layer ``index``."""

    def meta_param_groups(self) -> List[dict]:
        """Hypernetwork parameter groups, one Adam each: ``[{"name", "params", "lr"}, ...]``."""
        return []


ESTIMATORS: Dict[str, Type[Estimator]] = {}


def register_estimator(name: str) -> Callable[[Type[Estimator]], Type[Estimator]]:
    """Class decorator adding an :class:`Estimator` subclass to the registry under ``name``."""

    def deco(cls: Type[Estimator]) -> Type[Estimator]:
        ESTIMATORS[name] = cls
        cls.registered_name = name
        return cls

    return deco


def get_estimator(name, **kwargs) -> Estimator:
    """Build an estimator from its registered name; an :class:`Estimator` is returned as is."""
    if isinstance(name, Estimator):
        return name
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}: choose one of {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name](**kwargs)


def check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


#: FSG's ``state_dtype`` names.
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_lr(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
