"""The training step of every estimator (METHOD.md §3), in one place.

Step 0 (hypernetwork estimators): *observe* — forward at ``W``, backward, record ``g⁽⁰⁾`` and
``W̃⁽⁰⁾``; no weight update (as in the reference code, unless ``update_on_observe``).

Step ``t ≥ 1``::

    1. meta-gradient    D_l, U_l = estimator.directions(g⁽ᵗ⁻¹⁾, W̃⁽ᵗ⁻¹⁾, W, c(W), W.grad_prev)
    2. look-ahead       W_meta = W − η_t·D_l,   b_meta = b − η_t·b.grad_prev
                        out = functional_call(model, {W: W_meta, b: b_meta}, x)
    3. backward         loss.backward()  →  hypernetwork grads, new g⁽ᵗ⁾ (hook at Ŵ), BN/bias grads
    4. meta step        one Adam per hypernetwork group
    5. weight update    W.grad ← U_l;  base optimizer π ∈ {SGD, SGD-M, Adam} steps every parameter

STE (and any estimator with ``lookahead = False``) is plain training: forward at ``W``,
backward, optional replacement of ``W.grad`` by ``U_l``, optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .binarize import BinaryLayer, binarized_layers
from .estimators import Estimator, LayerContext, get_estimator

__all__ = ["Trainer", "StepResult", "make_optimizer", "evaluate", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "sgdm", "adam")


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: Optional[float] = None):
    """The base optimizer ``π``: ``"sgd"`` (plain), ``"sgdm"`` (momentum 0.9, weight decay 5e-4
    unless given) or ``"adam"`` (β = (0.9, 0.999), ε = 1e-8, no weight decay unless given)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay or 0.0)
    if name == "sgdm":
        wd = 5e-4 if weight_decay is None else weight_decay
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, eps=1e-8, weight_decay=weight_decay or 0.0)


@dataclass
class StepResult:
    """Outcome of one training step: the task loss (of the forward that was back-propagated),
    the batch accuracy (classification, else ``None``) and the learning rate ``η_t`` used."""

    loss: float
    accuracy: Optional[float]
    lr: float
    step: int


def _accuracy(out: Tensor, y: Tensor) -> Optional[float]:
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        return (out.argmax(1) == y).float().mean().item()
    return None


