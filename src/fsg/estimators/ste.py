"""The straight-through estimator (STE), the baseline every learned estimator is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor

from fsg.estimators.base import Estimator, LayerContext, register_estimator
from fsg.estimators.config import EstimatorConfig


__all__ = ["STE", "STEConfig"]


@dataclass(frozen=True)
class STEConfig(EstimatorConfig):
    """The STE has no options."""


@register_estimator("ste", config=STEConfig)
class STE(Estimator):
    """Straight-through estimator: plain training with autograd's clipped STE gradient."""

    lookahead = False
    natural_gradient = True

    def __init__(self, config: Optional[STEConfig] = None, **options):
        super().__init__()
        self.config = STEConfig.from_options(config, **options)

    def directions(self, ctx: LayerContext) -> Tuple[Tensor, Tensor]:
        u = ctx.calibration * ctx.grad
        return u, u
