"""The training application: configuration, the run loop, checkpoints, run locks and grids.

* :mod:`fsg.train.config` — :class:`TrainConfig`, one run's settings (validated, JSON round trip).
* :mod:`fsg.train.loop` — :func:`train` / :func:`pretrain` / :func:`evaluate`: data and model from a
  config, epochs of :meth:`fsg.Trainer.step`, metrics, checkpoints, exact resume.
* :mod:`fsg.train.build` — a run's parts from its config: data splits, model, trainer, seeding.
* :mod:`fsg.train.state` — what the loop carries between steps (:class:`RunState`), saved and restored.
* :mod:`fsg.train.metrics` — the metric rows (``metrics.jsonl``/``.csv``, TensorBoard).
* :mod:`fsg.train.interrupt` — Ctrl-C/SIGTERM deferred to the end of a step, then a checkpoint.
* :mod:`fsg.train.state` — :class:`~fsg.train.state.RunState`, where a run stands between steps.
* :mod:`fsg.train.checkpoint` — the checkpoint file format (safe reads, atomic writes; the config
  and counters read cheaply with ``read_header`` / ``read_config``).
* :mod:`fsg.train.runlock` — one process per run directory.
* :mod:`fsg.train.grid` — grids of runs (estimators × quantizers × optimizers × seeds) and their report.

Built on the method library (:mod:`fsg.trainer`, :mod:`fsg.estimators`, :mod:`fsg.models`) and
:mod:`fsg.data`; used by :mod:`fsg.io` and :mod:`fsg.cli`.
"""

from fsg.train.config import TrainConfig
from fsg.train.interrupt import TrainingInterrupted
from fsg.train.loop import TrainResult, evaluate, pretrain, train
from fsg.train import grid, loop

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train", "pretrain", "evaluate", "grid", "loop"]
