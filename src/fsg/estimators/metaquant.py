"""MetaQuant's learned estimators (Chen et al., NeurIPS 2019): FC-Grad, MultiFC and LSTMFC, with
the look-ahead rule ``D = c⊙G + (W.grad_prev − c⊙G).detach()``, ``U = c⊙G`` (METHOD.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from fsg.estimators.base import Estimator, LayerContext, register_estimator
from fsg.estimators.config import EstimatorConfig, option
from fsg.estimators.nets import ElementwiseMLP, run_lstm


__all__ = ["FCGrad", "MultiFC", "LSTMFC", "FCGradConfig", "MultiFCConfig", "LSTMFCConfig"]

_NONLINEARITY = dict(kind="choice", choices=(None, "relu", "tanh"))
_META_LR = dict(kind="float", low=0, low_open=True)


@dataclass(frozen=True)
class FCGradConfig(EstimatorConfig):
    """Options of FC-Grad, ``G = M(g)``, ``M``: ``1→h→1``."""

    hidden: int = option(100, "hidden width h of the hypernetwork M", kind="int", low=1)
    nonlinearity: Optional[str] = option(None, "nonlinearity between M's layers (None: M is linear)",
                                         **_NONLINEARITY)
    meta_lr: float = option(1e-3, "Adam learning rate of the hypernetwork", **_META_LR)


@dataclass(frozen=True)
class MultiFCConfig(FCGradConfig):
    """Options of MultiFC, ``G = g ⊙ M(W̃)``, ``M``: ``1→h→h→1`` (those of FC-Grad)."""


@dataclass(frozen=True)
class LSTMFCConfig(EstimatorConfig):
    """Options of LSTMFC, ``G = g ⊙ FC(LSTM(W̃))``."""

    hidden: int = option(100, "hidden size of the LSTM (MetaQuant's paper and scripts; earlier fsg versions used 20)",
                         kind="int", low=1)
    meta_lr: float = option(1e-3, "Adam learning rate of the hypernetwork", **_META_LR)


class _MetaQuant(Estimator):
    """Common MetaQuant look-ahead rule: ``D = c⊙G + (W.grad_prev − c⊙G).detach()``, ``U = c⊙G``."""

    def __init__(self, config: EstimatorConfig):
        super().__init__()
        self.config = config
        self.meta_lr = float(config.meta_lr)

    def refined(self, ctx: LayerContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def directions(self, ctx: LayerContext) -> Tuple[Tensor, Tensor]:
        cg = ctx.calibration * self.refined(ctx)
        prev = ctx.prev_update if ctx.prev_update is not None else cg.detach()
        return cg + (prev - cg).detach(), cg.detach()

    def meta_param_groups(self) -> List[dict]:
        return [{"name": "meta", "params": list(self.parameters()), "lr": self.meta_lr}]


@register_estimator("fc-grad", config=FCGradConfig)
class FCGrad(_MetaQuant):
    """MetaQuant FC-Grad: ``G = M(g)``, ``M`` two bias-free linear layers ``1→h→1``."""

    def __init__(self, config: Optional[FCGradConfig] = None, **options):
        cfg = FCGradConfig.from_options(config, **options)
        super().__init__(cfg)
        self.net = ElementwiseMLP(cfg.hidden, depth=2, nonlinearity=cfg.nonlinearity)

    def refined(self, ctx: LayerContext) -> Tensor:
        return self.net(ctx.grad)


@register_estimator("multifc", config=MultiFCConfig)
class MultiFC(_MetaQuant):
    """MetaQuant MultiFC: ``G = g ⊙ M(W̃)``, ``M`` three bias-free linear layers ``1→h→h→1``."""

    def __init__(self, config: Optional[MultiFCConfig] = None, **options):
        cfg = MultiFCConfig.from_options(config, **options)
        super().__init__(cfg)
        self.net = ElementwiseMLP(cfg.hidden, depth=3, nonlinearity=cfg.nonlinearity)

    def refined(self, ctx: LayerContext) -> Tensor:
        return ctx.grad * self.net(ctx.w_tilde)


@register_estimator("lstmfc", config=LSTMFCConfig)
class LSTMFC(_MetaQuant):
    """MetaQuant LSTMFC: ``G = g ⊙ FC(LSTM(W̃))``.

    A one-layer LSTM (hidden ``h``, 100 as in MetaQuant's paper and scripts) runs element-wise
    (batch = elements, sequence length 1) and a linear head with bias maps its output ``h_t`` to
    one number per element; the LSTM's ``(h, c)`` per binarized layer is carried (detached) from
    step to step and is part of the module's state (``get_extra_state``). FSG's
    ``slow_net="lstm-fc"`` uses this module as its slow-net (G_slow = :meth:`refined`).

    :meth:`refined` (and so :meth:`directions`) reads the carried ``(h, c)⁽ᵗ⁻¹⁾`` of the layer,
    computes ``(h, c)⁽ᵗ⁾ = LSTM(W̃, (h, c)⁽ᵗ⁻¹⁾)`` and keeps it in :attr:`pending_states`;
    :meth:`commit` carries it (``states[l] ← (h, c)⁽ᵗ⁾``).
    """

    def __init__(self, config: Optional[LSTMFCConfig] = None, **options):
        cfg = LSTMFCConfig.from_options(config, **options)
        super().__init__(cfg)
        self.hidden = cfg.hidden
        self.lstm = nn.LSTM(1, cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, 1)
        self.states: List[Optional[Tuple[Tensor, Tensor]]] = []
        #: per layer index, the ``(h, c)`` computed by this step's :meth:`refined`, not yet committed
        self.pending_states: Dict[int, Tuple[Tensor, Tensor]] = {}

    def setup(self, layer_names, layer_shapes) -> None:
        super().setup(layer_names, layer_shapes)
        self.states = [None] * len(self.layer_names)
        self.pending_states = {}

    def refined(self, ctx: LayerContext) -> Tensor:
        x = ctx.w_tilde.reshape(1, -1, 1)
        _, (h, c) = run_lstm(self.lstm, x, self.states[ctx.index])
        self.pending_states[ctx.index] = (h.detach(), c.detach())
        return ctx.grad * self.fc(h[0]).view_as(ctx.grad)

    def commit(self) -> None:
        for i, state in self.pending_states.items():
            self.states[i] = state
        self.pending_states.clear()

    def get_extra_state(self):
        return {"states": self.states}

    def set_extra_state(self, state) -> None:
        self.states = list(state["states"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "fc.weight")
        if saved is not None and saved.shape[-1] != self.hidden:
            old_default = " (lstmfc's default hidden size was 20 before it became 100)" if self.hidden == 100 else ""
            raise RuntimeError(f"the saved LSTMFC has hidden size {saved.shape[-1]}, this one {self.hidden}: build "
                               f"the estimator with the saved run's hidden size{old_default}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
