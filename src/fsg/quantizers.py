"""Forward quantizers for 1-bit (and k-bit) weights, with straight-through backward.

Notation (METHOD.md §2): ``W`` is the latent full-precision weight, ``W̃ = A(W)`` the
pre-quantized weight and ``Ŵ = Q(W̃)`` the binary weight used in the forward pass.

==========  ==========================================  ==================================  =====================
name        ``A(W)``                                    ``Q(W̃)``                           calibration ``c(W)``
==========  ==========================================  ==================================  =====================
``dorefa``  ``tanh(W) / (2·max|tanh W|) + 1/2``         ``2·round((2^k−1)·W̃)/(2^k−1) − 1``  ``(1 − tanh²W)/max|tanh W|``
``bwn``     ``W``                                       ``s·sign(W̃)``, ``s = mean|W|``      ``1``
``sign``    ``W``                                       ``sign(W̃)``                        ``1``
==========  ==========================================  ==================================  =====================

``sign(0) = +1``, so a binary weight is always exactly ``±s``. The max in ``A`` and the scale
``s`` are constants in the backward pass. The rounding / sign is replaced in the backward pass
by the clipped identity (straight-through estimator): the incoming gradient passes where
``|input| ≤ 1`` and is zeroed elsewhere. The affine ``2·(·) − 1`` of dorefa is differentiated
normally, so for dorefa the STE gradient w.r.t. ``W`` is exactly ``c(W) ⊙ ∂L/∂Ŵ``.

The calibration ``c`` maps a gradient w.r.t. ``W̃`` produced by a hypernetwork to one w.r.t.
``W``; for dorefa it is twice the exact derivative ``dW̃/dW`` (as in the reference code, so that
learning rates transfer).
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Tuple, Type

import torch
from torch import Tensor

__all__ = [
    "Quantizer",
    "DoReFa",
    "BWN",
    "Sign",
    "QUANTIZERS",
    "get_quantizer",
    "register_quantizer",
    "quantizer_options",
    "sign_ste",
    "round_ste",
    "binary_sign",
]


def binary_sign(x: Tensor) -> Tensor:
    """``sign`` with ``sign(0) = +1``: the result is exactly ``±1`` everywhere."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignSTE(torch.autograd.Function):
    """``y = sign(x)`` (with sign(0)=+1); backward ``∂x = ∂y · 1[|x| ≤ 1]``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _RoundSTE(torch.autograd.Function):
    """``y = round(n·x)/n``; backward ``∂x = ∂y · 1[|x| ≤ 1]``."""

    @staticmethod
    def forward(ctx, x: Tensor, levels: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.round(x * levels) / levels

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype), None


def sign_ste(x: Tensor) -> Tensor:
    """Binary sign (``sign(0)=+1``) with the clipped straight-through backward."""
    return _SignSTE.apply(x)


def round_ste(x: Tensor, levels: int) -> Tensor:
    """``round(levels·x)/levels`` with the clipped straight-through backward."""
    return _RoundSTE.apply(x, levels)


QUANTIZERS: Dict[str, Type["Quantizer"]] = {}


def register_quantizer(name: str) -> Callable[[Type["Quantizer"]], Type["Quantizer"]]:
    """Class decorator adding a :class:`Quantizer` subclass to the registry under ``name`` (as
    :func:`fsg.estimators.register_estimator` does for estimators). The constructor's keyword
    arguments are the quantizer's options (:func:`get_quantizer`)."""

    def deco(cls: Type[Quantizer]) -> Type[Quantizer]:
        QUANTIZERS[name] = cls
        cls.name = name
        return cls

    return deco


