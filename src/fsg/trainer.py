"""The training step of every estimator (METHOD.md §3), in one place.

Step 0 (hypernetwork estimators): *observe* — forward at ``W``, backward, record ``g⁽⁰⁾`` and
``W̃⁽⁰⁾``; no weight update (as in the reference code, unless ``update_on_observe``).

Step ``t ≥ 1``::

    1. meta-gradient    D_l, U_l = estimator.directions(g⁽ᵗ⁻¹⁾, W̃⁽ᵗ⁻¹⁾, W, c(W), W.grad_prev)
    2. look-ahead       W_meta = W − η_t·D_l,   b_meta = b − η_t·b.grad_prev
                        out = functional_call(model, {W: W_meta, b: b_meta}, x)
    3. backward         loss.backward()  →  hypernetwork grads, new g⁽ᵗ⁾ (hook at Ŵ), BN/bias grads
                        (several processes: all of these averaged over the ranks, fsg.distributed)
    4. meta step        one Adam per hypernetwork group
    5. weight update    W.grad ← U_l;  base optimizer π ∈ {SGD, SGD-M, Adam} steps every parameter,
                        p ← p − η_t·d_p; the applied directions d_p are kept for the next step's
                        look-ahead (W.grad_prev and b.grad_prev above are these d_p: fsg.optim)
    (between 4 and 5, with the new observation g⁽ᵗ⁾, W̃⁽ᵗ⁾ → estimator.observe)
                        estimator.commit(): the carried state computed in 1 (LSTMFC's (h, c), FSG's
                        stream state) becomes current; directions() itself changes no state, so a
                        step rejected by the non-finite check (below) commits nothing

STE (and any estimator with ``lookahead = False``) is plain training: forward at ``W``,
backward, optional replacement of ``W.grad`` by ``U_l``, optimizer step.

Non-finite values (``nonfinite="raise"|"skip"``): between the backward (3, after the averaging
over the ranks, so every rank decides alike) and the meta step (4), one fused check that the
loss, every ``.grad`` of the model and the hypernetworks, every captured ``∂L/∂Ŵ``, every update
direction ``U_l`` and the model's float buffers (BatchNorm statistics) are finite. Steps 4-5 (meta
step, observation, weight update) change the state only after that check and every other check
has passed: all or nothing. A failed check restores what the forward/backward already changed
(the ``.grad`` of every parameter, the recorded ``∂L/∂Ŵ`` and ``W̃``, the BatchNorm statistics,
the hypernetworks' carried state such as LSTMFC's ``(h, c)`` and FSG's stream states), so the
trainer is exactly as before the step; then ``"raise"`` raises :class:`NonFiniteError` and
``"skip"`` returns a ``StepResult`` with ``skipped=True`` (``step_count`` unchanged: the next
meta-gradient uses the last good observation), unless more than ``max_skips`` steps in a row
were skipped, which raises :class:`NonFiniteError` as well.

Mixed precision (``autocast_dtype=torch.bfloat16``): only the main network's forward (plain or
look-ahead, step 2) and the loss run under ``torch.autocast(device_type, bfloat16)``, the logits
cast to float32 before the loss. The meta-gradient (step 1, the hypernetworks), the look-ahead
weights ``W − η·D``, the captured ``∂L/∂Ŵ`` (the gradient at the float32 binary weight, upstream
of autocast's cast), the meta step and the base optimizer stay float32. float16 is refused: it
would need loss scaling (a GradScaler) of the loss, the hypernetwork gradients and ``∂L/∂Ŵ``.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fsg import distributed as dist
from fsg.binarize import BinaryLayer, binarized_layers
from fsg.estimators import Estimator, LayerContext, get_estimator
from fsg.optim import OPTIMIZERS, make_optimizer, step_with_directions

__all__ = ["Trainer", "StepResult", "make_optimizer", "evaluate", "OPTIMIZERS", "check_autocast_dtype",
           "autocast_context", "NonFiniteError", "NONFINITE_POLICIES", "StepSnapshot", "accuracy", "all_finite",
           "step_finite"]

#: What a trainer does with a step whose loss or gradients are not finite (``Trainer(nonfinite=...)``).
NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """A training step produced a NaN or infinite loss, gradient or update (under
    ``nonfinite="raise"``, or more than ``max_skips`` in a row under ``"skip"``), or a checkpoint
    would have held non-finite values. The message is one line naming the step and what was not
    finite; the trainer's state is that before the step (nothing was updated)."""

    def __init__(self, message: str, step: Optional[int] = None):
        super().__init__(message)
        self.step = step

