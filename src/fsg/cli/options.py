"""What the ``fsg`` verbs share: the one-line-error parser, argparse number types, the options of
``fsg train``/``pretrain``/``grid`` (every :class:`fsg.train.config.TrainConfig` field and the
estimators' options as flags) and the configuration those options give."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fsg.estimators import ESTIMATORS
from fsg.optim import ADAM_VARIANTS, OPTIMIZERS
from fsg.quantizers import QUANTIZERS
from fsg.train.config import AMP_DTYPES, DATASET_NAMES, MODEL_NAMES, RESUME_CHANGEABLE, TrainConfig

__all__ = ["ESTIMATOR_FLAGS", "estimator_flags", "PRETRAIN_DEFAULTS", "Parser", "HelpFormatter", "add_train_options",
           "config_from_args", "config_dict_from_args", "merge_config", "parse_estimators"]


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


def flag_kwargs(spec) -> dict:
    """The argparse keywords of an estimator option (an :class:`fsg.estimators.OptionSpec`): its
    kind and allowed values as ``type``/``choices``/``action``."""
    if spec.kind == "bool":
        return dict(action=argparse.BooleanOptionalAction)
    if spec.kind == "choice":
        names = [c for c in spec.choices if c is not None]
        if None in spec.choices:
            return dict(type=choices_or_none(names), metavar="{" + ",".join(["none"] + names) + "}")
        return dict(choices=names)
    if spec.kind == "int":
        return dict(type=positive_int if spec.low == 1 else nonnegative_int if spec.low == 0 else int)
    if spec.low == 0 and spec.low_open and spec.high is None:
        return dict(type=positive_float)
    if (spec.low, spec.high) == (0, 1) and not spec.low_open:
        return dict(type=unit_float)
    return dict(type=float)


def flag_default(spec) -> str:
    """An option's default as the help shows it: ``on``/``off``, ``none``, ``mamba``, ``0.9``."""
    if spec.default is None:
        return spec.default_text or "none"
    if isinstance(spec.default, bool):
        return "on" if spec.default else "off"
    return str(spec.default)


def estimator_flags() -> Dict[str, tuple]:
    """Estimator options as flags, from the registered estimators' option dataclasses: option name
    -> (argparse keywords, help). An option several estimators take has one flag; its help names
    them, grouped by help text and default (``fc-grad, multifc: ... (default 100); lstmfc: ...``).
    ``--slow-net`` sets ``slow_net``."""
    from fsg.estimators import estimator_config

    by_name: Dict[str, list] = {}
    for est in ESTIMATORS:
        config = estimator_config(est)
        for spec in config.specs() if config is not None else []:
            by_name.setdefault(spec.name, []).append((est, spec))
    flags = {}
    for name, uses in by_name.items():
        groups: Dict[tuple, List[str]] = {}
        for est, spec in uses:
            groups.setdefault((spec.help, flag_default(spec)), []).append(est)
        help = "; ".join(f"{', '.join(ests)}: {h} (default {d})" for (h, d), ests in groups.items())
        flags[name] = (flag_kwargs(uses[0][1]), help.replace("%", "%%"))
    return flags


#: The flags of the built-in estimators' options (:func:`estimator_flags`, which ``fsg train``
#: calls when it builds its parser, so that estimators registered later get flags too).
ESTIMATOR_FLAGS = estimator_flags()


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
    opt_in = _field_option_adder(default_config(pretrain))
    run = p.add_argument_group("run")
    _add_general_options(p, grid)
    _add_run_options(run, opt_in, grid)
    _add_model_and_data_options(p.add_argument_group("model and data"), opt_in)
    _add_optimisation_options(p.add_argument_group("optimisation"), opt_in, grid)
    if pretrain:
        return
    _add_binarization_options(p.add_argument_group("binarization"), opt_in, grid)
    _add_estimator_options(p.add_argument_group("estimator"), opt_in, grid)


_BOOL = dict(action=argparse.BooleanOptionalAction)


def _field_option_adder(dflt: Dict[str, object]):
    """A function adding the flag of a configuration field to a group (default suppressed, help with its default)."""

    def opt_in(group, name, help, **kw):
        shown = dflt.get(name)
        if "default" not in help:
            help += f" (default: {'none' if shown is None else shown})"
        if "type" in kw and "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = name.upper()
        group.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, help=help, **kw)

    return opt_in


