"""The ``fsg`` command line (console script ``fsg``, also ``python -m fsg``).

``fsg demo``
    Train the same small binarized CNN (:class:`fsg.models.SmallCNN`, every conv/linear weight
    binarized) on the built-in synthetic image task (:mod:`fsg.synthetic`, no download) with
    several gradient estimators, seed-matched — same initial weights and same batch order for
    each — and print their final training loss, test loss, test accuracy and time per step side
    by side. The defaults take under a minute on two CPU cores.

``fsg estimators``
    List the registered gradient estimators, quantizers and base optimizers.

``fsg train``
    Train a binarized network (every option of :class:`fsg.config.TrainConfig` is a flag, the
    estimator's options included; ``--config FILE`` reads a JSON configuration, flags override
    it). Writes ``<out>/config.json``, ``metrics.jsonl``, ``metrics.csv`` and ``last.pt`` (every
    epoch, every ``--save-every`` steps, and on Ctrl-C or SIGTERM, which exit with status 130 or
    143 after saving); ``--resume [CHECKPOINT]`` continues a run exactly. See :mod:`fsg.run`.

``fsg pretrain``
    The same loop without binarization (plain autograd; SGD with momentum, lr 0.1 by default):
    writes ``<out>/model.pt``, a ``state_dict`` for ``fsg train --pretrained``.

``fsg eval CHECKPOINT``
    Test loss and accuracy of a checkpoint (or of a run directory's ``last.pt``).

``fsg export CHECKPOINT OUT``
    Write the trained network with every binarized weight bit-packed, pickle-free (safetensors
    layout, format ``fsg-binary``); see :mod:`fsg.export`.

``fsg summary [FILE] [--model NAME ...]``
    Per-layer parameters (1-bit / 32-bit), memory, MACs and the compression ratio; see
    :mod:`fsg.summary`.

``fsg grid``
    Train a grid of runs (``--estimators`` × ``--quantizers`` × ``--optimizers`` × ``--seeds``)
    one after the other, each into ``<out>/<estimator>-<quantizer>-<optimizer>-s<seed>/``, skipping
    finished runs and resuming unfinished ones; then write ``results.md``, ``results.json`` and
    ``curves.png``. ``--report-only DIR`` rebuilds them. See :mod:`fsg.grid`.

Invalid input (an unknown estimator, a non-positive step count or learning rate, a bad option
rejected by the library) ends with one line ``fsg: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from fsg.binarize import binarize
from fsg.train.config import AMP_DTYPES, DATASET_NAMES, MODEL_NAMES, RESUME_CHANGEABLE, TrainConfig
from fsg.estimators import ESTIMATORS
from fsg.models import SmallCNN
from fsg.quantizers import QUANTIZERS
from fsg.train.loop import TrainingInterrupted
from fsg.data.synthetic import batches, make_synthetic
from fsg.optim import ADAM_VARIANTS, OPTIMIZERS
from fsg.trainer import NonFiniteError, Trainer, evaluate

__all__ = ["main", "build_parser", "run_demo", "DEMO_DEFAULTS", "DEMO_TASK", "ESTIMATOR_FLAGS", "PRETRAIN_DEFAULTS",
           "config_from_args"]

#: Defaults of ``fsg demo`` (chosen so that the three default estimators take ~20 s on two CPU
#: cores with the fused scan — FSG dominates at ~0.03 s/step — and clearly learn).
DEMO_DEFAULTS = dict(
    estimators="ste,multifc,fsg",
    quantizer="dorefa",
    optimizer="adam",
    lr=0.01,
    schedule="cosine",
    steps=500,
    batch_size=64,
    seed=0,
    width=8,
    noise=0.5,
)

#: The synthetic task of ``fsg demo`` (fixed: ``--seed`` changes the initialisation and the batch
#: order, not the data). 10 classes of 1×16×16 images; small shifts keep it learnable in ~2 epochs.
DEMO_TASK = dict(n_train=4096, n_test=1024, num_classes=10, channels=1, size=16, max_shift=1, seed=0)

#: The training loss reported is the mean over this many final steps.
TRAIN_LOSS_WINDOW = 20


# ----------------------------------------------------------------------------------------------
# argument parsing


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``fsg: error: <message> (see 'fsg ... --help')``."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(str(message).split())
        self.exit(2, f"fsg: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` for options with a meaningful default (not for flags)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _number(cast, ok, what: str):
    """An argparse ``type``: ``cast(text)`` accepted when ``ok(value)``, else one error line."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
_unit_float = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _amp(text: str) -> Optional[str]:
    """``--amp``: ``bf16`` or ``fp16`` (refused with its reason by the configuration), ``none``."""
    v = text.strip().lower()
    if v == "none":
        return None
    if v not in AMP_DTYPES:
        raise argparse.ArgumentTypeError(f"expected bf16 or none, got {text!r}")
    return v


def _read_config_file(path: str) -> dict:
    """The fields of a JSON configuration file (``config.json`` of a run); one-line errors."""
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read configuration {path!r}: {e.strerror or e}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON configuration: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a configuration must be a JSON object")
    unknown = sorted(set(cfg) - set(TrainConfig().to_dict()))
    if unknown:
        raise ValueError(f"{path}: unknown configuration field(s): {', '.join(unknown)}")
    return cfg


def parse_estimators(text: str) -> List[str]:
    """Split a comma list of estimator names; raises ``ValueError`` on an unknown or empty one."""
    from fsg.train.grid import parse_list

    return parse_list(text, "--estimators", list(ESTIMATORS))