@dataclass
class StepResult:
    """Outcome of one training step: the task loss (of the forward that was back-propagated),
    the batch accuracy (classification, else ``None``) and the learning rate ``η_t`` used."""

    loss: float
    accuracy: Optional[float]
    lr: float
    step: int
    samples: int = 0  #: samples in the (global) batch
    #: ``nonfinite="skip"``: the step's loss or gradients were not finite; nothing was updated
    skipped: bool = False
    nonfinite: Optional[str] = None  #: what was not finite (one line), for a skipped step


def check_nonfinite_policy(nonfinite: str, max_skips: int) -> Tuple[str, int]:
    """``(nonfinite, max_skips)`` validated (one-line ``ValueError``)."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite!r}")
    if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
        raise ValueError(f"max_skips must be an integer >= 0, got {max_skips!r}")
    return nonfinite, max_skips


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every (floating-point) tensor is finite. Fast path: per device the
    tensors' Euclidean norms in one multi-tensor call (``torch._foreach_norm``: a few kernel
    launches on a GPU, not one per tensor), stacked, one synchronisation per device — a NaN or an
    infinity makes its tensor's norm non-finite; only when a norm is not finite (a NaN, an
    infinity, or finite values whose squares overflow) are the elements checked one by one, so the
    answer is exact."""
    floats = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    groups: Dict[torch.device, List[Tensor]] = {}  # per device (a CUDA run keeps e.g. Adam's step counts on the CPU)
    for t in floats:
        groups.setdefault(t.device, []).append(t)
    if all(bool(torch.stack([n.float() for n in torch._foreach_norm(v, 2)]).isfinite().all())
           for v in groups.values()):
        return True
    return all(bool(t.isfinite().all()) for t in floats)


def step_finite(loss, checked: List[Tuple[object, Tensor]]) -> bool:
    """Whether a step's loss (a tensor or a number) and the tensors of ``checked`` ((name, tensor)
    pairs) are all finite: one fused check."""
    tensors = [t for _, t in checked]
    if isinstance(loss, Tensor):
        return all_finite([loss.detach().reshape(1)] + tensors)
    return math.isfinite(loss) and all_finite(tensors)


def _name(name) -> str:
    return name if isinstance(name, str) else " ".join(name)


def nonfinite_names(named: Iterable[Tuple[Union[str, Tuple[str, ...]], Tensor]], limit: int = 4) -> List[str]:
    """The names (a string, or a tuple of words joined by spaces) of the tensors holding a NaN or
    an infinity: at most ``limit``, then ``+N more``."""
    bad = [_name(n) for n, t in named if (t.is_floating_point() or t.is_complex()) and not bool(t.isfinite().all())]
    return bad[:limit] + ([f"+{len(bad) - limit} more"] if len(bad) > limit else [])


