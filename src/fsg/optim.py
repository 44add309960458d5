"""The base optimizer ``π`` and the direction it applied (METHOD.md §3 step 5, §4).

Every base optimizer updates a parameter as ``p ← p − η·d`` with a *direction* ``d`` built from
the gradient ``g`` and the optimizer's state:

====================  ==========================================================================
``sgd``               ``d = g + λ·p``                                   (λ: weight decay, 0 by default)
``sgdm``              ``b ← μ·b + (g + λ·p)`` (``b = g + λ·p`` at the first step), ``d = b``
                      (μ = 0.9, λ = 5e-4 unless given; Nesterov: ``d = g + λ·p + μ·b``)
``adam``              ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
                      ``d = m̂ / (√v̂ + ε)`` with ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)`` (torch's Adam)
``adam`` (reference)  ``d = √(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)`` — MetaQuant's ``meta_utils/adam.py``:
                      ε is added *before* the bias correction, i.e. an effective ε of
                      ``ε/√(1−β₂ᵗ)`` (≈ 3.2e-7 at t = 1 for ε = 1e-8, → ε as t grows)
====================  ==========================================================================

MetaQuant's look-ahead (spec §4) moves the weights along the *previous refined* direction,
``W − η·d_prev``, and every layer's bias along ``b − η·d_prev(b)``: what the optimizer actually
applied, not the raw gradient it was given. (The reference's optimizers write ``d`` back into
``.grad``; ``torch.optim`` leaves the raw gradient there.) :func:`step_with_directions` steps
the optimizer and returns ``d`` for every updated parameter, for ``torch.optim.SGD``,
``torch.optim.Adam`` and :class:`ReferenceAdam`; with plain SGD and no weight decay ``d`` *is*
the gradient tensor (bit for bit the previous behaviour).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "ADAM_VARIANTS", "make_optimizer", "ReferenceAdam", "step_with_directions"]

OPTIMIZERS = ("sgd", "sgdm", "adam")
ADAM_VARIANTS = ("torch", "reference")


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: Optional[float] = None,
                   adam_variant: str = "torch"):
    """The base optimizer ``π``: ``"sgd"`` (plain), ``"sgdm"`` (momentum 0.9, weight decay 5e-4
    unless given) or ``"adam"`` (β = (0.9, 0.999), ε = 1e-8, no weight decay unless given).
    ``adam_variant``: ``"torch"`` (``torch.optim.Adam``, the spec's ``m̂/(√v̂ + ε)``) or
    ``"reference"`` (:class:`ReferenceAdam`, MetaQuant's arithmetic); only for ``"adam"``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if adam_variant not in ADAM_VARIANTS:
        raise ValueError(f"unknown Adam variant {adam_variant!r}: choose one of {', '.join(ADAM_VARIANTS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay or 0.0)
    if name == "sgdm":
        wd = 5e-4 if weight_decay is None else weight_decay
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    if adam_variant == "reference":
        return ReferenceAdam(params, lr=lr, eps=1e-8, weight_decay=weight_decay or 0.0)
    return torch.optim.Adam(params, lr=lr, eps=1e-8, weight_decay=weight_decay or 0.0)


class ReferenceAdam(torch.optim.Optimizer):
    """Adam as MetaQuant's reference code computes it (``meta_utils/adam.py``)::

        g ← g + λ·p;   m ← β₁·m + (1−β₁)·g;   v ← β₂·v + (1−β₂)·g²
        d = √(1−β₂ᵗ) / (1−β₁ᵗ) · m / (√v + ε);   p ← p − η·d

    Algebraically ``d = m̂ / (√v̂ + ε/√(1−β₂ᵗ))``: torch's Adam with a larger ε in early steps.
    The applied direction is kept in ``state["direction"]`` (see :func:`step_with_directions`).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not lr > 0 or not eps >= 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid ReferenceAdam settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                t = state["step"]
                scale = math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                d = (m / v.sqrt().add_(group["eps"])).mul_(scale)
                state["direction"] = d
                p.add_(d, alpha=-group["lr"])
        return loss


def _sgd_pre(optimizer: torch.optim.SGD) -> Dict[Tensor, Tensor]:
    """What torch's SGD adds to the momentum buffer (``g + λ·p``), for the cases whose applied
    direction cannot be read from the state after the step (no momentum, or Nesterov)."""
    pre = {}
    for group in optimizer.param_groups:
        wd, mom = group["weight_decay"], group["momentum"]
        if group.get("maximize"):
            raise ValueError("the look-ahead needs the applied direction: SGD(maximize=True) is not supported")
        for p in group["params"]:
            if p.grad is not None and (mom == 0 or group["nesterov"]):
                pre[p] = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
    return pre


def _sgd_post(optimizer: torch.optim.SGD, pre: Dict[Tensor, Tensor]) -> Dict[Tensor, Tensor]:
    out = {}
    for group in optimizer.param_groups:
        mom = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if mom == 0:
                out[p] = pre[p]
            elif group["nesterov"]:
                out[p] = pre[p].add(optimizer.state[p]["momentum_buffer"], alpha=mom)
            else:
                out[p] = optimizer.state[p]["momentum_buffer"]
    return out


def _adam_post(optimizer: torch.optim.Adam) -> Dict[Tensor, Tensor]:
    out = {}
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("the look-ahead needs the applied direction: Adam(amsgrad/maximize) is not supported")
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = optimizer.state[p]
            t = float(st["step"])
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
            out[p] = (st["exp_avg"] / (1 - beta1 ** t)).div_(denom)
    return out


_warned: set = set()


def step_with_directions(optimizer: torch.optim.Optimizer) -> Dict[Tensor, Tensor]:
    """``optimizer.step()``, returning ``{parameter: d}`` with the direction ``d`` of each
    parameter's update ``p ← p − η·d`` (see the module docstring). Supported: ``torch.optim.SGD``
    (any momentum, weight decay, Nesterov), ``torch.optim.Adam`` (not AdamW, amsgrad or maximize)
    and :class:`ReferenceAdam`. For any other optimizer the gradient stands in for ``d`` (a
    warning, once per optimizer class)."""
    if type(optimizer) is torch.optim.SGD:
        pre = _sgd_pre(optimizer)
        optimizer.step()
        return _sgd_post(optimizer, pre)
    if type(optimizer) is torch.optim.Adam:
        optimizer.step()
        return _adam_post(optimizer)
    if isinstance(optimizer, ReferenceAdam):
        optimizer.step()
        return {p: optimizer.state[p]["direction"] for g in optimizer.param_groups for p in g["params"]
                if p.grad is not None}
    name = type(optimizer).__name__
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"fsg: cannot read the direction {name} applies; the look-ahead uses the raw gradient "
                      "instead (use 'sgd', 'sgdm' or 'adam' for the spec's look-ahead)", stacklevel=2)
    grads = {p: p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
    optimizer.step()
    return grads