def _add_general_options(p: argparse.ArgumentParser, grid: bool) -> None:
    """Add --config, --resume (not for the grid), --no-progress and --json."""
    p.add_argument("--config", metavar="FILE", default=None,
                   help="JSON configuration (as written to <out>/config.json); flags override its values")
    if not grid:
        p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                       help="continue a run from CHECKPOINT (default: <out>/last.pt; a run directory also works) "
                       "with the checkpoint's configuration; only these may change: "
                       + ", ".join(flag(k) for k in RESUME_CHANGEABLE))
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _add_run_options(g, opt_in, grid: bool) -> None:
    """Add the "run" group: output, length, evaluation, logging, device, precision, reliability, seed."""
    if not grid:
        opt_in(g, "out", "run directory", metavar="DIR")
    opt_in(g, "epochs", "training epochs", type=positive_int)
    opt_in(g, "max_steps", "stop after this many training steps in all (then evaluate and save)", type=positive_int,
           metavar="N")
    opt_in(g, "eval_every", "evaluate on the test split every N epochs (and after the last)", type=positive_int,
           metavar="N")
    opt_in(g, "log_every", "write a step row to the metrics every N steps", type=positive_int, metavar="N")
    opt_in(g, "tensorboard", "also log to TensorBoard (<out>/tensorboard; needs tensorboardX)", **_BOOL)
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


def _add_model_and_data_options(g, opt_in) -> None:
    """Add the "model and data" group: network, dataset, subsets and splits, batch sizes, pre-trained weights."""
    opt_in(g, "model", "network", choices=list(MODEL_NAMES))
    opt_in(g, "width", "small-cnn: channels of the first conv", type=positive_int)
    opt_in(g, "activation", "hidden nonlinearity of the model (default: relu; hardtanh with --activations, "
           "since sign() of a ReLU output is always +1)", choices=["relu", "hardtanh"])
    opt_in(g, "dataset", "dataset", choices=list(DATASET_NAMES))
    opt_in(g, "data_dir", "where the dataset lives (cifar: the official python-format files or archive; "
           "imagefolder: a directory or .tar.gz of split/class/*.jpg)", metavar="DIR")
    opt_in(g, "download", "download CIFAR when it is missing", **_BOOL)
    g.add_argument("--dataset-option", dest="dataset_option", action="append", type=key_value, default=[],
                   metavar="KEY=VALUE", help="synthetic dataset option (n_train, n_test, num_classes, channels, "
                   "size, noise, max_shift, seed); repeatable")
    opt_in(g, "train_subset", "use only a fixed random subset of N training images (the same in every run)",
           type=positive_int, metavar="N")
    opt_in(g, "val_split", "hold out N training images for validation (the same ones in every run; logged as "
           "val_loss/val_accuracy beside the test metrics)", type=positive_int, metavar="N")
    opt_in(g, "test_subset", "use only a fixed random subset of N test images (the same in every run)",
           type=positive_int, metavar="N")
    opt_in(g, "augment", "random crop + flip of training images (default: on)", **_BOOL)
    opt_in(g, "batch_size", "training batch size", type=positive_int)
    opt_in(g, "eval_batch_size", "evaluation batch size", type=positive_int)
    opt_in(g, "pretrained", "full-precision state_dict to start from (e.g. from 'fsg pretrain')", metavar="FILE")
    opt_in(g, "classifier_bn", "CIFAR ResNets: BatchNorm1d before the classifier (the FSG code's network; "
           "--no-classifier-bn: MetaQuant's)", **_BOOL)


def _add_optimisation_options(g, opt_in, grid: bool) -> None:
    """Add the "optimisation" group: optimizer (not for the grid), Adam variant, learning rate and its schedule."""
    if not grid:
        opt_in(g, "optimizer", "base optimizer (sgdm: momentum 0.9, weight decay 5e-4)", choices=list(OPTIMIZERS))
    opt_in(g, "adam_variant", "Adam arithmetic: torch (m̂/(√v̂+ε), the spec's) or reference (MetaQuant's: ε added "
           "before the bias correction)", choices=list(ADAM_VARIANTS))
    opt_in(g, "lr", "base learning rate", type=positive_float)
    opt_in(g, "weight_decay", "weight decay (default: the optimizer's)", type=nonnegative_float)
    opt_in(g, "lr_step", "divide the learning rate every N epochs", type=positive_int, metavar="N")
    opt_in(g, "lr_gamma", "learning-rate factor at each step of the schedule", type=positive_float)


def _add_binarization_options(g, opt_in, grid: bool) -> None:
    """Add the "binarization" group: quantizer (not for the grid), bits, layers kept, binarized activations."""
    if not grid:
        opt_in(g, "quantizer", "weight quantizer", choices=list(QUANTIZERS))
    opt_in(g, "bits", "dorefa bits (1 = binary)", type=positive_int)
    opt_in(g, "keep_first", "keep the first conv in full precision", **_BOOL)
    opt_in(g, "keep_last", "keep the classifier in full precision", **_BOOL)
    opt_in(g, "activations", "also binarize activations (sign, clipped STE)", **_BOOL)


def _add_estimator_options(g, opt_in, grid: bool) -> None:
    """Add the "estimator" group: estimator (not for the grid), update_on_observe, every estimator option, -E."""
    if not grid:
        opt_in(g, "estimator", "gradient estimator", choices=list(ESTIMATORS))
    opt_in(g, "update_on_observe", "also update the weights in the observe step 0", **_BOOL)
    for name, (kw, help) in estimator_flags().items():
        if "type" in kw and "metavar" not in kw and "choices" not in kw:
            kw = dict(kw, metavar=name.upper())
        g.add_argument(flag(name), dest="est_" + name, default=argparse.SUPPRESS, help=help, **kw)
    g.add_argument("-E", "--estimator-option", dest="estimator_option", action="append", type=key_value, default=[],
                   metavar="KEY=VALUE", help="any other estimator option (value as JSON); repeatable")


