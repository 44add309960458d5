"""Binarize the conv and linear weights of any ``nn.Module`` in place.

Each selected layer's ``weight`` gets a :class:`BinaryWeight` parametrization
(``torch.nn.utils.parametrize``): the module keeps its class and its ``forward``; reading
``module.weight`` returns ``Ŵ = Q(A(W))`` computed from the latent parameter
``module.parametrizations.weight.original`` (``W``). A look-ahead weight is injected by passing a
different tensor for that parameter to ``torch.func.functional_call``.

While gradients are enabled, the parametrization records what the trainer needs from the
forward pass: the pre-quantized weight ``W̃`` (detached) and, through a tensor hook, the
gradient ``∂L/∂Ŵ`` at the binary weight when the loss is back-propagated.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fsg.quantizers import Quantizer, get_quantizer, sign_ste

__all__ = [
    "BinaryWeight",
    "BinaryLayer",
    "BinaryActivation",
    "binarize",
    "binarized_layers",
    "is_binarized",
]

_BINARIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class BinaryWeight(nn.Module):
    """Parametrization ``W ↦ Ŵ = Q(A(W))`` that also records ``W̃`` and ``∂L/∂Ŵ``.

    Attributes ``w_tilde`` and ``grad`` hold the pre-quantized weight and the gradient at the
    binary weight of the most recent forward *that was back-propagated* (``None`` until then):
    both are set together by a tensor hook on ``Ŵ``, so merely reading ``module.weight`` (for
    logging, say) changes nothing. Nothing is recorded when autograd is off.
    """

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.quantizer = quantizer
        self.w_tilde: Optional[Tensor] = None
        self.grad: Optional[Tensor] = None

    def forward(self, w: Tensor) -> Tensor:
        wt = self.quantizer.pre(w)
        wb = self.quantizer.quantize(wt)
        if torch.is_grad_enabled() and wb.requires_grad:
            wt = wt.detach()

            def capture(g: Tensor) -> None:
                self.w_tilde, self.grad = wt, g.detach()

            wb.register_hook(capture)
        return wb

    def extra_repr(self) -> str:
        return f"quantizer={self.quantizer!r}"


class BinaryActivation:
    """Forward pre-hook replacing a layer's input ``x`` by ``sign(x)`` (clipped STE:
    ``∂sign(x)/∂x := 1[|x| ≤ 1]``). On its first call it warns when ``x`` has no negative entry:
    ``sign`` of a non-negative input (a ReLU output) is ``+1`` everywhere and carries nothing."""

    def __init__(self, name: str = ""):
        self.name = name
        self.checked = False

    def __call__(self, module: nn.Module, args):
        x = args[0]
        if not self.checked:
            self.checked = True
            if x.numel() and not bool((x < 0).any()):
                warnings.warn(
                    f"the input of binarized layer {self.name or '<root>'!r} has no negative value, so its 1-bit "
                    "activation sign(x) is +1 everywhere (a ReLU before it?); use a nonlinearity that keeps the "
                    "sign, e.g. hardtanh (fsg's models: activation='hardtanh', the default with activations=True "
                    "in fsg train)", stacklevel=2)
        return (sign_ste(x),) + tuple(args[1:])


_BinaryActivation = BinaryActivation  # the old name, for models pickled with their hooks


@dataclass
class BinaryLayer:
    """A binarized layer of a model: its qualified name, module, and parameter names."""

    name: str
    module: nn.Module
    parametrization: BinaryWeight

    @property
    def weight_key(self) -> str:
        """Name of the latent weight ``W`` in ``model.named_parameters()``."""
        return f"{self.name}.parametrizations.weight.original" if self.name else "parametrizations.weight.original"

    @property
    def bias_key(self) -> Optional[str]:
        if getattr(self.module, "bias", None) is None:
            return None
        return f"{self.name}.bias" if self.name else "bias"

    @property
    def latent(self) -> nn.Parameter:
        return self.module.parametrizations.weight.original

    @property
    def quantizer(self) -> Quantizer:
        return self.parametrization.quantizer


def is_binarized(module: nn.Module) -> bool:
    """True when ``module.weight`` carries a :class:`BinaryWeight` parametrization."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, BinaryWeight) for p in module.parametrizations.weight
    )


def binarized_layers(model: nn.Module) -> List[BinaryLayer]:
    """The binarized layers of ``model`` in module-registration order."""
    out = []
    for name, m in model.named_modules():
        if is_binarized(m):
            p = next(p for p in m.parametrizations.weight if isinstance(p, BinaryWeight))
            out.append(BinaryLayer(name, m, p))
    return out


def binarize(
    model: nn.Module,
    quantizer: Union[str, Quantizer] = "dorefa",
    *,
    bits: Optional[int] = None,
    keep_first: bool = False,
    keep_last: bool = False,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    activations: bool = False,
    binarize_first_input: bool = False,
    **quantizer_options: Any,
) -> nn.Module:
    """Binarize the weights of ``model``'s conv and linear layers, in place; returns ``model``.

    Args:
        quantizer: ``"dorefa"``, ``"bwn"``, ``"sign"`` (any name of
            :data:`fsg.quantizers.QUANTIZERS`) or a :class:`Quantizer`.
        bits: bits of the quantizer (default 1 = binary; only ``dorefa`` takes more).
        **quantizer_options: further options of a quantizer named by string, passed to its
            constructor with ``bits`` (:func:`fsg.quantizers.get_quantizer`).
        keep_first / keep_last: keep the first / last conv-or-linear layer (in registration
            order) in full precision. The paper binarizes every layer (both ``False``).
        include: glob patterns of qualified module names to binarize (default: all).
        exclude: glob patterns of qualified module names to keep in full precision.
        activations: also binarize the *inputs* of the binarized layers with ``sign`` and a
            clipped STE (1W1A); the input of the model's first conv-or-linear layer (the image) is
            left alone unless ``binarize_first_input``. ``sign`` of a ReLU output is constant: build
            the model with a sign-keeping nonlinearity (fsg's models: ``activation="hardtanh"``).

    Raises:
        ValueError: when nothing would be binarized, a layer is already binarized, or the
            quantizer does not take an option given (or options come with a :class:`Quantizer`
            instance).
    """
    options = dict(quantizer_options) if bits is None else {"bits": bits, **quantizer_options}
    q = get_quantizer(quantizer, **options)
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, _BINARIZABLE)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no Conv or Linear layer to binarize; fsg binarizes "
            "nn.Conv1d/2d/3d and nn.Linear weights"
        )
    selected = list(candidates)
    if keep_first:
        selected = [c for c in selected if c is not candidates[0]]
    if keep_last:
        selected = [c for c in selected if c is not candidates[-1]]
    if include is not None:
        selected = [c for c in selected if any(fnmatch.fnmatchcase(c[0], p) for p in include)]
    if exclude:
        selected = [c for c in selected if not any(fnmatch.fnmatchcase(c[0], p) for p in exclude)]
    if not selected:
        raise ValueError(
            "no layer left to binarize after keep_first/keep_last/include/exclude; "
            f"candidates were: {', '.join(n or '<root>' for n, _ in candidates)}"
        )
    for name, m in selected:
        if is_binarized(m):
            raise ValueError(f"layer {name or '<root>'!r} is already binarized")
    first = candidates[0][1]
    for name, m in selected:
        parametrize.register_parametrization(m, "weight", BinaryWeight(q), unsafe=True)
        if activations and (m is not first or binarize_first_input):
            m.register_forward_pre_hook(BinaryActivation(name))
    return model
