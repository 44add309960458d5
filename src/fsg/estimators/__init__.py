"""Gradient estimators for binarized layers, registered by name.

Every estimator implements one small interface (:class:`Estimator`). For each binarized layer
``l`` the trainer hands it a :class:`LayerContext` — the previous step's ``g = ∂L/∂Ŵ`` and
``W̃``, the current latent ``W``, its calibration ``c(W)`` and the previous ``W.grad`` — and
receives two tensors shaped like ``W``:

* the **look-ahead direction** ``D_l`` (differentiable in the hypernetwork's parameters): the
  trainer forwards with ``W_meta = W − η·D_l``, so the task loss trains the hypernetwork;
* the **update direction** ``U_l`` (detached): the trainer sets ``W.grad = U_l`` and lets the base
  optimizer take its step.

==============  ==============================================  ==========================================  ===================
name            hypernetwork output ``G`` (gradient w.r.t. W̃)   ``D`` (look-ahead)                          ``U`` (``W.grad``)
==============  ==============================================  ==========================================  ===================
``ste``         — (autograd's clipped STE gradient is kept)      —                                           ``∂L/∂W`` (STE)
``fc-grad``     ``M(g)``, ``M``: 1→h→1 linear, element-wise      ``c⊙G + (W.grad_prev − c⊙G).detach()``      ``c⊙G``
``multifc``     ``g ⊙ M(W̃)``, ``M``: 1→h→h→1                   same                                        ``c⊙G``
``lstmfc``      ``g ⊙ FC(LSTM(W̃))``, LSTM state carried           same                                        ``c⊙G``
``fsg``         ``G_fast = g ⊙ F(W̃)``; ``G_slow = S([e_l, HGS])``  ``β·G_slow + (1−β)·c⊙G_fast``                ``D`` (combined) or ``c⊙G_fast`` (fast)
==============  ==============================================  ==========================================  ===================

Every estimator's options are one frozen dataclass (``FSGConfig`` etc., :mod:`fsg.estimators.config`),
registered with it; :func:`check_options` validates a dict of options without building anything,
:func:`options_table_markdown` renders the README's table of them.

FSG's LSTM ablation, ``slow_net="lstm-fc"``, has ``G_slow = g ⊙ FC(LSTM(W̃))`` (MetaQuant's
LSTMFC, :class:`LSTMFC`) instead, with no history and no layer embedding.

Modules: :mod:`~fsg.estimators.base` (the interface, the registry, ``Estimator.commit``),
:mod:`~fsg.estimators.config` (one frozen options dataclass per estimator, from which the CLI
flags, their help, the README table and the validation are derived), :mod:`~fsg.estimators.ste`,
:mod:`~fsg.estimators.metaquant`, :mod:`~fsg.estimators.fsg`, and :mod:`~fsg.estimators.nets`
(the element-wise MLP and the Mamba slow-net).
"""

from fsg.estimators.base import (ESTIMATORS, STATE_DTYPES, Estimator, LayerContext, check_options, estimator_config,
                                  get_estimator, option_names, options_table_markdown, register_estimator,
                                  takes_any_option)
from fsg.estimators.config import EstimatorConfig, OptionSpec, option
from fsg.estimators.nets import ElementwiseMLP, SlowNet
from fsg.estimators.ste import STE, STEConfig
from fsg.estimators.metaquant import LSTMFC, FCGrad, FCGradConfig, LSTMFCConfig, MultiFC, MultiFCConfig
from fsg.estimators.fsg import FSG, FSGConfig

__all__ = [
    "LayerContext", "Estimator", "ESTIMATORS", "register_estimator", "get_estimator",
    "STE", "FCGrad", "MultiFC", "LSTMFC", "FSG", "ElementwiseMLP", "SlowNet", "STATE_DTYPES",
    "EstimatorConfig", "OptionSpec", "option", "STEConfig", "FCGradConfig", "MultiFCConfig", "LSTMFCConfig",
    "FSGConfig", "estimator_config", "option_names", "takes_any_option", "check_options", "options_table_markdown",
]
