"""The configuration of a training run (``fsg train`` / ``fsg pretrain``), as one dataclass.

:class:`TrainConfig` holds every option of a run. It round-trips through plain dicts and JSON
(:meth:`TrainConfig.to_dict`, :meth:`TrainConfig.from_dict`, :meth:`TrainConfig.to_json`,
:meth:`TrainConfig.from_json`, :meth:`TrainConfig.load`, :meth:`TrainConfig.save`); a run writes
it to ``<out>/config.json`` and into every checkpoint. :meth:`TrainConfig.validate` checks it and
raises :class:`ValueError` with a one-line message naming the bad field; the estimator options
are validated by the estimator's options dataclass (:func:`fsg.estimators.check_options`), which
builds nothing and draws no random number.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

__all__ = ["TrainConfig", "MODEL_NAMES", "DATASET_NAMES", "RESUME_CHANGEABLE", "AMP_DTYPES", "estimator_option_names",
           "estimator_takes_any_option", "parse_device", "require_device", "amp_dtype"]

MODEL_NAMES = ("small-cnn", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "synthetic")

#: Fields that may differ between a checkpoint's configuration and the one given when resuming
#: (they change neither the model, the data order nor the optimisation up to the resume point).
RESUME_CHANGEABLE = (
    "epochs", "max_steps", "out", "data_dir", "download", "eval_every", "log_every", "tensorboard",
    "num_threads", "eval_batch_size", "device", "nonfinite", "max_skips", "save_every", "save_every_seconds",
)


#: ``TrainConfig.amp`` values (autocast of the main network; ``fp16`` is refused, see :func:`amp_dtype`).
AMP_DTYPES = ("bf16", "fp16")


def parse_device(device) -> "torch.device":
    """``torch.device(device)``, or ``ValueError`` with one line when the string names no device."""
    import torch

    try:
        if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
            raise TypeError
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None


def require_device(device) -> "torch.device":
    """The parsed ``device`` if this process can use it, else ``ValueError`` with one line saying
    why and what to use instead: a CUDA device needs a GPU visible to PyTorch (and an index below
    ``torch.cuda.device_count()``); other non-CPU devices must accept a tensor."""
    import torch

    dev = parse_device(device)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else f"torch {torch.__version__} with CUDA {torch.version.cuda}, but no GPU or driver was found")
            raise ValueError(f"--device {device}: no CUDA GPU is visible to PyTorch ({why}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: PyTorch sees {n} CUDA GPU{'s' if n != 1 else ''} "
                             f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}); use one of them or --device cpu")
        return dev
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # noqa: BLE001 - any backend's refusal, as one line
        msg = " ".join(str(e).split())[:120]
        raise ValueError(f"--device {device}: not usable here ({type(e).__name__}: {msg}); use --device cpu") from None
    return dev


def amp_dtype(amp: Optional[str]):
    """The autocast dtype of ``TrainConfig.amp``: ``None`` (no autocast) or ``torch.bfloat16``.
    ``"fp16"`` raises ``ValueError``: float16 gradients need loss scaling (a GradScaler), which the
    look-ahead step (∂L/∂Ŵ captured for the hypernetworks, their meta step) does not do."""
    import torch

    if amp is None:
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        raise ValueError("amp fp16 needs loss scaling, which fsg does not do; use bf16")
    raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} (or none), got {amp!r}")


def estimator_option_names(name: str):
    """Keyword options accepted by the registered estimator ``name`` (its options dataclass's fields)."""
    from fsg.estimators import option_names

    return option_names(name)


def estimator_takes_any_option(name: str) -> bool:
    """Whether the registered estimator ``name`` takes options it does not declare (an estimator
    registered without an options dataclass whose constructor has ``**kwargs``)."""
    from fsg.estimators import takes_any_option

    return takes_any_option(name)


@dataclass
class TrainConfig:
    """Every option of a training run. Defaults follow the paper's setting (METHOD.md §6).

    Model and data:
        model: ``small-cnn`` or ``resnet20/32/44/56/110`` (CIFAR ResNets).
        width: channels of the first conv of ``small-cnn`` (ignored by the ResNets).
        activation: the models' hidden nonlinearity, ``relu`` or ``hardtanh`` (``None``: ``relu``,
            or ``hardtanh`` with ``activations`` — ``sign`` after a ReLU would be constant).
        dataset: ``cifar10``, ``cifar100``, ``imagefolder`` or ``synthetic``.
        data_dir: where the dataset lives (``None``: the data module's default).
        download: download the dataset when it is missing.
        dataset_options: keyword options of the ``synthetic`` dataset (``n_train``, ``n_test``,
            ``num_classes``, ``channels``, ``size``, ``noise``, ``max_shift``, ``seed``).
        val_split: hold out N training images as a validation split (a fixed random choice, the
            same for every run whatever its seed; never trained on, never augmented), evaluated
            with the test split and logged as ``val_loss``/``val_accuracy``: model selection
            without the test set.
        train_subset / test_subset: use only a fixed random subset of N images of a split (quick runs;
            seed 0, the same subset in every run).
        augment: random crop + flip on training batches (``None``: the data loader's default).
        pretrained: path of a full-precision ``state_dict`` loaded before binarization.
        classifier_bn: CIFAR ResNets: a BatchNorm1d before the classifier (the FSG code's network);
            ``False``: MetaQuant's ResNet (pool → linear).
    Binarization:
        full_precision: do not binarize (``fsg pretrain``); the estimator is then unused.
        quantizer: ``dorefa``, ``bwn`` or ``sign``; bits: dorefa bits (1 = binary).
        keep_first / keep_last: keep the first / last conv-or-linear layer in full precision.
        activations: also binarize the activations (sign + clipped STE), off in the paper.
    Estimator:
        estimator: a registered estimator name; estimator_options: its keyword options.
        update_on_observe: also update the weights (STE gradients) in the observe step 0.
    Optimisation:
        optimizer: ``sgd``, ``sgdm`` or ``adam``; adam_variant: ``torch`` (the spec's Adam) or
        ``reference`` (MetaQuant's, ε before the bias correction; :mod:`fsg.optim`);
        lr: base learning rate; weight_decay: ``None``
        for the optimizer's default; lr divided by ``1/lr_gamma`` every ``lr_step`` epochs.
        epochs; max_steps: stop after this many steps in all (final checkpoint + evaluation).
        batch_size; eval_batch_size; seed.
    Output:
        out: run directory (config.json, metrics.jsonl, metrics.csv, last.pt, TensorBoard logs).
        eval_every: evaluate on the test split every this many epochs (and after the last);
        log_every: write a step row every this many steps; tensorboard: also write TensorBoard.
        num_threads: torch CPU threads (``None``: leave torch's setting); device: torch device
        (checked when the run starts: :func:`require_device`).
        amp: ``"bf16"``: the main network's forward passes (plain and look-ahead) and the loss run
        under ``torch.autocast(device, bfloat16)``; hypernetworks, captured gradients and
        optimizers stay float32 (``None``: no autocast; ``"fp16"`` is refused, :func:`amp_dtype`).
    Reliability:
        nonfinite: a step whose loss or gradients hold a NaN or an infinity: ``"raise"`` stops the
        run (nothing updated, no checkpoint written), ``"skip"`` drops the step and goes on;
        max_skips: with ``"skip"``, stop when more than this many steps in a row were skipped
        (:class:`fsg.trainer.Trainer`).
        save_every: also write ``last.pt`` mid-epoch every this many steps; save_every_seconds:
        ... and whenever this many seconds passed since the last checkpoint (``None``: only at
        the end of every epoch, when ``max_steps`` stops the run and on Ctrl-C/SIGTERM).
    """

    # model and data
    model: str = "resnet20"
    width: int = 8
    activation: Optional[str] = None
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    download: bool = False
    dataset_options: Dict[str, Any] = field(default_factory=dict)
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    val_split: Optional[int] = None
    augment: Optional[bool] = None
    pretrained: Optional[str] = None
    classifier_bn: bool = True
    # binarization
    full_precision: bool = False
    quantizer: str = "dorefa"
    bits: int = 1
    keep_first: bool = False
    keep_last: bool = False
    activations: bool = False
    # estimator
    estimator: str = "fsg"
    estimator_options: Dict[str, Any] = field(default_factory=dict)
    update_on_observe: bool = False
    # optimisation
    optimizer: str = "sgd"
    adam_variant: str = "torch"
    lr: float = 1e-3
    weight_decay: Optional[float] = None
    lr_step: int = 30
    lr_gamma: float = 0.1
    epochs: int = 100
    max_steps: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    # output
    out: str = "runs/train"
    eval_every: int = 1
    log_every: int = 50
    tensorboard: bool = False
    num_threads: Optional[int] = None
    device: str = "cpu"
    amp: Optional[str] = None
    # reliability
    nonfinite: str = "raise"
    max_skips: int = 10
    save_every: Optional[int] = None
    save_every_seconds: Optional[float] = None

    # ------------------------------------------------------------------------------------------
    @property
    def model_activation(self) -> str:
        """The nonlinearity the model is built with: ``activation``, else ``hardtanh`` when the
        activations are binarized (``sign`` of a ReLU output is constant) and ``relu`` otherwise."""
        if self.activation is not None:
            return self.activation
        return "hardtanh" if self.activations and not self.full_precision else "relu"

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (JSON-able) of every field."""
        d = dataclasses.asdict(self)
        d["estimator_options"] = dict(self.estimator_options)
        d["dataset_options"] = dict(self.dataset_options)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any], validate: bool = True) -> "TrainConfig":
        """Build from a dict; unknown keys and badly typed values raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"a configuration must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown configuration field(s): {', '.join(unknown)}")
        cfg = cls(**{k: (dict(v) if k in ("estimator_options", "dataset_options") and isinstance(v, dict) else v) for k, v in data.items()})
        if validate:
            cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, validate: bool = True) -> "TrainConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON configuration: {e}") from None
        return cls.from_dict(data, validate=validate)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], validate: bool = True) -> "TrainConfig":
        """Read a JSON configuration file (one-line ``ValueError`` when it is missing or bad)."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read configuration {str(path)!r}: {e.strerror or e}") from None
        try:
            return cls.from_json(text, validate=validate)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the JSON configuration atomically."""
        from fsg.files import atomic_write_text

        atomic_write_text(path, self.to_json())

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every field; raises ``ValueError`` with one line naming the first bad one."""
        from fsg.estimators import check_options

        self._check_model_and_data()
        self._check_binarization()
        self._check_estimator()
        self._check_optimisation()
        self._check_output()
        self._check_reliability()
        if not self.full_precision:
            check_options(self.estimator, self.estimator_options)  # builds nothing, draws no random number
        return self

    def _check_model_and_data(self) -> None:
        """Check the model and data fields (model ... classifier_bn)."""
        from fsg.models import ACTIVATIONS

        _check_choice(self, "model", MODEL_NAMES)
        _check_integer(self, "width", 1)
        if self.activation is not None:
            _check_choice(self, "activation", tuple(ACTIVATIONS))
        _check_choice(self, "dataset", DATASET_NAMES)
        _check_string(self, "data_dir", optional=True)
        _check_boolean(self, "download")
        self._check_dataset_options()
        _check_integer(self, "train_subset", 1, optional=True)
        _check_integer(self, "test_subset", 1, optional=True)
        _check_integer(self, "val_split", 1, optional=True)
        _check_boolean(self, "augment", optional=True)
        _check_string(self, "pretrained", optional=True)
        _check_boolean(self, "classifier_bn")

    def _check_binarization(self) -> None:
        """Check the binarization fields (full_precision, quantizer, bits, keep_first/last, activations)."""
        from fsg.quantizers import QUANTIZERS

        _check_boolean(self, "full_precision")
        _check_choice(self, "quantizer", tuple(QUANTIZERS))
        _check_integer(self, "bits", 1)
        if self.bits > 16:
            raise ValueError(f"bits must be at most 16, got {self.bits}")
        _check_boolean(self, "keep_first")
        _check_boolean(self, "keep_last")
        _check_boolean(self, "activations")

    def _check_estimator(self) -> None:
        """Check the estimator's name, that its options are a dict, and update_on_observe."""
        from fsg.estimators import ESTIMATORS

        _check_choice(self, "estimator", tuple(ESTIMATORS))
        if not isinstance(self.estimator_options, dict):
            raise ValueError(f"estimator_options must be a JSON object, got {self.estimator_options!r}")
        _check_boolean(self, "update_on_observe")

    def _check_optimisation(self) -> None:
        """Check the optimisation fields (optimizer ... seed)."""
        from fsg.optim import ADAM_VARIANTS, OPTIMIZERS

        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_choice(self, "adam_variant", ADAM_VARIANTS)
        _check_number(self, "lr", 0, low_open=True)
        _check_number(self, "weight_decay", 0, optional=True)
        _check_integer(self, "lr_step", 1)
        _check_number(self, "lr_gamma", 0, 1, low_open=True)
        _check_integer(self, "epochs", 1)
        _check_integer(self, "max_steps", 1, optional=True)
        _check_integer(self, "batch_size", 1)
        _check_integer(self, "eval_batch_size", 1)
        _check_integer(self, "seed", 0)

    def _check_output(self) -> None:
        """Check the output fields (out, eval/log cadence, tensorboard, threads, device, amp)."""
        _check_string(self, "out")
        _check_integer(self, "eval_every", 1)
        _check_integer(self, "log_every", 1)
        _check_boolean(self, "tensorboard")
        _check_integer(self, "num_threads", 1, optional=True)
        _check_string(self, "device")
        parse_device(self.device)
        amp_dtype(self.amp)

    def _check_reliability(self) -> None:
        """Check the reliability fields (nonfinite, max_skips, save_every, save_every_seconds)."""
        from fsg.trainer import NONFINITE_POLICIES

        _check_choice(self, "nonfinite", NONFINITE_POLICIES)
        _check_integer(self, "max_skips", 0)
        _check_integer(self, "save_every", 1, optional=True)
        _check_number(self, "save_every_seconds", 0, low_open=True, optional=True)

    def _check_dataset_options(self) -> None:
        opts = self.dataset_options
        if not isinstance(opts, dict):
            raise ValueError(f"dataset_options must be a JSON object, got {opts!r}")
        if not opts:
            return
        if self.dataset != "synthetic":
            raise ValueError(f"dataset_options apply to the synthetic dataset only (dataset is {self.dataset!r})")
        from fsg.data.synthetic import make_synthetic

        accepted = list(inspect.signature(make_synthetic).parameters)
        bad = sorted(k for k in opts if k not in accepted)
        if bad:
            raise ValueError(f"unknown synthetic dataset option(s) {', '.join(map(str, bad))} (it takes: {', '.join(accepted)})")
        for k, v in opts.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"synthetic dataset option {k} must be a number, got {v!r}")
            if k != "noise" and not isinstance(v, int):
                raise ValueError(f"synthetic dataset option {k} must be an integer, got {v!r}")