class Trainer:
    """Trains a binarized model with a gradient estimator.

    Args:
        model: a model already passed through :func:`fsg.binarize`.
        estimator: a registered name (``"ste"``, ``"fc-grad"``, ``"multifc"``, ``"lstmfc"``,
            ``"fsg"``) or an :class:`~fsg.estimators.Estimator` instance.
        optimizer: base optimizer ``"sgd"``, ``"sgdm"`` or ``"adam"``, or a
            ``torch.optim.Optimizer`` over ``model.parameters()``.
        lr: base learning rate ``η`` (read back from the optimizer every step, so schedulers work).
        loss_fn: ``loss_fn(output, target)``; cross-entropy by default.
        update_on_observe: also update the weights (with STE gradients) in the observe step 0.
        estimator_options: keyword arguments for a named estimator.
    """

    def __init__(
        self,
        model: nn.Module,
        estimator: Union[str, Estimator] = "fsg",
        optimizer: Union[str, torch.optim.Optimizer] = "sgd",
        lr: float = 1e-3,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        update_on_observe: bool = False,
        weight_decay: Optional[float] = None,
        **estimator_options,
    ):
        self.model = model
        self.layers: List[BinaryLayer] = binarized_layers(model)
        if not self.layers:
            raise ValueError("model has no binarized layer: call fsg.binarize(model) before training it")
        self.estimator = get_estimator(estimator, **estimator_options)
        if isinstance(estimator, Estimator) and estimator_options:
            raise ValueError("estimator options are only accepted with an estimator name")
        ref = self.layers[0].latent
        self.estimator.to(device=ref.device, dtype=ref.dtype)
        self.estimator.setup([l.name for l in self.layers], [l.latent.shape for l in self.layers])
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = make_optimizer(optimizer, model.parameters(), lr, weight_decay=weight_decay)
        self.meta_optimizers: Dict[str, torch.optim.Optimizer] = {
            g["name"]: torch.optim.Adam(g["params"], lr=g["lr"])
            for g in self.estimator.meta_param_groups()
            if g["params"]
        }
        self.loss_fn = loss_fn or F.cross_entropy
        self.update_on_observe = update_on_observe
        self.step_count = 0

    # ------------------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The current base learning rate ``η_t``."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _contexts(self, current: bool) -> List[LayerContext]:
        ctxs = []
        for i, layer in enumerate(self.layers):
            p = layer.parametrization
            if p.grad is None or p.w_tilde is None:
                raise RuntimeError(
                    f"no gradient recorded for binarized layer {layer.name!r}: is it used in forward()?"
                )
            w = layer.latent
            ctxs.append(
                LayerContext(
                    index=i,
                    name=layer.name,
                    weight=w,
                    grad=p.grad,
                    w_tilde=p.w_tilde,
                    calibration=layer.quantizer.calibration(w),
                    prev_update=None if w.grad is None else w.grad.detach(),
                )
            )
        return ctxs

    def _lookahead_params(self, directions: List[Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
        lr = self.lr
        params: Dict[str, Tensor] = {}
        for layer, (d, _) in zip(self.layers, directions):
            params[layer.weight_key] = layer.latent - lr * d
            if layer.bias_key is not None and layer.module.bias.grad is not None:
                b = layer.module.bias
                params[layer.bias_key] = b - lr * b.grad.detach()
        return params

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        for opt in self.meta_optimizers.values():
            opt.zero_grad(set_to_none=True)
        for layer in self.layers:  # so that a layer missing from the backward is detected
            layer.parametrization.grad = None

    # ------------------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """One training step on the batch ``(x, y)``; see the module docstring."""
        self.model.train()
        est = self.estimator
        meta = est.lookahead and self.step_count > 0
        lr = self.lr

        # 1-2. meta-gradient and look-ahead forward (or a plain forward at W)
        if meta:
            directions = [est.directions(c) for c in self._contexts(current=False)]
            out = functional_call(self.model, self._lookahead_params(directions), (x,))
        else:
            directions = None
            out = self.model(x)
        loss = self.loss_fn(out, y)

        # 3. backward: hypernetwork grads, new ∂L/∂Ŵ, natural grads of everything else
        self._zero_grad()
        loss.backward()

        # 4. meta step
        if meta:
            for opt in self.meta_optimizers.values():
                opt.step()

        # the new observation (g⁽ᵗ⁾, W̃⁽ᵗ⁾) for the next step's meta-gradient and the HGS
        for i, layer in enumerate(self.layers):
            p = layer.parametrization
            if p.grad is None:
                raise RuntimeError(
                    f"binarized layer {layer.name!r} received no gradient: is it used in forward()?"
                )
            est.observe(i, p.grad, p.w_tilde)

        # 5. weight update
        if meta:
            for layer, (_, u) in zip(self.layers, directions):
                layer.latent.grad = u.detach().to(layer.latent.dtype)
            self.optimizer.step()
        elif est.lookahead:  # observe step 0
            if self.update_on_observe:
                self.optimizer.step()
        else:
            if not est.natural_gradient:
                for ctx, layer in zip(self._contexts(current=True), self.layers):
                    layer.latent.grad = est.directions(ctx)[1].detach()
            self.optimizer.step()

        self.step_count += 1
        return StepResult(loss.item(), _accuracy(out.detach(), y), lr, self.step_count - 1)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "estimator": self.estimator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta_optimizers": {k: v.state_dict() for k, v in self.meta_optimizers.items()},
            "step_count": self.step_count,
        }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]],
             loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Tuple[float, float]:
    """Mean loss and accuracy of ``model`` (eval mode, latent weights ``Ŵ = Q(A(W))``)."""
    loss_fn = loss_fn or F.cross_entropy
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in batches:
            out = model(x)
            loss_sum += loss_fn(out, y).item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate() got no batches")
    return loss_sum / total, correct / total