def build_parser() -> argparse.ArgumentParser:
    """The ``fsg`` argument parser (subcommands ``demo`` and ``estimators``)."""
    from fsg import __version__

    parser = _Parser(
        prog="fsg",
        description="Binary neural networks trained with learned gradient estimators "
        "(FSG, MetaQuant FC-Grad/MultiFC/LSTMFC, STE).",
    )
    parser.add_argument("--version", action="version", version=f"fsg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = DEMO_DEFAULTS
    demo = sub.add_parser(
        "demo",
        help="train a small binarized CNN on a built-in synthetic task with several estimators "
        "and compare them (no download; well under a minute with the defaults)",
        description="Train the same binarized SmallCNN on the built-in synthetic image task with "
        "several gradient estimators, seed-matched (same initial weights, same batch order), and "
        "print final training loss (mean of the last "
        f"{TRAIN_LOSS_WINDOW} steps), test loss, test accuracy and time per step.",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--estimators", default=d["estimators"], metavar="LIST",
                      help=f"comma list of estimators, from: {', '.join(ESTIMATORS)}")
    demo.add_argument("--quantizer", default=d["quantizer"], choices=list(QUANTIZERS),
                      help="weight quantizer (1 bit)")
    demo.add_argument("--optimizer", default=d["optimizer"], choices=list(OPTIMIZERS),
                      help="base optimizer")
    demo.add_argument("--lr", type=_positive_float, default=d["lr"], help="base learning rate")
    demo.add_argument("--schedule", default=d["schedule"], choices=["cosine", "constant"],
                      help="learning-rate schedule over the run (cosine: annealed to 0)")
    demo.add_argument("--steps", type=_positive_int, default=d["steps"], help="training steps per estimator")
    demo.add_argument("--batch-size", type=_positive_int, default=d["batch_size"], help="mini-batch size")
    demo.add_argument("--seed", type=_nonnegative_int, default=d["seed"],
                      help="seed of the model initialisation and the batch order (the task itself is fixed)")
    demo.add_argument("--width", type=_positive_int, default=d["width"],
                      help="SmallCNN width (channels of the first conv)")
    demo.add_argument("--noise", type=_nonnegative_float, default=d["noise"],
                      help="pixel noise of the synthetic task (higher = harder)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    demo.set_defaults(func=_cmd_demo, command_parser=demo)

    est = sub.add_parser("estimators", help="list the registered estimators, quantizers and optimizers",
                         description="List the registered gradient estimators, quantizers and base optimizers.")
    est.set_defaults(func=_cmd_estimators, command_parser=est)

    tr = sub.add_parser(
        "train", help="train a binarized network (CIFAR ResNets, small CNN) with a gradient estimator",
        description="Train a binarized network with a gradient estimator (METHOD.md §3, §6). Writes "
        "<out>/config.json, metrics.jsonl, metrics.csv and last.pt (a checkpoint after every epoch, with "
        "--save-every also mid-epoch, and on Ctrl-C or SIGTERM, which exit with status 130 or 143); --resume "
        "continues a run exactly. Options not given "
        "come from --config FILE, else from the defaults shown.",
    )
    _add_train_options(tr, pretrain=False)
    tr.set_defaults(func=_cmd_train, command_parser=tr, pretrain=False)

    pt = sub.add_parser(
        "pretrain", help="train the full-precision network (no binarization), for --pretrained",
        description="Train the full-precision network (no binarization, plain autograd) with the same "
        "loop, logs and checkpoints as 'fsg train'. Writes <out>/model.pt, a state_dict to pass to "
        "'fsg train --pretrained'.",
    )
    _add_train_options(pt, pretrain=True)
    pt.set_defaults(func=_cmd_train, command_parser=pt, pretrain=True)

    ev = sub.add_parser("eval", help="test loss and accuracy of a checkpoint",
                        description="Evaluate the model of a checkpoint (last.pt, or a run directory) on the "
                        "test split of the dataset it was trained on.", formatter_class=_HelpFormatter)
    ev.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run directory holding last.pt")
    ev.add_argument("--data-dir", help="where the dataset lives (default: as in the checkpoint's configuration)")
    ev.add_argument("--batch-size", type=_positive_int, help="evaluation batch size")
    ev.add_argument("--test-subset", type=_positive_int, metavar="N",
                    help="only a fixed random subset of N test images")
    ev.add_argument("--device", help="torch device (default: as trained)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_cmd_eval, command_parser=ev)

    from fsg.cli import bench as _bench

    be = sub.add_parser("bench", help="benchmark FSG steps (flat, stream) against STE, and the scan against mambapy",
                        description=_bench.__doc__.split("\n\n", 1)[1] if "\n\n" in _bench.__doc__ else None,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _bench.build_parser(be)
    be.set_defaults(func=lambda args, sub: _bench.run(args), command_parser=be)
    _add_export_summary_parsers(sub)

    gr = sub.add_parser(
        "grid", help="train a grid of runs (estimators x quantizers x optimizers x seeds) and tabulate them",
        description="Train every combination of --estimators, --quantizers, --optimizers and --seeds, one "
        "after the other, each into <out>/<estimator>-<quantizer>-<optimizer>-s<seed>/ (as 'fsg train'; "
        "every other option applies to every run; an estimator option goes to the estimators that take "
        "it). Runs that finished are skipped and unfinished ones resumed from their last.pt, so running "
        "the same command again continues the grid. Then writes <out>/results.md and results.json (per "
        "estimator/quantizer/optimizer: mean ± sample std over seeds of each run's mean test accuracy "
        "over its last K evaluated epochs, and of its final training loss) and <out>/curves.png "
        "(needs matplotlib). --report-only DIR rebuilds these from existing runs.",
    )
    g = gr.add_argument_group("grid")
    g.add_argument("--estimators", metavar="LIST", help=f"comma list from: {', '.join(ESTIMATORS)} "
                   "(default: the configuration's estimator, fsg)")
    g.add_argument("--quantizers", metavar="LIST", help=f"comma list from: {', '.join(QUANTIZERS)} "
                   "(default: dorefa)")
    g.add_argument("--optimizers", metavar="LIST", help=f"comma list from: {', '.join(OPTIMIZERS)} (default: sgd)")
    g.add_argument("--seeds", metavar="LIST", help="comma list of seeds, ranges allowed: 0,1,2 or 0-4 (default: 0)")
    g.add_argument("--out", dest="grid_out", metavar="DIR", default="runs/grid",
                   help="grid directory (default: runs/grid)")
    g.add_argument("--last-k", type=_positive_int, default=10, metavar="K",
                   help="evaluations (epochs) averaged per run in the table (default: 10, MetaQuant's)")
    g.add_argument("--x-axis", choices=["step", "epoch"], default="step", help="x axis of curves.png (default: step)")
    g.add_argument("--report-only", metavar="DIR",
                   help="train nothing: rebuild DIR/results.md, results.json and curves.png from the runs in DIR")
    _add_train_options(gr, pretrain=False, grid=True)
    gr.set_defaults(func=_cmd_grid, command_parser=gr, pretrain=False, resume=None)
    return parser


# ----------------------------------------------------------------------------------------------
# fsg train / pretrain / eval

#: Defaults of ``fsg pretrain`` that differ from :class:`TrainConfig`'s.
PRETRAIN_DEFAULTS = dict(full_precision=True, optimizer="sgdm", lr=0.1, out="runs/pretrain")


def _choices_or_none(options):
    def parse(text: str):
        if text.lower() == "none":
            return None
        if text not in options:
            raise argparse.ArgumentTypeError(f"must be one of none, {', '.join(options)}, got {text!r}")
        return text
    return parse


#: Estimator options as flags: option name -> (argparse keywords, help). The option names are the
#: estimators' constructor keywords (``--slow-net`` sets ``slow_net``).
ESTIMATOR_FLAGS = {
    "beta": (dict(type=_unit_float), "fsg: weight β of the slow gradient (default 0.9)"),
    "history": (dict(type=_positive_int), "fsg (mamba slow-net): length L of the gradient history HGS "
                "(default 5; 1 = no history)"),
    "update": (dict(choices=["combined", "fast"]),
               "fsg: weight update, combined = the paper's β·G_slow + (1-β)·c·G_fast, fast = the reference "
               "code's c·G_fast (default combined)"),
    "lre": (dict(action=argparse.BooleanOptionalAction), "fsg (mamba slow-net): learned layer embedding (default on)"),
    "slow_net": (dict(choices=["mamba", "lstm-fc"]),
                 "fsg: slow-net, mamba = a Mamba block reading the gradient history (the paper), lstm-fc = "
                 "MetaQuant's LSTMFC on the pre-quantized weight, no history, no layer embedding (the paper's "
                 "LSTM ablation; --history, --lre and --layout do not apply) (default mamba)"),
    "layout": (dict(choices=["flat", "temporal", "stream"]),
               "fsg (mamba slow-net): slow-net input, flat = one sequence per layer (the paper), temporal = one "
               "per weight, stream = the temporal layout as a recurrence with per-weight state (default flat)"),
    "fast_hidden": (dict(type=_positive_int), "fsg: fast-net hidden width (default 100)"),
    "fast_nonlinearity": (dict(type=_choices_or_none(["relu", "tanh"]), metavar="{none,relu,tanh}"),
                          "fsg: fast-net nonlinearity (default none)"),
    "d_state": (dict(type=_positive_int), "fsg: Mamba state size (default 16)"),
    "d_conv": (dict(type=_positive_int), "fsg: Mamba causal conv width (default 8)"),
    "expand": (dict(type=_positive_int), "fsg: Mamba channels d_inner = expand (d_model = 1; default 100)"),
    "lstm_hidden": (dict(type=_positive_int), "fsg: hidden size of the lstm-fc slow-net's LSTM "
                    "(default: --fast-hidden, 100)"),
    "recompute": (dict(action=argparse.BooleanOptionalAction),
                  "fsg: recompute each layer's slow-net activations in the backward pass instead of "
                  "keeping them (bounded memory; default on)"),
    "state_dtype": (dict(choices=["float32", "bfloat16", "float16"]),
                    "fsg, layout stream: dtype of the carried per-weight Mamba state; 16 bits halve it and keep "
                    "one copy (float32 arithmetic, rounded to nearest even when stored; default float32)"),
    "fast_lr": (dict(type=_positive_float), "fsg: Adam lr of the fast-net (default 1e-2)"),
    "slow_lr": (dict(type=_positive_float), "fsg: Adam lr of the slow-net (default 1e-3)"),
    "lre_lr": (dict(type=_positive_float), "fsg: Adam lr of the layer embedding (default 1e-3)"),
    "hidden": (dict(type=_positive_int), "fc-grad, multifc, lstmfc: hypernetwork hidden size (default 100)"),
    "nonlinearity": (dict(type=_choices_or_none(["relu", "tanh"]), metavar="{none,relu,tanh}"),
                     "fc-grad, multifc: hypernetwork nonlinearity (default none)"),
    "meta_lr": (dict(type=_positive_float), "fc-grad, multifc, lstmfc: Adam lr of the hypernetwork (default 1e-3)"),
}


def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None if value.lower() == "none" else value
    return key.strip().replace("-", "_"), parsed


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_options(p: argparse.ArgumentParser, pretrain: bool, grid: bool = False) -> None:
    """The options of ``fsg train`` (``pretrain``: those of ``fsg pretrain``; ``grid``: those of
    ``fsg grid``, without ``--resume``, ``--out``, ``--seed``, ``--quantizer``, ``--optimizer`` and
    ``--estimator``, which the grid sets per run)."""
    S = argparse.SUPPRESS
    dflt = TrainConfig().to_dict()
    if pretrain:
        dflt.update(PRETRAIN_DEFAULTS)

    bool_kw = dict(action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("run")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="JSON configuration (as written to <out>/config.json); flags override its values")
    if not grid:
        p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                       help="continue a run from CHECKPOINT (default: <out>/last.pt; a run directory also works) "
                       "with the checkpoint's configuration; only these may change: "
                       + ", ".join(_flag(k) for k in RESUME_CHANGEABLE))
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    def opt_in(group, name, help, **kw):
        shown = dflt.get(name)
        if "default" not in help:
            help += f" (default: {'none' if shown is None else shown})"
        if "type" in kw and "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = name.upper()
        group.add_argument(_flag(name), dest=name, default=S, help=help, **kw)

    if not grid:
        opt_in(g, "out", "run directory", metavar="DIR")
    opt_in(g, "epochs", "training epochs", type=_positive_int)
    opt_in(g, "max_steps", "stop after this many training steps in all (then evaluate and save)", type=_positive_int,
           metavar="N")
    opt_in(g, "eval_every", "evaluate on the test split every N epochs (and after the last)", type=_positive_int,
           metavar="N")
    opt_in(g, "log_every", "write a step row to the metrics every N steps", type=_positive_int, metavar="N")
    opt_in(g, "tensorboard", "also log to TensorBoard (<out>/tensorboard; needs tensorboardX)", **bool_kw)
    opt_in(g, "num_threads", "torch CPU threads (default: torch's)", type=_positive_int, metavar="N")
    opt_in(g, "device", "torch device: cpu, cuda, cuda:1, ... (checked before anything is written)")
    opt_in(g, "amp", "mixed precision: bf16 runs the network's forward passes and the loss under torch.autocast "
           "(hypernetworks, captured gradients and optimizers stay float32); none: float32. fp16 is refused "
           "(it needs loss scaling)", type=_amp, metavar="{bf16,none}")
    opt_in(g, "nonfinite", "a step whose loss or gradients are NaN or infinite: raise = stop the run (exit 2; "
           "nothing is updated and the last checkpoint stays), skip = drop the step (the trainer stays as it was) "
           "and go on", choices=["raise", "skip"])
    opt_in(g, "max_skips", "with --nonfinite skip: stop when more than N steps in a row were skipped",
           type=_nonnegative_int, metavar="N")
    opt_in(g, "save_every", "also write last.pt mid-epoch every N steps (default: at the end of every epoch, "
           "at --max-steps and on Ctrl-C/SIGTERM only)", type=_positive_int, metavar="N")
    opt_in(g, "save_every_seconds", "also write last.pt mid-epoch when S seconds passed since the last checkpoint "
           "(default: none)", type=_positive_float, metavar="S")
    if not grid:
        opt_in(g, "seed", "seed of the initialisation and of the data order/augmentation", type=_nonnegative_int)

    g = p.add_argument_group("model and data")
    opt_in(g, "model", "network", choices=list(MODEL_NAMES))
    opt_in(g, "width", "small-cnn: channels of the first conv", type=_positive_int)
    opt_in(g, "activation", "hidden nonlinearity of the model (default: relu; hardtanh with --activations, "
           "since sign() of a ReLU output is always +1)", choices=["relu", "hardtanh"])
    opt_in(g, "dataset", "dataset", choices=list(DATASET_NAMES))
    opt_in(g, "data_dir", "where the dataset lives (cifar: the official python-format files or archive; "
           "imagefolder: a directory or .tar.gz of split/class/*.jpg)", metavar="DIR")
    opt_in(g, "download", "download CIFAR when it is missing", **bool_kw)
    g.add_argument("--dataset-option", dest="dataset_option", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE", help="synthetic dataset option (n_train, n_test, num_classes, channels, "
                   "size, noise, max_shift, seed); repeatable")
    opt_in(g, "train_subset", "use only a fixed random subset of N training images (the same in every run)",
           type=_positive_int, metavar="N")
    opt_in(g, "val_split", "hold out N training images for validation (the same ones in every run; logged as "
           "val_loss/val_accuracy beside the test metrics)", type=_positive_int, metavar="N")
    opt_in(g, "test_subset", "use only a fixed random subset of N test images (the same in every run)",
           type=_positive_int, metavar="N")
    opt_in(g, "augment", "random crop + flip of training images (default: on)", **bool_kw)
    opt_in(g, "batch_size", "training batch size", type=_positive_int)
    opt_in(g, "eval_batch_size", "evaluation batch size", type=_positive_int)
    opt_in(g, "pretrained", "full-precision state_dict to start from (e.g. from 'fsg pretrain')", metavar="FILE")
    opt_in(g, "classifier_bn", "CIFAR ResNets: BatchNorm1d before the classifier (the FSG code's network; "
           "--no-classifier-bn: MetaQuant's)", **bool_kw)

    g = p.add_argument_group("optimisation")
    if not grid:
        opt_in(g, "optimizer", "base optimizer (sgdm: momentum 0.9, weight decay 5e-4)", choices=list(OPTIMIZERS))
    opt_in(g, "adam_variant", "Adam arithmetic: torch (m̂/(√v̂+ε), the spec's) or reference (MetaQuant's: ε added "
           "before the bias correction)", choices=list(ADAM_VARIANTS))
    opt_in(g, "lr", "base learning rate", type=_positive_float)
    opt_in(g, "weight_decay", "weight decay (default: the optimizer's)", type=_nonnegative_float)
    opt_in(g, "lr_step", "divide the learning rate every N epochs", type=_positive_int, metavar="N")
    opt_in(g, "lr_gamma", "learning-rate factor at each step of the schedule", type=_positive_float)

    if pretrain:
        return
    g = p.add_argument_group("binarization")
    if not grid:
        opt_in(g, "quantizer", "weight quantizer", choices=list(QUANTIZERS))
    opt_in(g, "bits", "dorefa bits (1 = binary)", type=_positive_int)
    opt_in(g, "keep_first", "keep the first conv in full precision", **bool_kw)
    opt_in(g, "keep_last", "keep the classifier in full precision", **bool_kw)
    opt_in(g, "activations", "also binarize activations (sign, clipped STE)", **bool_kw)

    g = p.add_argument_group("estimator")
    if not grid:
        opt_in(g, "estimator", "gradient estimator", choices=list(ESTIMATORS))
    opt_in(g, "update_on_observe", "also update the weights in the observe step 0", **bool_kw)
    for name, (kw, help) in ESTIMATOR_FLAGS.items():
        if "type" in kw and "metavar" not in kw and "choices" not in kw:
            kw = dict(kw, metavar=name.upper())
        g.add_argument(_flag(name), dest="est_" + name, default=S, help=help, **kw)
    g.add_argument("-E", "--estimator-option", dest="estimator_option", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE", help="any other estimator option (value as JSON); repeatable")


_NON_CONFIG = {"command", "func", "command_parser", "pretrain", "config", "resume", "no_progress", "json",
               "dataset_option", "estimator_option",
               # fsg grid
               "estimators", "quantizers", "optimizers", "seeds", "grid_out", "last_k", "x_axis", "report_only"}


def config_from_args(args: argparse.Namespace):
    """``(TrainConfig, resume_path or None)`` from parsed ``fsg train/pretrain`` arguments: the
    defaults (or the checkpoint's configuration when resuming), then ``--config FILE``, then the
    flags given. Raises ``ValueError`` (one line) on bad input."""
    from pathlib import Path

    from fsg.train.checkpoint import load_checkpoint

    given = {k: v for k, v in vars(args).items() if k not in _NON_CONFIG and not k.startswith("est_")}
    est_given = {k[4:]: v for k, v in vars(args).items() if k.startswith("est_")}
    est_given.update(dict(getattr(args, "estimator_option", []) or []))
    ds_given = dict(args.dataset_option or [])
    file_cfg = {}
    if args.config:
        file_cfg = _read_config_file(args.config)
        if args.pretrain:
            file_cfg["full_precision"] = True

    resume = None
    if args.resume is not None:
        if args.resume:
            resume = Path(args.resume)
        else:
            out = given.get("out") or file_cfg.get("out") or (PRETRAIN_DEFAULTS["out"] if args.pretrain
                                                             else TrainConfig.out)
            resume = Path(out) / "last.pt"
        if resume.is_dir():
            resume = resume / "last.pt"
        base = dict(load_checkpoint(resume)["config"])
        if "out" not in given and "out" not in file_cfg:
            base["out"] = str(resume.parent)
        if bool(base.get("full_precision")) != bool(args.pretrain):
            raise ValueError(f"{str(resume)!r} is a checkpoint of 'fsg {'pretrain' if base.get('full_precision') else 'train'}'"
                             f", not of 'fsg {'pretrain' if args.pretrain else 'train'}'")
        base.update(file_cfg)
    else:
        base = TrainConfig().to_dict()
        if args.pretrain:
            base.update(PRETRAIN_DEFAULTS)
        base.update(file_cfg)
    base.update(given)
    if est_given:
        base["estimator_options"] = {**(base.get("estimator_options") or {}), **est_given}
    if ds_given:
        base["dataset_options"] = {**(base.get("dataset_options") or {}), **ds_given}
    return TrainConfig.from_dict(base), resume


def _fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fsg.train.loop import train

    cfg, resume = config_from_args(args)
    progress = not args.no_progress and sys.stderr.isatty()
    result = train(cfg, resume=resume, progress=progress)
    summary = {
        "out": str(result.out), "checkpoint": str(result.checkpoint), "epochs": result.epochs,
        "steps": result.steps, "stopped": result.stopped, "test_loss": _finite_or_none(result.test_loss)
        if result.test_loss is not None else None, "test_accuracy": result.test_accuracy,
    }
    if cfg.full_precision:
        summary["model"] = str(result.out / "model.pt")
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
        return 0
    loss = "n/a" if result.test_loss is None else f"{result.test_loss:.4f}"
    line = (f"{'pretrained' if cfg.full_precision else 'trained'} {result.steps} steps ({result.epochs} epochs) "
            f"in {result.out}: test loss {loss}, test accuracy {_fmt_pct(result.test_accuracy)}; "
            f"checkpoint {result.checkpoint}")
    if cfg.full_precision:
        line += f"; weights for --pretrained: {result.out / 'model.pt'}"
    print(line)
    return 0


def _cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fsg.train.loop import evaluate as evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.data_dir, batch_size=args.batch_size,
                            test_subset=args.test_subset, device=args.device)
    if args.json:
        print(json.dumps({k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in r.items()},
                         indent=2, allow_nan=False))
    else:
        print(f"{r['checkpoint']} (epoch {r['epoch']}, step {r['step']}): test loss {r['loss']:.4f}, "
              f"test accuracy {_fmt_pct(r['accuracy'])} on {r['images']} images")
    return 0


def _grid_base_from_args(args: argparse.Namespace) -> Dict[str, object]:
    """The base configuration (a dict of TrainConfig fields, not validated: the grid validates
    each run) of ``fsg grid``: defaults, then ``--config FILE``, then the flags given."""

    base = TrainConfig().to_dict()
    if args.config:
        file_cfg = _read_config_file(args.config)
        base.update(file_cfg)
    base.update({k: v for k, v in vars(args).items() if k not in _NON_CONFIG and not k.startswith("est_")})
    est_given = {k[4:]: v for k, v in vars(args).items() if k.startswith("est_")}
    est_given.update(dict(args.estimator_option or []))
    if est_given:
        base["estimator_options"] = {**(base.get("estimator_options") or {}), **est_given}
    ds_given = dict(args.dataset_option or [])
    if ds_given:
        base["dataset_options"] = {**(base.get("dataset_options") or {}), **ds_given}
    return base


def _cmd_grid(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fsg.train.grid import format_markdown, run_grid, write_report

    if args.report_only is not None:
        given = [k[4:] if k.startswith("est_") else k for k in vars(args) if k not in _NON_CONFIG]  # train options
        given += [k for k in ("config", "dataset_option", "estimator_option", "estimators", "quantizers",
                              "optimizers", "seeds") if getattr(args, k)]
        if args.grid_out != "runs/grid":
            given.append("out")
        if given:
            raise ValueError(f"--report-only trains nothing: it takes only --last-k, --x-axis and --json "
                             f"(got {', '.join(_flag(k) for k in given)})")
        report = write_report(args.report_only, last_k=args.last_k, x_axis=args.x_axis)
        out = args.report_only
    else:
        progress = not args.no_progress and sys.stderr.isatty()
        report = run_grid(args.grid_out, args.estimators, args.quantizers, args.optimizers, args.seeds,
                          config=_grid_base_from_args(args), last_k=args.last_k, x_axis=args.x_axis,
                          progress=progress)
        out = args.grid_out
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        return 0
    print(format_markdown(report), end="")
    files = ["results.md", "results.json"] + (["curves.png"] if report.get("curves") else [])
    print(f"\nwrote {', '.join(os.path.join(out, f) for f in files)}")
    return 0


# ----------------------------------------------------------------------------------------------
# fsg demo


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _cosine(lr: float, step: int, steps: int) -> float:
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))


def _train_one(name: str, *, train, test, quantizer: str, optimizer: str, lr: float, schedule: str,
               steps: int, batch_size: int, seed: int, width: int, progress: bool) -> Dict[str, object]:
    torch.manual_seed(seed)  # same initial CNN (and hypernetwork init) for every estimator
    model = binarize(SmallCNN(in_channels=train.x.shape[1], num_classes=train.num_classes, width=width), quantizer)
    trainer = Trainer(model, name, optimizer=optimizer, lr=lr)
    order = torch.Generator().manual_seed(seed)  # same batch order for every estimator

    losses: List[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"{name:>8s}", file=sys.stderr, leave=True)
    elapsed = 0.0
    try:
        while len(losses) < steps:
            for x, y in batches(train, batch_size, generator=order):
                if schedule == "cosine":
                    for group in trainer.optimizer.param_groups:
                        group["lr"] = _cosine(lr, len(losses), steps)
                t0 = time.perf_counter()
                result = trainer.step(x, y)
                elapsed += time.perf_counter() - t0
                losses.append(result.loss)
                if bar is not None:
                    window = losses[-TRAIN_LOSS_WINDOW:]
                    bar.set_postfix(loss=f"{sum(window) / len(window):.3f}", refresh=False)
                    bar.update(1)
                if len(losses) >= steps:
                    break
    finally:
        if bar is not None:
            bar.close()

    test_loss, test_acc = evaluate(model, batches(test, 512, shuffle=False))
    window = losses[-TRAIN_LOSS_WINDOW:]
    return {
        "train_loss": sum(window) / len(window),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "sec_per_step": elapsed / steps,
        "steps": steps,
    }


def run_demo(estimators: Sequence[str] = ("ste", "multifc", "fsg"), *, quantizer: str = "dorefa",
             optimizer: str = "adam", lr: float = 0.01, schedule: str = "cosine", steps: int = 500,
             batch_size: int = 64, seed: int = 0, width: int = 8, noise: float = 0.5,
             progress: bool = False) -> Dict[str, object]:
    """Run the demo comparison (``estimators``: names, or a comma list); returns ``{"config": {...}, "results": {name: {...}}}``.

    Each result has ``train_loss`` (mean of the last :data:`TRAIN_LOSS_WINDOW` steps),
    ``test_loss``, ``test_accuracy`` (in [0, 1]), ``sec_per_step`` and ``time_vs_ste`` (the
    ratio of ``sec_per_step`` to STE's, ``None`` without an STE run). Raises ``ValueError`` for
    invalid options.
    """
    if isinstance(estimators, str):
        estimators = parse_estimators(estimators)
    estimators = list(estimators)
    if not estimators:
        raise ValueError("no estimator to run")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    for label, value in (("steps", steps), ("batch_size", batch_size), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    train, test = make_synthetic(noise=noise, **DEMO_TASK)
    results: Dict[str, Dict[str, object]] = {}
    t_start = time.perf_counter()
    for name in estimators:
        results[name] = _train_one(
            name, train=train, test=test, quantizer=quantizer, optimizer=optimizer, lr=lr,
            schedule=schedule, steps=steps, batch_size=batch_size, seed=seed, width=width, progress=progress,
        )
    ste = results.get("ste", {}).get("sec_per_step")
    for r in results.values():
        r["time_vs_ste"] = r["sec_per_step"] / ste if ste else None
    config = dict(
        estimators=list(estimators), model=f"SmallCNN(width={width})", quantizer=quantizer, bits=1,
        optimizer=optimizer, lr=lr, schedule=schedule, steps=steps, batch_size=batch_size, seed=seed,
        width=width, task=dict(DEMO_TASK, noise=noise), train_loss_window=min(TRAIN_LOSS_WINDOW, steps),
        torch_threads=torch.get_num_threads(),
    )
    return {"config": config, "results": results, "wall_time_s": time.perf_counter() - t_start}


def _fmt(x: Optional[float], spec: str) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    return format(x, ".3e" if abs(x) >= 1e4 else spec)


def format_table(report: Dict[str, object]) -> str:
    """The demo's report as a plain-text table."""
    c = report["config"]
    t = c["task"]
    lines = [
        f"fsg demo: {c['model']}, {c['quantizer']} 1-bit weights (all layers), "
        f"{c['optimizer']} lr={c['lr']:g} ({c['schedule']}), {c['steps']} steps x batch {c['batch_size']}, "
        f"seed {c['seed']}",
        f"task: synthetic {t['num_classes']}-class {t['channels']}x{t['size']}x{t['size']} images, "
        f"{t['n_train']} train / {t['n_test']} test, noise {t['noise']:g}, shift +-{t['max_shift']} "
        f"(chance accuracy {100 / t['num_classes']:.0f}%)",
        "",
        f"{'estimator':<10} {'train loss':>10} {'test loss':>10} {'test acc':>9} {'s/step':>9} {'x STE':>7}",
        "-" * 60,
    ]
    for name, r in report["results"].items():
        acc = r["test_accuracy"]
        lines.append(
            f"{name:<10} {_fmt(r['train_loss'], '.4f'):>10} {_fmt(r['test_loss'], '.4f'):>10} "
            f"{_fmt(None if acc is None else 100 * acc, '.1f') + '%':>9} "
            f"{_fmt(r['sec_per_step'], '.4f'):>9} {_fmt(r['time_vs_ste'], '.1f'):>7}"
        )
    lines += [
        "",
        f"train loss: mean of the last {c['train_loss_window']} steps; s/step: wall time of a training step "
        f"({c['torch_threads']} torch threads); total {report['wall_time_s']:.1f} s",
    ]
    return "\n".join(lines)


def _jsonable(report: Dict[str, object]) -> Dict[str, object]:
    def fix(v):
        if isinstance(v, float):
            return _finite_or_none(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return fix(report)


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        names = parse_estimators(args.estimators)
    except ValueError as e:
        parser.error(str(e))
    progress = not args.no_progress and sys.stderr.isatty()
    report = run_demo(
        names, quantizer=args.quantizer, optimizer=args.optimizer, lr=args.lr, schedule=args.schedule,
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, width=args.width, noise=args.noise,
        progress=progress,
    )
    if args.json:
        print(json.dumps(_jsonable(report), indent=2, allow_nan=False))
    else:
        print(format_table(report))
    return 0


# ----------------------------------------------------------------------------------------------
# fsg estimators


def _summary(cls) -> str:
    """First paragraph of a class docstring, on one line, without RST double backquotes."""
    doc = (cls.__doc__ or "").strip()
    first = doc.split("\n\n")[0] if doc else "(no description)"
    return " ".join(first.split()).replace("``", "")


def _cmd_estimators(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = ["estimators (--estimators):"]
    width = max(map(len, list(ESTIMATORS) + list(QUANTIZERS))) + 2
    for name, cls in ESTIMATORS.items():
        out.append(f"  {name:<{width}}{_summary(cls)}")
    out.append("")
    out.append("quantizers (--quantizer):")
    for name, cls in QUANTIZERS.items():
        out.append(f"  {name:<{width}}{_summary(cls)}")
    out.append("")
    out.append(f"optimizers (--optimizer): {', '.join(OPTIMIZERS)}")
    print("\n".join(out))
    return 0


# ----------------------------------------------------------------------------------------------
# fsg export / fsg summary


def _add_export_summary_parsers(sub) -> None:
    """The ``export`` and ``summary`` subcommands."""
    ex = sub.add_parser(
        "export", help="write a trained binary network bit-packed (1 bit per weight) in a pickle-free file",
        description="Write the model of a checkpoint (last.pt, or a run directory) with every binarized weight "
        "bit-packed (1 bit per weight plus one scale per layer) and every other tensor in full precision, as a "
        "safetensors file with fsg metadata (format fsg-binary; fsg.load_exported reads it back). No dataset "
        "is needed.", formatter_class=_HelpFormatter)
    ex.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run directory holding last.pt")
    ex.add_argument("output", metavar="OUT", help="the file to write (e.g. model.safetensors; replaced atomically)")
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.set_defaults(func=_cmd_export, command_parser=ex)

    su = sub.add_parser(
        "summary", help="per-layer parameters, memory and MACs of a (binarized) model",
        description="Per-layer table (binarized or not, 1-bit and 32-bit parameters, memory, multiply-"
        "accumulates) with totals and the compression ratio against full precision, of a checkpoint, run "
        "directory or exported file, or of a built-in model binarized with the options given.",
        formatter_class=_HelpFormatter)
    su.add_argument("source", nargs="?", metavar="CHECKPOINT_OR_EXPORTED_FILE",
                    help="a checkpoint, run directory or 'fsg export' file (or use --model)")
    su.add_argument("--model", choices=list(MODEL_NAMES), help="a built-in network instead of a file")
    su.add_argument("--num-classes", type=_positive_int, help="--model: classes (default 10)")
    su.add_argument("--in-channels", type=_positive_int, help="--model small-cnn: input channels (default 1)")
    su.add_argument("--width", type=_positive_int, help="--model small-cnn: channels of the first conv (default 8)")
    su.add_argument("--quantizer", choices=list(QUANTIZERS), help="--model: weight quantizer (default dorefa)")
    su.add_argument("--bits", type=_positive_int, help="--model: dorefa bits (default 1)")
    su.add_argument("--keep-first", action="store_true", help="--model: keep the first conv in full precision")
    su.add_argument("--keep-last", action="store_true", help="--model: keep the classifier in full precision")
    su.add_argument("--activations", action="store_true", help="--model: also binarize activations (1W1A)")
    su.add_argument("--full-precision", action="store_true", help="--model: do not binarize")
    su.add_argument("--input-size", metavar="C,H,W", help="one input sample's size (default: 3,32,32 for the "
                    "ResNets, in_channels,16,16 for small-cnn)")
    su.add_argument("--json", action="store_true", help="print one JSON object")
    su.set_defaults(func=_cmd_summary, command_parser=su)


def _cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fsg.io.export import export_checkpoint, read_exported

    path = export_checkpoint(args.checkpoint, args.output)
    exp = read_exported(path)
    size = path.stat().st_size
    n_bits = sum(math.prod(r["shape"]) for r in exp.layers)
    packed = sum(exp.tensors[t].numel() * exp.tensors[t].element_size() for r in exp.layers
                 for t in r["tensors"].values())
    info = {"output": str(path), "bytes": size, "arch": exp.arch, "binarized_layers": len(exp.layers),
            "binarized_weights": n_bits, "packed_bytes": packed, "float32_bytes_of_binarized": 4 * n_bits,
            "activations": exp.binary_activations, "source": exp.source}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {path} ({size:,} bytes): {len(exp.layers)} binarized layers, {n_bits:,} weights in "
              f"{packed:,} bytes ({4 * n_bits:,} as float32)")
    return 0


def _cmd_summary(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fsg.models import get_model
    from fsg.io.summary import summary

    size = None
    if args.input_size:
        try:
            size = tuple(int(v) for v in args.input_size.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"--input-size must be comma-separated integers like 3,32,32, got {args.input_size!r}") from None
        if any(v < 1 for v in size):
            raise ValueError(f"--input-size must be positive integers, got {args.input_size!r}")
    model_flags = [f for f in ("num_classes", "in_channels", "width", "quantizer", "bits", "keep_first", "keep_last",
                               "activations", "full_precision") if getattr(args, f) not in (None, False)]
    if args.source is not None:
        if args.model is not None or model_flags:
            raise ValueError(f"a {args.source!r} file brings its own model: drop "
                             + ", ".join(_flag(f) for f in (["model"] if args.model else []) + model_flags))
        result = summary(args.source, size)
    else:
        if args.model is None:
            raise ValueError("give a checkpoint, run directory or exported file, or --model NAME")
        kwargs = {"num_classes": args.num_classes or 10}
        if args.model == "small-cnn":
            kwargs.update(in_channels=args.in_channels or 1, width=args.width or 8)
        elif args.in_channels not in (None, 3) or args.width is not None:
            raise ValueError(f"--in-channels and --width are small-cnn options ({args.model} takes 3 channels)")
        if args.activations:  # as fsg train builds it: sign() of a ReLU output would be constant
            kwargs["activation"] = "hardtanh"
        model = get_model(args.model, **kwargs)
        if args.full_precision:
            if any(f in model_flags for f in ("quantizer", "bits", "keep_first", "keep_last", "activations")):
                raise ValueError("--full-precision excludes the binarization options")
        else:
            binarize(model, args.quantizer or "dorefa", bits=args.bits or 1, keep_first=args.keep_first,
                     keep_last=args.keep_last, activations=args.activations)
        result = summary(model, size)
        result.model = f"{result.model} ({args.model})"
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result)
    return 0


# ----------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fsg`` command; returns the exit status (errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: demo, estimators, train, pretrain, eval, export, summary, grid, bench")
    sub = args.command_parser  # its errors point at "fsg <command> --help"
    try:
        return args.func(args, sub)
    except ValueError as e:  # bad options rejected by the library: one clean line, not a traceback
        sub.error(str(e))
    except TrainingInterrupted as e:  # a checkpoint was saved: say where and how to resume
        print(e.message, file=sys.stderr)
        return 128 + e.signum  # 130 after Ctrl-C, 143 after SIGTERM
    except NonFiniteError as e:  # a NaN/Inf step under --nonfinite raise: nothing updated or saved
        print(f"fsg: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fsg demo | head -3`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as e:  # unwritable run directory, full disk, ...: one line, no usage hint
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        sub.exit(2, f"fsg: error: {' '.join(str(e.strerror or e).split())}{where}\n")
    except RuntimeError as e:  # missing or bad data (fsg.data.DataError): one line
        from fsg.data import DataError

        if isinstance(e, DataError):
            sub.error(str(e))
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
