"""The ``fsg`` command line (console script ``fsg``, also ``python -m fsg``).

``fsg demo``
    Train the same small binarized CNN (:class:`fsg.models.SmallCNN`, every conv/linear weight
    binarized) on the built-in synthetic image task (:mod:`fsg.data.synthetic`, no download) with
    several gradient estimators, seed-matched — same initial weights and same batch order for
    each — and print their final training loss, test loss, test accuracy and time per step side
    by side. The defaults take under a minute on two CPU cores.

``fsg estimators``
    List the registered gradient estimators, quantizers and base optimizers.

``fsg train``
    Train a binarized network (every option of :class:`fsg.train.config.TrainConfig` is a flag, the
    estimator's options included; ``--config FILE`` reads a JSON configuration, flags override
    it). Writes ``<out>/config.json``, ``metrics.jsonl``, ``metrics.csv`` and ``last.pt`` (every
    epoch, every ``--save-every`` steps, and on Ctrl-C or SIGTERM, which exit with status 130 or
    143 after saving); ``--resume [CHECKPOINT]`` continues a run exactly. See :mod:`fsg.train.loop`.

``fsg pretrain``
    The same loop without binarization (plain autograd; SGD with momentum, lr 0.1 by default):
    writes ``<out>/model.pt``, a ``state_dict`` for ``fsg train --pretrained``.

``fsg eval CHECKPOINT``
    Test loss and accuracy of a checkpoint (or of a run directory's ``last.pt``).

``fsg export CHECKPOINT OUT``
    Write the trained network with every binarized weight bit-packed, pickle-free (safetensors
    layout, format ``fsg-binary``); see :mod:`fsg.io.export`.

``fsg summary [FILE] [--model NAME ...]``
    Per-layer parameters (1-bit / 32-bit), memory, MACs and the compression ratio; see
    :mod:`fsg.io.summary`.

``fsg grid``
    Train a grid of runs (``--estimators`` × ``--quantizers`` × ``--optimizers`` × ``--seeds``)
    one after the other, each into ``<out>/<estimator>-<quantizer>-<optimizer>-s<seed>/``, skipping
    finished runs and resuming unfinished ones; then write ``results.md``, ``results.json`` and
    ``curves.png``. ``--report-only DIR`` rebuilds them. See :mod:`fsg.train.grid`.

Invalid input (an unknown estimator, a non-positive step count or learning rate, a bad option
rejected by the library) ends with one line ``fsg: error: ...`` on stderr and exit status 2.

One module per verb: :mod:`fsg.cli.demo`, :mod:`fsg.cli.estimators`, :mod:`fsg.cli.train` (train,
pretrain, eval), :mod:`fsg.cli.export` (export, summary), :mod:`fsg.cli.grid`, :mod:`fsg.cli.bench`;
:mod:`fsg.cli.options` holds what they share, :mod:`fsg.cli.app` the parser and :func:`main`.
"""

from fsg.cli.app import main

__all__ = ["main"]