class StepSnapshot:
    """What a step's forward and backward change before the non-finite check, kept so that a
    rejected step leaves the trainer exactly as it was: references to every parameter's
    ``.grad`` and to the recorded ``∂L/∂Ŵ``/``W̃`` (the step replaces them, never writes into
    them), copies of the model's buffers (BatchNorm statistics are updated in place), and the
    hypernetworks' carried state (list/deque/dict attributes of their modules, such as LSTMFC's
    ``states`` and FSG's ``stream_states``, restored in place; the carried tensors themselves are
    replaced by a step, except FSG's 16-bit stream state, which the backward pass overwrites in
    place and which is therefore copied when ``copy_in_place_state``)."""

    _MODULE_ATTRS = frozenset(vars(nn.Module()))

    def __init__(self, params: List[Tensor], recorders: List[nn.Module], buffers: List[Tensor],
                 stateful: Optional[nn.Module], copy_in_place_state: bool):
        self.grads = [(p, p.grad) for p in params]
        self.recorded = [(r, r.grad, r.w_tilde) for r in recorders]
        self.buffers = [(b, b.clone()) for b in buffers]
        self.containers = []
        self.tensors = []
        for m in ([] if stateful is None else stateful.modules()):
            for k, v in vars(m).items():
                if k in self._MODULE_ATTRS:
                    continue
                if isinstance(v, (list, deque)):
                    self.containers.append((v, list(v)))
                elif isinstance(v, dict) and not isinstance(v, nn.Module):
                    self.containers.append((v, dict(v)))
            if copy_in_place_state and getattr(m, "state_dtype", "float32") not in (None, "float32"):
                for st in getattr(m, "stream_states", None) or []:
                    for t in st or ():
                        if isinstance(t, Tensor):
                            self.tensors.append((t, t.clone()))

    def restore(self) -> None:
        for p, g in self.grads:
            p.grad = g
        for r, g, wt in self.recorded:
            r.grad, r.w_tilde = g, wt
        with torch.no_grad():
            for b, v in self.buffers:
                b.copy_(v)
            for t, v in self.tensors:
                t.copy_(v)
        for c, v in self.containers:
            if isinstance(c, dict):
                c.clear()
                c.update(v)
            elif isinstance(c, deque):
                c.clear()
                c.extend(v)
            else:
                c[:] = v


def lookahead_weights(weights: List[Tensor], directions: List[Tensor], lr: float) -> List[Tensor]:
    """``W − lr·D`` for every pair: on the weights flattened and concatenated (three operators and
    their backward for all layers, not two per layer: on a GPU each is a launch), as views of
    the result; the same numbers as per layer (element-wise). Per pair when dtypes or devices
    differ."""
    if len({(w.dtype, w.device, d.dtype) for w, d in zip(weights, directions)}) != 1:
        return [w - lr * d for w, d in zip(weights, directions)]
    w_flat = torch.cat([w.reshape(-1) for w in weights])
    d_flat = torch.cat([d.reshape(-1) for d in directions])
    out = (w_flat - lr * d_flat).split([w.numel() for w in weights])
    return [o.view_as(w) for o, w in zip(out, weights)]


