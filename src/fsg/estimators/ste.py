"""The straight-through estimator (STE), the baseline every learned estimator is measured against.
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from fsg.estimators.base import Estimator, LayerContext, register_estimator


__all__ = ["STE"]


@register_estimator("ste")
class STE(Estimator):
    """Straight-through estimator: plain training with autograd's clipped STE gradient."""

    lookahead = False
    natural_gradient = True

    def directions(self, ctx: LayerContext) -> Tuple[Tensor, Tensor]:
        u = ctx.calibration * ctx.grad
        return u, u
