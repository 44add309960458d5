"""The estimator interface (:class:`Estimator`, :class:`LayerContext`), the registry (each
estimator with its options dataclass, :mod:`fsg.estimators.config`) and what is derived from it:
the option names of an estimator, the check of a dict of options without building anything, and
the README's table of options.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from fsg.estimators.config import EstimatorConfig

__all__ = ["LayerContext", "Estimator", "ESTIMATORS", "register_estimator", "get_estimator", "STATE_DTYPES",
           "estimator_config", "option_names", "takes_any_option", "check_options", "options_table_markdown"]


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

    Carried state (LSTMFC's ``(h, c)``, FSG's stream state ``s⁽ᵗ⁾``): :meth:`directions` is pure
    with respect to it — it reads ``s⁽ᵗ⁻¹⁾``, computes ``s⁽ᵗ⁾`` and keeps it *pending*, so calling it
    twice gives the same result and leaves the state as it was. :meth:`commit` makes the pending
    ``s⁽ᵗ⁾`` the carried state; the trainer calls it once per step, after the backward pass and
    the non-finite check (a rejected step commits nothing). Per layer the last
    :meth:`directions` call before :meth:`commit` is the one committed.

    Options: a registered estimator has one frozen dataclass of options (:attr:`Config`, a
    :class:`~fsg.estimators.config.EstimatorConfig`), given to :func:`register_estimator`; its
    constructor takes ``(config=None, **options)`` and keeps the validated config as
    :attr:`config`.
    """

    lookahead: bool = True
    natural_gradient: bool = False
    #: the options dataclass (set by :func:`register_estimator`; ``None``: an estimator without one)
    Config: Optional[Type[EstimatorConfig]] = None

    def setup(self, layer_names: Sequence[str], layer_shapes: Sequence[torch.Size]) -> None:
        """Called once by the trainer with the binarized layers (in order)."""
        self.layer_names = list(layer_names)
        self.layer_shapes = [torch.Size(s) for s in layer_shapes]

    def directions(self, ctx: LayerContext) -> Tuple[Tensor, Tensor]:  # pragma: no cover
        """Return ``(D, U)`` for one layer; see the module docstring."""
        raise NotImplementedError

    def directions_all(self, contexts: Sequence[LayerContext]) -> List[Tuple[Tensor, Tensor]]:
        """:meth:`directions` of every layer of a step, in order (what the trainer calls). An
        estimator may override it to compute the layers together (FSG's ``batch_layers``); the
        result must be what the per-layer calls would give, up to floating-point rounding."""
        return [self.directions(c) for c in contexts]

    def observe(self, index: int, grad: Tensor, w_tilde: Tensor) -> None:
        """Called after every backward with the new ``∂L/∂Ŵ`` and ``W̃`` of layer ``index``."""

    def commit(self) -> None:
        """Make the carried state computed by this step's :meth:`directions` calls the current
        one (``s⁽ᵗ⁻¹⁾ ← s⁽ᵗ⁾``, every layer with a pending state); nothing when there is none.
        Called by the trainer after the backward pass of the step and its checks."""

    def meta_param_groups(self) -> List[dict]:
        """Hypernetwork parameter groups, one Adam each: ``[{"name", "params", "lr"}, ...]``."""
        return []


ESTIMATORS: Dict[str, Type[Estimator]] = {}


def register_estimator(name: str, config: Optional[Type[EstimatorConfig]] = None
                       ) -> Callable[[Type[Estimator]], Type[Estimator]]:
    """Class decorator adding an :class:`Estimator` subclass to the registry under ``name``, with
    its options dataclass ``config`` (``None``: the options are the constructor's keywords, checked
    only by name, and only when it builds)."""

    def deco(cls: Type[Estimator]) -> Type[Estimator]:
        ESTIMATORS[name] = cls
        cls.registered_name = name
        if config is not None:
            cls.Config = config
        return cls

    return deco


def get_estimator(name, **kwargs) -> Estimator:
    """Build an estimator from its registered name; an :class:`Estimator` is returned as is."""
    if isinstance(name, Estimator):
        return name
    return ESTIMATORS[_known(name)](**kwargs)


def _known(name: str) -> str:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}: choose one of {', '.join(sorted(ESTIMATORS))}")
    return name


def estimator_config(name: str) -> Optional[Type[EstimatorConfig]]:
    """The options dataclass of the registered estimator ``name`` (``None`` if it has none)."""
    return ESTIMATORS[_known(name)].Config


def option_names(name: str) -> List[str]:
    """The keyword options the registered estimator ``name`` takes: its config's fields, or, for
    an estimator registered without a config, its constructor's named keywords."""
    config = estimator_config(name)
    if config is not None:
        return config.option_names()
    init = ESTIMATORS[name].__init__
    if init is nn.Module.__init__:
        return []
    return [p.name for p in inspect.signature(init).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def takes_any_option(name: str) -> bool:
    """Whether ``name`` accepts options beyond :func:`option_names` (a constructor with
    ``**kwargs`` and no config: its options cannot be known before it is built)."""
    cls = ESTIMATORS[_known(name)]
    if cls.Config is not None or cls.__init__ is nn.Module.__init__:
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def check_options(name: str, options: Dict[str, Any]) -> Optional[EstimatorConfig]:
    """Check ``options`` for the registered estimator ``name`` without building it (no module, no
    random number): the names, then the config's :meth:`~EstimatorConfig.validate`. Returns the
    validated config (``None`` for an estimator without one). One-line ``ValueError``:
    ``estimator 'fsg': beta must be a number in [0, 1], got 2.0``."""
    for k in options:
        if not isinstance(k, str):
            raise ValueError(f"estimator option names must be strings, got {k!r}")
    accepted = option_names(name)
    bad = sorted(k for k in options if k not in accepted)
    if bad and not takes_any_option(name):
        raise ValueError(f"estimator {name!r} does not take option(s) {', '.join(bad)} "
                         f"(it takes: {', '.join(accepted) if accepted else 'none'})")
    config = estimator_config(name)
    if config is None:
        return None
    try:
        return config(**options).validate()
    except ValueError as e:
        raise ValueError(f"estimator {name!r}: {' '.join(str(e).split())}") from None


def options_table_markdown() -> str:
    """The README's table of estimator options, rendered from the registered configs: one row per
    option (``estimator | option | default | accepts | meaning``), estimators in registration
    order; an estimator without options has one row with ``—``."""
    rows = ["| estimator | option | default | accepts | meaning |", "|---|---|---|---|---|"]
    for name, cls in ESTIMATORS.items():
        specs = cls.Config.specs() if cls.Config is not None else []
        if not specs:
            rows.append(f"| `{name}` | — | | | no options |")
        for s in specs:
            default = s.default_repr if s.default is None and s.default_text else f"`{s.default_repr}`"
            rows.append(f"| `{name}` | `{s.name}` | {default} | {s.allowed()} | {s.help} |")
    return "\n".join(rows) + "\n"


def check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


#: FSG's ``state_dtype`` names.
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
