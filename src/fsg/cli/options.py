"""What the ``fsg`` verbs share: the one-line-error parser, argparse number types, the options of
``fsg train``/``pretrain``/``grid`` (every :class:`fsg.train.config.TrainConfig` field and the
estimators' options as flags) and the configuration those options give."""

from __future__ import annotations

import argparse
import json
import math
from typing import Dict, List, Optional

from fsg.estimators import ESTIMATORS
from fsg.optim import ADAM_VARIANTS, OPTIMIZERS
from fsg.quantizers import QUANTIZERS
from fsg.train.config import AMP_DTYPES, DATASET_NAMES, MODEL_NAMES, RESUME_CHANGEABLE, TrainConfig

__all__ = ["ESTIMATOR_FLAGS", "PRETRAIN_DEFAULTS", "Parser", "HelpFormatter", "add_train_options",
           "config_from_args", "grid_base_from_args", "parse_estimators"]


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``fsg: error: <message> (see 'fsg ... --help')``."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(str(message).split())
        self.exit(2, f"fsg: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
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


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
unit_float = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _amp(text: str) -> Optional[str]:
    """``--amp``: ``bf16`` or ``fp16`` (refused with its reason by the configuration), ``none``."""
    v = text.strip().lower()
    if v == "none":
        return None
    if v not in AMP_DTYPES:
        raise argparse.ArgumentTypeError(f"expected bf16 or none, got {text!r}")
    return v


def read_config_file(path: str) -> dict:
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


#: Defaults of ``fsg pretrain`` that differ from :class:`TrainConfig`'s.
PRETRAIN_DEFAULTS = dict(full_precision=True, optimizer="sgdm", lr=0.1, out="runs/pretrain")


def choices_or_none(options):
    """An argparse ``type``: one of ``options``, or ``none`` (-> ``None``)."""

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
    "beta": (dict(type=unit_float), "fsg: weight β of the slow gradient (default 0.9)"),
    "history": (dict(type=positive_int), "fsg (mamba slow-net): length L of the gradient history HGS "
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
    "fast_hidden": (dict(type=positive_int), "fsg: fast-net hidden width (default 100)"),
    "fast_nonlinearity": (dict(type=choices_or_none(["relu", "tanh"]), metavar="{none,relu,tanh}"),
                          "fsg: fast-net nonlinearity (default none)"),
    "d_state": (dict(type=positive_int), "fsg: Mamba state size (default 16)"),
    "d_conv": (dict(type=positive_int), "fsg: Mamba causal conv width (default 8)"),
    "expand": (dict(type=positive_int), "fsg: Mamba channels d_inner = expand (d_model = 1; default 100)"),
    "lstm_hidden": (dict(type=positive_int), "fsg: hidden size of the lstm-fc slow-net's LSTM "
                    "(default: --fast-hidden, 100)"),
    "recompute": (dict(action=argparse.BooleanOptionalAction),
                  "fsg: recompute each layer's slow-net activations in the backward pass instead of "
                  "keeping them (bounded memory; default on)"),
    "state_dtype": (dict(choices=["float32", "bfloat16", "float16"]),
                    "fsg, layout stream: dtype of the carried per-weight Mamba state; 16 bits halve it and keep "
                    "one copy (float32 arithmetic, rounded to nearest even when stored; default float32)"),
    "fast_lr": (dict(type=positive_float), "fsg: Adam lr of the fast-net (default 1e-2)"),
    "slow_lr": (dict(type=positive_float), "fsg: Adam lr of the slow-net (default 1e-3)"),
    "lre_lr": (dict(type=positive_float), "fsg: Adam lr of the layer embedding (default 1e-3)"),
    "hidden": (dict(type=positive_int), "fc-grad, multifc, lstmfc: hypernetwork hidden size (default 100)"),
    "nonlinearity": (dict(type=choices_or_none(["relu", "tanh"]), metavar="{none,relu,tanh}"),
                     "fc-grad, multifc: hypernetwork nonlinearity (default none)"),
    "meta_lr": (dict(type=positive_float), "fc-grad, multifc, lstmfc: Adam lr of the hypernetwork (default 1e-3)"),
}


def key_value(text: str):
    """An argparse ``type``: ``KEY=VALUE`` -> ``(key, value)``, the value read as JSON (else a string;
    ``none`` -> ``None``), dashes in the key as underscores."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None if value.lower() == "none" else value
    return key.strip().replace("-", "_"), parsed


def flag(name: str) -> str:
    """The flag of an option name: ``slow_net`` -> ``--slow-net``."""
    return "--" + name.replace("_", "-")


def add_train_options(p: argparse.ArgumentParser, pretrain: bool, grid: bool = False) -> None:
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
                       + ", ".join(flag(k) for k in RESUME_CHANGEABLE))
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    def opt_in(group, name, help, **kw):
        shown = dflt.get(name)
        if "default" not in help:
            help += f" (default: {'none' if shown is None else shown})"
        if "type" in kw and "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = name.upper()
        group.add_argument(flag(name), dest=name, default=S, help=help, **kw)

    if not grid:
        opt_in(g, "out", "run directory", metavar="DIR")
    opt_in(g, "epochs", "training epochs", type=positive_int)
    opt_in(g, "max_steps", "stop after this many training steps in all (then evaluate and save)", type=positive_int,
           metavar="N")
    opt_in(g, "eval_every", "evaluate on the test split every N epochs (and after the last)", type=positive_int,
           metavar="N")
    opt_in(g, "log_every", "write a step row to the metrics every N steps", type=positive_int, metavar="N")
    opt_in(g, "tensorboard", "also log to TensorBoard (<out>/tensorboard; needs tensorboardX)", **bool_kw)
    opt_in(g, "num_threads", "torch CPU threads (default: torch's)", type=positive_int, metavar="N")
    opt_in(g, "device", "torch device: cpu, cuda, cuda:1, ... (checked before anything is written)")
    opt_in(g, "amp", "mixed precision: bf16 runs the network's forward passes and the loss under torch.autocast "
           "(hypernetworks, captured gradients and optimizers stay float32); none: float32. fp16 is refused "
           "(it needs loss scaling)", type=_amp, metavar="{bf16,none}")
    opt_in(g, "nonfinite", "a step whose loss or gradients are NaN or infinite: raise = stop the run (exit 2; "
           "nothing is updated and the last checkpoint stays), skip = drop the step (the trainer stays as it was) "
           "and go on", choices=["raise", "skip"])
    opt_in(g, "max_skips", "with --nonfinite skip: stop when more than N steps in a row were skipped",
           type=nonnegative_int, metavar="N")
    opt_in(g, "save_every", "also write last.pt mid-epoch every N steps (default: at the end of every epoch, "
           "at --max-steps and on Ctrl-C/SIGTERM only)", type=positive_int, metavar="N")
    opt_in(g, "save_every_seconds", "also write last.pt mid-epoch when S seconds passed since the last checkpoint "
           "(default: none)", type=positive_float, metavar="S")
    if not grid:
        opt_in(g, "seed", "seed of the initialisation and of the data order/augmentation", type=nonnegative_int)

    g = p.add_argument_group("model and data")
    opt_in(g, "model", "network", choices=list(MODEL_NAMES))
    opt_in(g, "width", "small-cnn: channels of the first conv", type=positive_int)
    opt_in(g, "activation", "hidden nonlinearity of the model (default: relu; hardtanh with --activations, "
           "since sign() of a ReLU output is always +1)", choices=["relu", "hardtanh"])
    opt_in(g, "dataset", "dataset", choices=list(DATASET_NAMES))
    opt_in(g, "data_dir", "where the dataset lives (cifar: the official python-format files or archive; "
           "imagefolder: a directory or .tar.gz of split/class/*.jpg)", metavar="DIR")
    opt_in(g, "download", "download CIFAR when it is missing", **bool_kw)
    g.add_argument("--dataset-option", dest="dataset_option", action="append", type=key_value, default=[],
                   metavar="KEY=VALUE", help="synthetic dataset option (n_train, n_test, num_classes, channels, "
                   "size, noise, max_shift, seed); repeatable")
    opt_in(g, "train_subset", "use only a fixed random subset of N training images (the same in every run)",
           type=positive_int, metavar="N")
    opt_in(g, "val_split", "hold out N training images for validation (the same ones in every run; logged as "
           "val_loss/val_accuracy beside the test metrics)", type=positive_int, metavar="N")
    opt_in(g, "test_subset", "use only a fixed random subset of N test images (the same in every run)",
           type=positive_int, metavar="N")
    opt_in(g, "augment", "random crop + flip of training images (default: on)", **bool_kw)
    opt_in(g, "batch_size", "training batch size", type=positive_int)
    opt_in(g, "eval_batch_size", "evaluation batch size", type=positive_int)
    opt_in(g, "pretrained", "full-precision state_dict to start from (e.g. from 'fsg pretrain')", metavar="FILE")
    opt_in(g, "classifier_bn", "CIFAR ResNets: BatchNorm1d before the classifier (the FSG code's network; "
           "--no-classifier-bn: MetaQuant's)", **bool_kw)

    g = p.add_argument_group("optimisation")
    if not grid:
        opt_in(g, "optimizer", "base optimizer (sgdm: momentum 0.9, weight decay 5e-4)", choices=list(OPTIMIZERS))
    opt_in(g, "adam_variant", "Adam arithmetic: torch (m̂/(√v̂+ε), the spec's) or reference (MetaQuant's: ε added "
           "before the bias correction)", choices=list(ADAM_VARIANTS))
    opt_in(g, "lr", "base learning rate", type=positive_float)
    opt_in(g, "weight_decay", "weight decay (default: the optimizer's)", type=nonnegative_float)
    opt_in(g, "lr_step", "divide the learning rate every N epochs", type=positive_int, metavar="N")
    opt_in(g, "lr_gamma", "learning-rate factor at each step of the schedule", type=positive_float)

    if pretrain:
        return
    g = p.add_argument_group("binarization")
    if not grid:
        opt_in(g, "quantizer", "weight quantizer", choices=list(QUANTIZERS))
    opt_in(g, "bits", "dorefa bits (1 = binary)", type=positive_int)
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
        g.add_argument(flag(name), dest="est_" + name, default=S, help=help, **kw)
    g.add_argument("-E", "--estimator-option", dest="estimator_option", action="append", type=key_value, default=[],
                   metavar="KEY=VALUE", help="any other estimator option (value as JSON); repeatable")


NON_CONFIG = {"command", "func", "command_parser", "pretrain", "config", "resume", "no_progress", "json",
               "dataset_option", "estimator_option",
               # fsg grid
               "estimators", "quantizers", "optimizers", "seeds", "grid_out", "last_k", "x_axis", "report_only"}


def config_from_args(args: argparse.Namespace):
    """``(TrainConfig, resume_path or None)`` from parsed ``fsg train/pretrain`` arguments: the
    defaults (or the checkpoint's configuration when resuming), then ``--config FILE``, then the
    flags given. Raises ``ValueError`` (one line) on bad input."""
    from pathlib import Path

    from fsg.train.checkpoint import load_checkpoint

    given = {k: v for k, v in vars(args).items() if k not in NON_CONFIG and not k.startswith("est_")}
    est_given = {k[4:]: v for k, v in vars(args).items() if k.startswith("est_")}
    est_given.update(dict(getattr(args, "estimator_option", []) or []))
    ds_given = dict(args.dataset_option or [])
    file_cfg = {}
    if args.config:
        file_cfg = read_config_file(args.config)
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


def grid_base_from_args(args: argparse.Namespace) -> Dict[str, object]:
    """The base configuration (a dict of TrainConfig fields, not validated: the grid validates
    each run) of ``fsg grid``: defaults, then ``--config FILE``, then the flags given."""

    base = TrainConfig().to_dict()
    if args.config:
        file_cfg = read_config_file(args.config)
        base.update(file_cfg)
    base.update({k: v for k, v in vars(args).items() if k not in NON_CONFIG and not k.startswith("est_")})
    est_given = {k[4:]: v for k, v in vars(args).items() if k.startswith("est_")}
    est_given.update(dict(args.estimator_option or []))
    if est_given:
        base["estimator_options"] = {**(base.get("estimator_options") or {}), **est_given}
    ds_given = dict(args.dataset_option or [])
    if ds_given:
        base["dataset_options"] = {**(base.get("dataset_options") or {}), **ds_given}
    return base


def fmt_pct(x: Optional[float]) -> str:
    """A fraction as a percentage with two decimals, ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{100 * x:.2f}%"


def finite_or_none(x: float) -> Optional[float]:
    """``x``, or ``None`` when it is NaN or infinite (JSON has no such numbers)."""
    return x if math.isfinite(x) else None