#: The configuration fields (:class:`TrainConfig`'s); a train option's ``dest`` is its field.
CONFIG_FIELDS = frozenset(TrainConfig().to_dict())

#: The fields that are dicts of options: a layer adds to them key by key instead of replacing them.
OPTION_DICTS = ("estimator_options", "dataset_options")


def default_config(pretrain: bool = False) -> Dict[str, object]:
    """The defaults of ``fsg train`` (``pretrain``: of ``fsg pretrain``) as configuration fields."""
    cfg = TrainConfig().to_dict()
    if pretrain:
        cfg.update(PRETRAIN_DEFAULTS)
    return cfg


def merge_config(base: Dict[str, object], *layers: Dict[str, object]) -> Dict[str, object]:
    """``base`` with each layer over it in turn, later layers winning field by field; the option
    dicts (:data:`OPTION_DICTS`) merge key by key. ``base`` is not changed."""
    cfg = dict(base)
    for layer in layers:
        for key, value in layer.items():
            if key in OPTION_DICTS:
                value = {**(cfg.get(key) or {}), **(value or {})}
            cfg[key] = value
    return cfg


def given_options(args: argparse.Namespace) -> Dict[str, object]:
    """The configuration fields set by the flags given on the command line (the train options
    default to ``argparse.SUPPRESS``, so a flag not given is absent): the estimator flags and
    ``-E`` go into ``estimator_options``, ``--dataset-option`` into ``dataset_options``."""
    given = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS}
    est = {k[4:]: v for k, v in vars(args).items() if k.startswith("est_")}
    est.update(dict(getattr(args, "estimator_option", None) or []))
    datasets = dict(getattr(args, "dataset_option", None) or [])
    if est:
        given["estimator_options"] = est
    if datasets:
        given["dataset_options"] = datasets
    return given


def command_line_layers(args: argparse.Namespace) -> List[Dict[str, object]]:
    """What the command line puts over the defaults (or a resumed checkpoint's configuration), in
    order: the ``--config FILE`` fields (``fsg pretrain``: with ``full_precision`` forced on),
    then the flags given (:func:`given_options`)."""
    layers = [read_config_file(args.config) if args.config else {}]
    if getattr(args, "pretrain", False):
        layers.append({"full_precision": True})
    return layers + [given_options(args)]


def config_dict_from_args(args: argparse.Namespace) -> Dict[str, object]:
    """The configuration of parsed ``fsg train``/``pretrain``/``grid`` arguments as a dict of
    fields, not validated (``fsg grid`` validates each run): defaults < ``--config FILE`` < flags."""
    return merge_config(default_config(getattr(args, "pretrain", False)), *command_line_layers(args))


def resume_path(resume: str, out: str) -> Path:
    """The checkpoint ``--resume [CHECKPOINT]`` names: CHECKPOINT (a run directory: its
    ``last.pt``), or ``<out>/last.pt`` when none is given."""
    path = Path(resume) if resume else Path(out) / "last.pt"
    return path / "last.pt" if path.is_dir() else path


def checkpoint_config(path: Path, pretrain: bool) -> Dict[str, object]:
    """The configuration a checkpoint was written with (read without its tensors), its ``out``
    the checkpoint's directory; a ``ValueError`` when it is not a checkpoint of this verb."""
    from fsg.train.checkpoint import read_config

    cfg = read_config(path)
    cfg["out"] = str(path.parent)
    if bool(cfg.get("full_precision")) != bool(pretrain):
        made, asked = ("pretrain" if x else "train" for x in (cfg.get("full_precision"), pretrain))
        raise ValueError(f"{str(path)!r} is a checkpoint of 'fsg {made}', not of 'fsg {asked}'")
    return cfg


def config_from_args(args: argparse.Namespace) -> Tuple[TrainConfig, Optional[Path]]:
    """``(TrainConfig, resume_path or None)`` from parsed ``fsg train/pretrain`` arguments: the
    defaults (the checkpoint's configuration when resuming) < ``--config FILE`` < the flags given
    (:func:`merge_config`). Raises ``ValueError`` (one line) on bad input."""
    layers = command_line_layers(args)
    cfg = merge_config(default_config(args.pretrain), *layers)
    if args.resume is None:
        return TrainConfig.from_dict(cfg), None
    resume = resume_path(args.resume, cfg["out"])
    return TrainConfig.from_dict(merge_config(checkpoint_config(resume, args.pretrain), *layers)), resume


def fmt_pct(x: Optional[float]) -> str:
    """A fraction as a percentage with two decimals, ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{100 * x:.2f}%"


def finite_or_none(x: float) -> Optional[float]:
    """``x``, or ``None`` when it is NaN or infinite (JSON has no such numbers)."""
    return x if math.isfinite(x) else None