def accuracy(out: Tensor, y: Tensor) -> Optional[float]:
    """Top-1 accuracy of classifier logits ``out`` (``[N, C]``) against integer labels ``y`` (``[N]``),
    as a float in [0, 1]; ``None`` when the output is not a classification (other shapes, float targets)."""
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
        distributed: average the gradients, the captured ``∂L/∂Ŵ``, the float buffers, the loss
            and the accuracy over the processes of the ``torch.distributed`` group after every
            backward (:mod:`fsg.distributed`); each process passes its own slice of the global
            batch to :meth:`step`. Default: when a group of more than one process is initialised.
            The model's and the estimator's parameters and buffers are broadcast from rank 0 here.
        adam_variant: with ``optimizer="adam"``: ``"torch"`` (the spec's ``m̂/(√v̂ + ε)``) or
            ``"reference"`` (MetaQuant's arithmetic, ε before the bias correction); :mod:`fsg.optim`.
        autocast_dtype: ``None`` (float32 throughout) or ``torch.bfloat16``: the model's forward
            passes and the loss under ``torch.autocast`` (module docstring); ``torch.float16`` is
            refused (it needs loss scaling).
        nonfinite: what a step whose loss, gradients or updates hold a NaN or an infinity does
            (module docstring): ``"raise"`` (default) raises :class:`NonFiniteError` before
            anything is updated; ``"skip"`` discards the step (the trainer stays as it was, the
            batch is lost), counts it in :attr:`skipped` and returns ``StepResult(skipped=True)``.
            With FSG's 16-bit stream state (``state_dtype``), which the backward pass overwrites in
            place, ``"skip"`` keeps a copy of that state during every step (its memory once more)
            and ``"raise"`` does not restore it (the run is meant to stop).
        max_skips: under ``"skip"``, raise :class:`NonFiniteError` when more than this many
            consecutive steps were skipped (a clean step resets the count): a few bad batches are
            survived, a run whose weights or hypernetworks diverged is stopped.
        estimator_options: keyword arguments for a named estimator.

    Attributes ``skipped`` (steps skipped in all) and ``skipped_in_a_row`` count the skips; both
    are part of :meth:`state_dict`.
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
        distributed: Optional[bool] = None,
        adam_variant: str = "torch",
        autocast_dtype: Optional[torch.dtype] = None,
        nonfinite: str = "raise",
        max_skips: int = 10,
        **estimator_options,
    ):
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self.nonfinite, self.max_skips = check_nonfinite_policy(nonfinite, max_skips)
        self.skipped = 0
        self.skipped_in_a_row = 0
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
            self.optimizer = make_optimizer(optimizer, model.parameters(), lr, weight_decay=weight_decay,
                                            adam_variant=adam_variant)
        # d_p of the last base-optimizer step (p ← p − η·d_p): the look-ahead's W.grad_prev, b.grad_prev
        self.applied: Dict[Tensor, Tensor] = {}
        self.meta_optimizers: Dict[str, torch.optim.Optimizer] = {
            g["name"]: torch.optim.Adam(g["params"], lr=g["lr"])
            for g in self.estimator.meta_param_groups()
            if g["params"]
        }
        self.loss_fn = loss_fn or F.cross_entropy
        self.update_on_observe = update_on_observe
        self.step_count = 0
        # for the non-finite check of every step (the parameters themselves never change)
        self._named_params = list(model.named_parameters())
        self._named_est_params = list(self.estimator.named_parameters())
        self._params = [p for _, p in self._named_params] + [p for _, p in self._named_est_params]
        self.distributed = dist.is_distributed() if distributed is None else bool(distributed)
        if self.distributed:
            if not dist.is_distributed():
                raise ValueError("distributed=True needs an initialised torch.distributed group of more than one "
                                 "process (launch with torchrun)")
            dist.broadcast_(list(model.parameters()) + list(model.buffers()) + list(self.estimator.parameters()))

    # ------------------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The current base learning rate ``η_t``."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _autocast(self):
        """``torch.autocast`` on the model's device with :attr:`autocast_dtype` (or nothing)."""
        return autocast_context(self.layers[0].latent.device, self.autocast_dtype)

    def _contexts(self) -> List[LayerContext]:
        """Every layer's :class:`LayerContext` from the most recent recorded forward/backward."""
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
                    prev_update=self._previous_direction(w),
                )
            )
        return ctxs

    def _lookahead_params(self, directions: List[Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
        """The look-ahead weights ``W − η·D`` (and biases ``b − η·d_b``) by state-dict key."""
        lr = self.lr
        params: Dict[str, Tensor] = {}
        for layer, w_meta in zip(self.layers, lookahead_weights([l.latent for l in self.layers],
                                                                 [d for d, _ in directions], lr)):
            params[layer.weight_key] = w_meta
            if layer.bias_key is not None:
                d_b = self._previous_direction(layer.module.bias)
                if d_b is not None:
                    params[layer.bias_key] = layer.module.bias - lr * d_b
        return params

    def _previous_direction(self, p: Tensor) -> Optional[Tensor]:
        """The direction ``d`` of ``p``'s last update ``p ← p − η·d`` (:mod:`fsg.optim`); after
        the observe step (no update yet), the gradient ``p.grad`` of that step; else ``None``."""
        d = self.applied.get(p)
        if d is None:
            d = p.grad
        return None if d is None else d.detach()

    def _optimizer_step(self) -> None:
        """The base optimizer's step; for a look-ahead estimator also keep what it applied."""
        if self.estimator.lookahead:
            self.applied = step_with_directions(self.optimizer)
        else:
            self.optimizer.step()

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
        before = self._snapshot()  # what steps 1-3 change, for a step rejected by the check below

        # 1-2. meta-gradient and look-ahead forward (or a plain forward at W)
        if meta:
            directions = est.directions_all(self._contexts())  # float32, outside autocast
            params = self._lookahead_params(directions)
            with self._autocast():
                out = functional_call(self.model, params, (x,))
                loss = self.loss_fn(out if self.autocast_dtype is None else out.float(), y)
        else:
            directions = None
            with self._autocast():
                out = self.model(x)
                loss = self.loss_fn(out if self.autocast_dtype is None else out.float(), y)

        # 3. backward: hypernetwork grads, new ∂L/∂Ŵ, natural grads of everything else
        self._zero_grad()
        loss.backward()
        acc = accuracy(out.detach(), y)
        loss_value, samples = loss.detach(), int(y.shape[0])
        if self.distributed:  # the same gradients, ∂L/∂Ŵ and statistics on every rank
            loss_value, acc, samples = self._average_over_ranks(loss_value, acc, samples)

        # checks before the first change of state (4-5 are all or nothing): every layer has its
        # new observation (g⁽ᵗ⁾, W̃⁽ᵗ⁾), and the loss, gradients and updates are finite
        for layer in self.layers:
            if layer.parametrization.grad is None:
                before.restore()
                raise RuntimeError(
                    f"binarized layer {layer.name!r} received no gradient: is it used in forward()?"
                )
        if meta:
            updates = [u for _, u in directions]
        elif not est.lookahead and not est.natural_gradient:
            updates = [u for _, u in est.directions_all(self._contexts())]
        else:
            updates = []
        checked = self._checked_tensors(updates)
        if not step_finite(loss_value, checked):
            culprits = nonfinite_names(checked)
            before.restore()
            return self._reject(loss_value, culprits, lr, acc, samples)
        self.skipped_in_a_row = 0

        # 4. meta step
        if meta:
            for opt in self.meta_optimizers.values():
                opt.step()

        # the new observation (g⁽ᵗ⁾, W̃⁽ᵗ⁾) for the next step's meta-gradient and the HGS
        for i, layer in enumerate(self.layers):
            p = layer.parametrization
            est.observe(i, p.grad, p.w_tilde)
        est.commit()  # the carried state (LSTMFC's (h, c), FSG's stream state) computed by directions()

        # 5. weight update
        if meta or not est.lookahead:
            if updates:  # U_l (a look-ahead estimator, or a fixed one that replaces the STE gradient)
                for layer, u in zip(self.layers, updates):
                    layer.latent.grad = u.detach().to(layer.latent.dtype)
            self._optimizer_step()
        elif self.update_on_observe:  # observe step 0
            self._optimizer_step()

        self.step_count += 1
        return StepResult(float(loss_value), acc, lr, self.step_count - 1, samples)

    # ------------------------------------------------------------------------------------------
    # non-finite steps

    def _snapshot(self) -> StepSnapshot:
        return StepSnapshot(self._params, [l.parametrization for l in self.layers], list(self.model.buffers()),
                             self.estimator, copy_in_place_state=self.nonfinite == "skip")

    def _checked_tensors(self, updates: List[Tensor]) -> List[Tuple[Tuple[str, str], Tensor]]:
        """``((what, name), tensor)`` of everything the non-finite check covers (the loss aside)."""
        named = [(("gradient of", n), p.grad) for n, p in self._named_params if p.grad is not None]
        named += [(("hypernetwork gradient of", n), p.grad) for n, p in self._named_est_params if p.grad is not None]
        named += [(("∂L/∂Ŵ of", l.name), l.parametrization.grad) for l in self.layers]
        named += [(("update of", l.name), u) for l, u in zip(self.layers, updates)]
        named += [(("buffer", n), b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        return named

    def _reject(self, loss, culprits: List[str], lr: float, acc: Optional[float], samples: int) -> StepResult:
        return reject_step(self, loss, culprits, lr, acc, samples)

    def _average_over_ranks(self, loss: Tensor, acc: Optional[float], samples: int):
        """Replace, on every rank, each ``.grad`` of the model and the hypernetworks, each captured
        ``∂L/∂Ŵ`` and each float buffer by its sample-weighted mean over the ranks."""
        tensors = [p.grad for p in self.estimator.parameters() if p.grad is not None]
        tensors += [l.parametrization.grad for l in self.layers if l.parametrization.grad is not None]
        return average_over_ranks(self.model, tensors, loss, acc, samples)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the next :meth:`step` depends on, as tensors and plain containers.

        ``model`` (latent weights, BN statistics), ``estimator`` (hypernetworks; its extra state
        holds FSG's HGS and LSTMFC's carried LSTM states), ``optimizer``, ``meta_optimizers``,
        ``step_count``; ``recorded``: each binarized layer's ``∂L/∂Ŵ`` and ``W̃`` of the last
        back-propagated forward (the next meta-gradient's input), by layer name; ``grads``: the
        ``.grad`` left on every model and estimator parameter; ``applied``: the direction ``d`` of
        each model parameter's last update ``p ← p − η·d`` (MetaQuant's look-ahead
        ``W − η·d_prev``, the bias look-ahead ``b − η·d_prev(b)``; absent from checkpoints of
        fsg < 0.2, where the gradients stand in); ``skipped``: ``{"total", "in_a_row"}``, the
        steps skipped as non-finite (absent from older checkpoints: 0). Tensors are references,
        not copies: save or clone them before the next step.
        """
        return {
            "model": self.model.state_dict(),
            "estimator": self.estimator.state_dict(),
            "estimator_name": getattr(type(self.estimator), "registered_name", type(self.estimator).__name__),
            "optimizer": self.optimizer.state_dict(),
            "meta_optimizers": {k: v.state_dict() for k, v in self.meta_optimizers.items()},
            "step_count": self.step_count,
            "recorded": {
                l.name: {"grad": l.parametrization.grad, "w_tilde": l.parametrization.w_tilde}
                for l in self.layers
            },
            "grads": {
                "model": {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None},
                "estimator": {n: p.grad for n, p in self.estimator.named_parameters() if p.grad is not None},
            },
            "applied": {n: self.applied[p] for n, p in self.model.named_parameters() if p in self.applied},
            "skipped": {"total": self.skipped, "in_a_row": self.skipped_in_a_row},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, into a trainer built the same way (same
        model architecture and binarization, same estimator and options, same optimizer), so that
        the following steps are exactly those of the uninterrupted run. Raises ``ValueError``
        (one line) when the state does not fit this trainer."""
        required = ("model", "estimator", "optimizer", "meta_optimizers", "step_count", "recorded", "grads")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"trainer state lacks {', '.join(missing)}")
        name = getattr(type(self.estimator), "registered_name", type(self.estimator).__name__)
        if state.get("estimator_name", name) != name:
            raise ValueError(f"trainer state is for estimator {state['estimator_name']!r}, this trainer uses {name!r}")
        names = [l.name for l in self.layers]
        if sorted(state["recorded"]) != sorted(names):
            raise ValueError("trainer state's binarized layers differ from this model's: "
                             f"{sorted(state['recorded'])} vs {sorted(names)}")
        if sorted(state["meta_optimizers"]) != sorted(self.meta_optimizers):
            raise ValueError("trainer state's hypernetwork optimizers differ from this estimator's: "
                             f"{sorted(state['meta_optimizers'])} vs {sorted(self.meta_optimizers)}")
        model_params = dict(self.model.named_parameters())
        est_params = dict(self.estimator.named_parameters())
        for where, params in (("model", model_params), ("estimator", est_params)):
            extra = sorted(set(state["grads"].get(where, {})) - set(params))
            if extra:
                raise ValueError(f"trainer state has gradients of unknown {where} parameters: {', '.join(extra[:5])}")
        applied = state.get("applied") or {}
        unknown = sorted(set(applied) - set(model_params))
        if unknown:
            raise ValueError(f"trainer state has update directions of unknown parameters: {', '.join(unknown[:5])}")
        try:
            self.model.load_state_dict(state["model"])
            # extra state (FSG's HGS, LSTMFC's carried states) is taken as is: put it on our device
            self.estimator.load_state_dict(_to_device(state["estimator"], self.layers[0].latent.device))
        except RuntimeError as e:
            raise ValueError(" ".join(str(e).split())) from None
        self.optimizer.load_state_dict(state["optimizer"])
        for k, opt in self.meta_optimizers.items():
            opt.load_state_dict(state["meta_optimizers"][k])
        self.step_count = int(state["step_count"])
        for l in self.layers:
            rec = state["recorded"][l.name]
            dev = l.latent.device
            l.parametrization.grad = None if rec["grad"] is None else rec["grad"].to(dev)
            l.parametrization.w_tilde = None if rec["w_tilde"] is None else rec["w_tilde"].to(dev)
        for where, params in (("model", model_params), ("estimator", est_params)):
            grads = state["grads"].get(where, {})
            for n, p in params.items():
                g = grads.get(n)
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()
        self.applied = {model_params[n]: d.to(device=model_params[n].device, dtype=model_params[n].dtype).clone()
                        for n, d in applied.items()}
        skipped = state.get("skipped") or {}
        self.skipped, self.skipped_in_a_row = int(skipped.get("total", 0)), int(skipped.get("in_a_row", 0))


def reject_step(self, loss, culprits: List[str], lr: float, acc: Optional[float], samples: int) -> StepResult:
    """After a failed non-finite check of a step of ``self`` (a :class:`Trainer` or a trainer with its
    ``nonfinite``, ``max_skips``, ``skipped``, ``skipped_in_a_row`` and ``step_count``; the state
    already restored): raise :class:`NonFiniteError` or return the skipped step's result."""
    loss = float(loss)
    what = ([f"loss {loss}"] if not math.isfinite(loss) else []) + culprits
    detail = "non-finite " + ", ".join(what)
    step = self.step_count + 1
    if self.nonfinite == "raise":
        raise NonFiniteError(f"step {step}: {detail}; nothing was updated", step)
    self.skipped += 1
    self.skipped_in_a_row += 1
    if self.skipped_in_a_row > self.max_skips:
        raise NonFiniteError(f"step {step}: {detail}; {self.skipped_in_a_row} steps in a row skipped, more "
                             f"than max_skips={self.max_skips}: the run has diverged", step)
    return StepResult(loss, acc, lr, self.step_count, samples, skipped=True,
                      nonfinite=f"step {step}: {detail}; skipped ({self.skipped_in_a_row} in a row, "
                                f"{self.skipped} in all)")



def average_over_ranks(model: nn.Module, tensors: List[Tensor], loss: Tensor, acc: Optional[float], samples: int
                       ) -> Tuple[float, Optional[float], int]:
    """After a backward on each rank's slice of the global batch: replace every ``.grad`` of
    ``model``, every float buffer of ``model`` and every tensor in ``tensors`` by its mean over the
    ranks weighted by their sample counts (one collective, :func:`fsg.distributed.weighted_average_`);
    return the global loss, accuracy (``None`` stays ``None``) and number of samples."""
    stats = torch.tensor([float(loss), 0.0 if acc is None else acc], dtype=torch.float64, device=loss.device)
    everything = [p.grad for p in model.parameters() if p.grad is not None] + list(tensors)
    everything += [b for b in model.buffers() if b.is_floating_point()]
    total = dist.weighted_average_(everything + [stats], samples)
    loss_g, acc_g = stats.tolist()
    return loss_g, (None if acc is None else acc_g), int(round(total))


def check_autocast_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """``dtype`` if the trainers can autocast to it (``None`` or ``torch.bfloat16``), else a
    one-line ``ValueError`` (float16 needs loss scaling, which the trainers do not do)."""
    if dtype is None or dtype == torch.bfloat16:
        return dtype
    if dtype == torch.float16:
        raise ValueError("autocast to float16 needs loss scaling, which fsg does not do; use torch.bfloat16 (amp bf16)")
    raise ValueError(f"autocast_dtype must be None or torch.bfloat16, got {dtype!r}")


def autocast_context(device: Union[str, torch.device], dtype: Optional[torch.dtype]):
    """``torch.autocast(device type, dtype)``, or a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _to_device(obj, device):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]],
             loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
             distributed: bool = False) -> Tuple[float, float]:
    """Mean loss and accuracy of ``model`` (eval mode, latent weights ``Ŵ = Q(A(W))``).

    ``distributed``: every rank of the process group calls this with its own share of the test
    set (e.g. a :class:`fsg.data.DataLoader` with ``rank``/``world_size``); the sums are added
    over the ranks, so every rank returns the figures of the whole set."""
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
    if distributed:
        loss_sum, correct, total = dist.all_reduce_sum([loss_sum, correct, total])
    if total == 0:
        raise ValueError("evaluate() got no batches")
    return loss_sum / total, correct / total