class Quantizer:
    """A weight quantizer: ``Ŵ = Q(A(W))`` plus the calibration ``c(W)``.

    Subclasses implement :meth:`pre` (``A``), :meth:`quantize` (``Q``, with an STE backward) and
    :meth:`calibration`. Instances are stateless and cheap. The base constructor takes the one
    option every quantizer understands, ``bits``, and accepts only ``1`` (a 1-bit quantizer);
    k-bit quantizers override it.
    """

    name: str = ""
    bits: int = 1

    def __init__(self, bits: int = 1):
        if not isinstance(bits, int) or isinstance(bits, bool) or bits != 1:
            raise ValueError(f"quantizer {self.name or type(self).__name__!r} is 1-bit only; bits={bits!r} needs 'dorefa'")

    def pre(self, w: Tensor) -> Tensor:
        """``W̃ = A(W)``, differentiable."""
        return w

    def quantize(self, wt: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``Ŵ = Q(W̃)`` with a straight-through backward."""
        raise NotImplementedError

    def calibration(self, w: Tensor) -> Tensor:
        """``c(W)``, the factor mapping a gradient w.r.t. ``W̃`` to one w.r.t. ``W``."""
        return torch.ones_like(w)

    def scale(self, w: Tensor) -> Tensor:
        """The magnitude ``s`` of the binary weights of ``w`` (``Ŵ ∈ {−s, +s}``)."""
        return torch.ones((), dtype=w.dtype, device=w.device)

    def __call__(self, w: Tensor) -> Tensor:
        return self.quantize(self.pre(w))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register_quantizer("dorefa")
class DoReFa(Quantizer):
    """DoReFa-Net weight quantizer with ``bits`` bits (1 in the paper's experiments).

    ``W̃ = tanh(W)/(2·max|tanh W|) + 1/2 ∈ [0, 1]`` (max detached),
    ``Ŵ = 2·round((2^k−1)·W̃)/(2^k−1) − 1`` (``{−1, +1}`` for ``k = 1``),
    ``c(W) = (1 − tanh²W)/max|tanh W|``.
    """

    def __init__(self, bits: int = 1):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise ValueError(f"dorefa bits must be an integer in 1..16, got {bits!r}")
        self.bits = bits
        self.levels = 2**bits - 1

    @staticmethod
    def _max_tanh(t: Tensor) -> Tensor:
        # Constant in the backward pass; guard against an all-zero weight tensor.
        return t.detach().abs().max().clamp_min(torch.finfo(t.dtype).tiny)

    def pre(self, w: Tensor) -> Tensor:
        t = torch.tanh(w)
        return t / (2 * self._max_tanh(t)) + 0.5

    def quantize(self, wt: Tensor) -> Tensor:
        return 2 * round_ste(wt, self.levels) - 1

    def calibration(self, w: Tensor) -> Tensor:
        t = torch.tanh(w.detach())
        return (1 - t * t) / self._max_tanh(t)

    def __repr__(self) -> str:
        return f"DoReFa(bits={self.bits})"


@register_quantizer("bwn")
class BWN(Quantizer):
    """Binary-weight-network quantizer: ``Ŵ = s·sign(W)``, ``s = mean|W|``.

    Backward: ``∂L/∂W = ∂L/∂Ŵ · 1[|W| ≤ 1]`` (``s`` is a constant, and the STE passes the
    gradient unscaled, so that ``c(W) = 1``)."""

    def quantize(self, wt: Tensor) -> Tensor:
        # forward s·sign(W̃); backward the clipped identity, *not* scaled by s (s is a constant
        # of the binarizer, which the STE replaces by the identity)
        b = sign_ste(wt)
        return (self.scale(wt) * b).detach() + (b - b.detach())  # value exactly s·sign(W̃)

    def scale(self, w: Tensor) -> Tensor:
        return w.detach().abs().mean()


@register_quantizer("sign")
class Sign(Quantizer):
    """Plain ``sign(W)`` (the FSG reference code's BWN without the scale)."""

    def quantize(self, wt: Tensor) -> Tensor:
        return sign_ste(wt)


def quantizer_options(cls: Type[Quantizer]) -> Tuple[str, ...]:
    """The option names a registered quantizer class takes (its constructor's parameters)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def get_quantizer(name, **options) -> Quantizer:
    """Build a quantizer from its registered name (``"dorefa"``, ``"bwn"``, ``"sign"``) and its
    options (``bits=...``), every option passed to its constructor. An option the quantizer does
    not take raises ``ValueError`` (one line), as do ``bits != 1`` for a 1-bit quantizer and an
    unknown name. A :class:`Quantizer` instance is returned unchanged (then no option may be given).
    """
    if isinstance(name, Quantizer):
        if options:
            raise ValueError(f"quantizer options {', '.join(sorted(options))} given with a {type(name).__name__} "
                             "instance: pass the options to its constructor instead")
        return name
    if name not in QUANTIZERS:
        raise ValueError(
            f"unknown quantizer {name!r}: choose one of {', '.join(sorted(QUANTIZERS))}"
        )
    cls = QUANTIZERS[name]
    known = quantizer_options(cls)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ValueError(f"quantizer {name!r} has no option {', '.join(map(repr, unknown))}"
                         f" (its options: {', '.join(known) or 'none'})")
    return cls(**options)