# ----------------------------------------------------------------------------------------------
# field checks of TrainConfig.validate: each raises a one-line ValueError naming the field


def _check_choice(cfg: TrainConfig, name: str, options) -> None:
    """The field ``name`` must be one of ``options``."""
    v = getattr(cfg, name)
    if v not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {v!r}")


def _check_integer(cfg: TrainConfig, name: str, low: int, optional: bool = False) -> None:
    """The field ``name`` must be an integer (not a bool) >= ``low`` (or ``None`` when ``optional``)."""
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def _check_number(cfg: TrainConfig, name: str, low=None, high=None, low_open: bool = False,
                  optional: bool = False) -> None:
    """The field ``name`` must be a finite number in the given range (or ``None`` when ``optional``)."""
    v = getattr(cfg, name)
    if optional and v is None:
        return
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v <= high
    if not ok:
        rng = ("> " if low_open else ">= ") + str(low) if low is not None else "finite"
        if high is not None:
            rng += f" and <= {high}"
        raise ValueError(f"{name} must be a number {rng}, got {v!r}")


def _check_boolean(cfg: TrainConfig, name: str, optional: bool = False) -> None:
    """The field ``name`` must be true or false (or ``None`` when ``optional``)."""
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")


def _check_string(cfg: TrainConfig, name: str, optional: bool = False) -> None:
    """The field ``name`` must be a non-empty string (or ``None`` when ``optional``)."""
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty string, got {v!r}")
