"""The training loop behind ``fsg train`` and ``fsg pretrain``: data, model, schedule, logging,
checkpoints, exact resume.

:func:`train` runs a :class:`~fsg.config.TrainConfig`::

    data      load_dataset(train/test) → DataLoader (per-epoch shuffling/augmentation from (seed, epoch))
    model     get_model → load_pretrained (optional) → binarize (unless full_precision) → Trainer
    schedule  lr × lr_gamma every lr_step epochs (torch StepLR, stepped once per epoch)
    loop      epochs × batches, a tqdm bar on stderr (running loss and accuracy of the epoch)
    logging   <out>/metrics.jsonl and <out>/metrics.csv (same rows; appended and flushed):
              "step" rows every log_every steps (means over the window), "epoch" rows (train
              loss/accuracy, test loss/accuracy, lr, times), a "final" row when max_steps stops a
              run mid-epoch; optional TensorBoard (tensorboardX) under <out>/tensorboard
    checkpoint <out>/last.pt after every epoch, when max_steps stops the run, on Ctrl-C and SIGTERM,
              and mid-epoch every save_every steps / save_every_seconds seconds (see
              :mod:`fsg.checkpoint` for its content); never of non-finite values; <out>/config.json;
              for full-precision runs also <out>/model.pt, a plain state_dict for
              :func:`fsg.models.load_pretrained`

**The run directory** is locked (:class:`fsg.runlock.RunLock`, ``<out>/.lock``) by rank 0 from
before its first write there to the end of the run: a second run on it stops with one line,
having written nothing; the holder removes the temporaries of interrupted saves it finds there.

**Resume** (``train(config, resume=path)``) rebuilds everything from the checkpoint — trainer
(model, hypernetworks, HGS and LSTM states, optimizers, the recorded ∂L/∂Ŵ and W̃, every
parameter's ``.grad``), data position, schedule, metrics history, random number generators — so
the continued run is step for step identical to an uninterrupted one (same losses, same
weights). Metric rows written after the checkpoint by the interrupted process are dropped.

**Ctrl-C or SIGTERM** (``kill``, a container stop) while a training step or the end-of-epoch
bookkeeping runs is deferred until it is complete (a second one aborts at once, without saving);
elsewhere (data loading, evaluation) it acts at once. The checkpoint then holds the state after
the last completed step and :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised with
a one-line message saying where it is and how to resume; the ``fsg`` command prints it and exits
with status 130 after Ctrl-C, 143 after SIGTERM (128 + the signal number, the shell convention).

**Non-finite steps** (:class:`fsg.trainer.NonFiniteError`, ``nonfinite="raise"``) stop the run
before anything is updated or saved: ``last.pt`` keeps the last good state.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsg import distributed as dist
from fsg.binarize import binarize
from fsg.files import atomic_write_text
from fsg.train.checkpoint import (CheckpointError, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from fsg.train.config import RESUME_CHANGEABLE, TrainConfig, amp_dtype, require_device
from fsg.models import SmallCNN, get_model, load_pretrained
from fsg.train.runlock import RunLock, remove_stale_temporaries
from fsg.optim import make_optimizer
from fsg.trainer import (NonFiniteError, StepResult, Trainer, _accuracy, _StepSnapshot, all_finite, autocast_context,
                      average_over_ranks, check_autocast_dtype, check_nonfinite_policy, evaluate as evaluate_model,
                      nonfinite_names, reject_step)

__all__ = [
    "train", "pretrain", "evaluate", "TrainResult", "TrainingInterrupted", "FullPrecisionTrainer",
    "build_data", "build_model", "build_trainer", "MetricsLog", "METRIC_COLUMNS",
]

PathLike = Union[str, os.PathLike]

#: Columns of ``metrics.csv`` (every row kind; empty where a field does not apply).
METRIC_COLUMNS = (
    "kind", "epoch", "step", "loss", "accuracy", "lr", "train_loss", "train_accuracy", "test_loss",
    "test_accuracy", "epoch_time", "eval_time", "elapsed",
)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C or SIGTERM; ``checkpoint`` is the path written
    (``None`` when the interrupt came inside a step and no consistent state could be saved),
    ``message`` one line saying where the run stopped and how to resume it, ``signum`` the signal
    (``signal.SIGINT`` for Ctrl-C and for a ``KeyboardInterrupt`` from elsewhere, or
    ``signal.SIGTERM``): the ``fsg`` command exits with ``128 + signum``, 130 or 143."""

    def __init__(self, message: str, checkpoint: Optional[Path], step: int, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message, self.checkpoint, self.step, self.signum = message, checkpoint, step, int(signum)


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out: Path
    checkpoint: Path
    epochs: int                       # epochs completed
    steps: int                        # training steps completed
    test_loss: Optional[float]
    test_accuracy: Optional[float]
    history: List[Dict[str, Any]] = field(default_factory=list)
    stopped: str = "epochs"           # "epochs", "max_steps" or "done" (nothing left to train)
    losses: List[float] = field(default_factory=list)   # per-step losses of this call


# ----------------------------------------------------------------------------------------------
# building blocks


class FullPrecisionTrainer:
    """Plain autograd training of an unbinarized model (``fsg pretrain``), with the interface
    of :class:`~fsg.trainer.Trainer` that the loop uses (``step``, ``lr``, ``optimizer``,
    ``step_count``, ``state_dict``/``load_state_dict``)."""

    def __init__(self, model: nn.Module, optimizer: str = "sgdm", lr: float = 0.1,
                 weight_decay: Optional[float] = None, loss_fn=None, autocast_dtype: Optional[torch.dtype] = None,
                 nonfinite: str = "raise", max_skips: int = 10):
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self.nonfinite, self.max_skips = check_nonfinite_policy(nonfinite, max_skips)
        self.skipped = self.skipped_in_a_row = 0
        self.model = model
        self.optimizer = make_optimizer(optimizer, model.parameters(), lr, weight_decay=weight_decay)
        self.loss_fn = loss_fn or F.cross_entropy
        self.step_count = 0
        self.distributed = dist.is_distributed()
        if self.distributed:
            dist.broadcast_(list(model.parameters()) + list(model.buffers()))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        self.model.train()
        lr = self.lr
        before = _StepSnapshot(list(self.model.parameters()), [], list(self.model.buffers()), None, False)
        device = next(self.model.parameters()).device
        with autocast_context(device, self.autocast_dtype):
            out = self.model(x)
            loss = self.loss_fn(out if self.autocast_dtype is None else out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value, acc, samples = loss.detach(), _accuracy(out.detach(), y), int(y.shape[0])
        if self.distributed:
            loss_value, acc, samples = average_over_ranks(self.model, [], loss_value, acc, samples)
        # the non-finite check before the update (as fsg.trainer.Trainer.step)
        checked = [(("gradient of", n), p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        checked += [(("buffer", n), b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        if not Trainer._finite(loss_value, checked):
            culprits = nonfinite_names(checked)
            before.restore()
            return reject_step(self, loss_value, culprits, lr, acc, samples)
        self.skipped_in_a_row = 0
        self.optimizer.step()
        self.step_count += 1
        return StepResult(float(loss_value), acc, lr, self.step_count - 1, samples)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step_count": self.step_count, "estimator_name": None,
                "skipped": {"total": self.skipped, "in_a_row": self.skipped_in_a_row}}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("model", "optimizer", "step_count") if k not in state]
        if missing:
            raise ValueError(f"trainer state lacks {', '.join(missing)}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(" ".join(str(e).split())) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        skipped = state.get("skipped") or {}
        self.skipped, self.skipped_in_a_row = int(skipped.get("total", 0)), int(skipped.get("in_a_row", 0))


def _subset(ds, n: Optional[int]):
    """A fixed random subset of ``n`` samples (the same for every run: seed 0), in the original
    order. Image folders and CIFAR files are ordered by class or not at all, so a prefix could
    hold a single class."""
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return dataclasses.replace(ds, images=ds.images[idx], labels=ds.labels[idx])


def split_validation(ds, n: int):
    """``(train, val)``: ``n`` images of ``ds`` drawn at random with a fixed generator (seed 0),
    so every run holds out the same ones whatever its own seed; both keep the original order."""
    if n >= len(ds):
        raise ValueError(f"val_split must be smaller than the training set ({len(ds)} images), got {n}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    pick = lambda idx: dataclasses.replace(ds, images=ds.images[idx], labels=ds.labels[idx])
    return pick(perm[n:].sort().values), pick(perm[:n].sort().values)


def build_data(cfg: TrainConfig, splits: Tuple[str, ...] = ("train", "test")):
    """``{split: (dataset, loader)}`` for the configuration (train: shuffled, augmented per
    ``cfg.augment``; test: in order, never augmented). With ``cfg.val_split`` (and "train" in
    ``splits``) also ``"val"``: images held out of the training split (:func:`split_validation`,
    before ``train_subset`` is drawn from the rest), in order, never augmented."""
    from fsg.data import DataLoader, load_dataset

    out = {}
    for split in splits:
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, split=split, download=cfg.download,
                          **(cfg.dataset_options if cfg.dataset == "synthetic" else {}))
        shard = dict(rank=dist.rank(), world_size=dist.world_size())  # one process: rank 0 of 1
        if split == "train" and cfg.val_split is not None:
            ds, val = split_validation(ds, cfg.val_split)
            out["val"] = (val, DataLoader(val, cfg.eval_batch_size, train=False, device=cfg.device, **shard))
        ds = _subset(ds, cfg.train_subset if split == "train" else cfg.test_subset)
        if len(ds) == 0:
            raise ValueError(f"the {split} split of {cfg.dataset!r} is empty")
        if split == "train":
            loader = DataLoader(ds, cfg.batch_size, train=True, seed=cfg.seed, augment=cfg.augment, device=cfg.device,
                                **shard)
        else:
            loader = DataLoader(ds, cfg.eval_batch_size, train=False, device=cfg.device, **shard)
        out[split] = (ds, loader)
    return out


def build_model(cfg: TrainConfig, dataset, *, pretrained: bool = True, log: Callable[[str], None] = None) -> nn.Module:
    """The model for ``dataset`` (channels, classes): built, pre-trained weights loaded (when
    ``cfg.pretrained`` and ``pretrained``), binarized (unless ``cfg.full_precision``), moved to
    ``cfg.device``."""
    channels = int(dataset.images.shape[1])
    classes = len(dataset.classes)
    if cfg.model == "small-cnn":
        model: nn.Module = SmallCNN(in_channels=channels, num_classes=classes, width=cfg.width,
                                    activation=cfg.model_activation)
    else:
        if channels != 3:
            raise ValueError(f"{cfg.model} takes 3-channel images; the {cfg.dataset} data has {channels} "
                             "(for the synthetic dataset pass channels=3 in its options)")
        model = get_model(cfg.model, num_classes=classes, activation=cfg.model_activation,
                          classifier_bn=cfg.classifier_bn)
    if cfg.pretrained and pretrained:
        fresh = load_pretrained(model, cfg.pretrained)
        if log is not None:
            note = f" (not in the file, initialised fresh: {', '.join(fresh)})" if fresh else ""
            log(f"fsg: loaded pre-trained weights {cfg.pretrained}{note}")
    if not cfg.full_precision:
        binarize(model, cfg.quantizer, bits=cfg.bits, keep_first=cfg.keep_first, keep_last=cfg.keep_last,
                 activations=cfg.activations)
    return model.to(cfg.device)


def build_trainer(cfg: TrainConfig, model: nn.Module):
    """The :class:`~fsg.trainer.Trainer` (or :class:`FullPrecisionTrainer`) for ``model``."""
    if cfg.full_precision:
        return FullPrecisionTrainer(model, cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay,
                                    autocast_dtype=amp_dtype(cfg.amp), nonfinite=cfg.nonfinite,
                                    max_skips=cfg.max_skips)
    return Trainer(model, cfg.estimator, optimizer=cfg.optimizer, lr=cfg.lr, update_on_observe=cfg.update_on_observe,
                   weight_decay=cfg.weight_decay, adam_variant=cfg.adam_variant, autocast_dtype=amp_dtype(cfg.amp),
                   nonfinite=cfg.nonfinite, max_skips=cfg.max_skips, **cfg.estimator_options)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ----------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """Appends metric rows to ``<out>/metrics.jsonl`` and ``<out>/metrics.csv`` (flushed after
    every row), and optionally to TensorBoard. ``resume_step``: keep the rows of an earlier
    process up to that step and drop later ones; ``None``: start both files afresh."""

    def __init__(self, out: Path, resume_step: Optional[int] = None, tensorboard: bool = False):
        self.jsonl_path, self.csv_path = out / "metrics.jsonl", out / "metrics.csv"
        kept: List[Dict[str, Any]] = []
        if resume_step is not None:
            kept = [r for r in self.read(self.jsonl_path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        atomic_write_text(self.jsonl_path, "".join(self._json(r) for r in kept))
        buf = io.StringIO()
        w = csv.DictWriter(buf, METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in kept:
            w.writerow(self._csv(r))
        atomic_write_text(self.csv_path, buf.getvalue())
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._csvf = open(self.csv_path, "a", encoding="utf-8", newline="")
        self._csvw = csv.DictWriter(self._csvf, METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)

    @staticmethod
    def read(path: Path) -> List[Dict[str, Any]]:
        """The rows of a ``metrics.jsonl`` (a partial last line is skipped)."""
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(r, dict):
                        rows.append(r)
        except FileNotFoundError:
            pass
        return rows

    @staticmethod
    def _json(row: Dict[str, Any]) -> str:
        return json.dumps({k: _finite(v) for k, v in row.items()}, allow_nan=False) + "\n"

    @staticmethod
    def _csv(row: Dict[str, Any]) -> Dict[str, Any]:
        return {k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                for k in METRIC_COLUMNS}

    def write(self, row: Dict[str, Any]) -> None:
        for path, put in ((self.jsonl_path, lambda: (self._jsonl.write(self._json(row)), self._jsonl.flush())),
                          (self.csv_path, lambda: (self._csvw.writerow(self._csv(row)), self._csvf.flush()))):
            try:
                put()
            except OSError as e:  # a full disk: one line naming the file
                what = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
                raise OSError(e.errno, f"{what[:1].lower()}{what[1:]} writing {path}") from None
        if self._tb is not None:
            step = row["step"]
            prefix = "step" if row["kind"] == "step" else "epoch"
            for k in ("loss", "accuracy", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                      "epoch_time"):
                v = row.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._csvf):
            try:
                f.close()
            except OSError:
                pass
        if self._tb is not None:
            self._tb.close()


class _NoLog:
    """The metrics log of a rank other than 0: writes nothing."""

    def write(self, row: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM

#: The signals a run stops on, finishing its step and saving first: Ctrl-C and ``kill``/container stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _InterruptGuard:
    """SIGINT and SIGTERM handling for the loop: inside :meth:`critical` such a signal is deferred
    to the end of the block (a second one raises at once); elsewhere it raises
    ``KeyboardInterrupt`` at once. ``torn`` is set when a ``KeyboardInterrupt`` escaped from
    inside a critical block; ``signum`` is the last signal received (``None``: none, e.g. a
    ``KeyboardInterrupt`` raised by other code)."""

    def __init__(self):
        self.deferring = False
        self.requested = False
        self.torn = False
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        if self.deferring and not self.requested:
            self.requested = True
            what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\nfsg: {what} received: finishing the current step, then saving a checkpoint "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    def _install(self, handler) -> Dict[int, Any]:
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                try:
                    previous[sig] = signal.signal(sig, handler)
                except (ValueError, OSError):  # pragma: no cover
                    pass
        return previous

    @staticmethod
    def _uninstall(previous: Dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        self._previous = self._install(self._handler)
        return self

    def __exit__(self, *exc):
        self._uninstall(self._previous)
        self._previous = {}
        return False

    @contextlib.contextmanager
    def saving(self):
        """Ctrl-C and SIGTERM are ignored (with a note) while the interrupt checkpoint is written."""
        def note(signum, frame):
            print("\nfsg: saving the checkpoint, please wait", file=sys.stderr, flush=True)

        previous = self._install(note)
        try:
            yield
        finally:
            self._uninstall(previous)

    @contextlib.contextmanager
    def critical(self):
        self.deferring = True
        try:
            yield
        except KeyboardInterrupt:
            self.torn = True
            raise
        finally:
            self.deferring = False
        if self.requested:
            raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# the loop


def _check_resume_config(saved: TrainConfig, given: TrainConfig) -> TrainConfig:
    a, b = saved.to_dict(), given.to_dict()
    for k in a:
        if k not in RESUME_CHANGEABLE and a[k] != b[k]:
            raise ValueError(
                f"cannot change {k} when resuming (the checkpoint has {a[k]!r}, got {b[k]!r}); "
                f"only {', '.join(RESUME_CHANGEABLE)} may change"
            )
    return given


def _payload(cfg, trainer, loader_state, scheduler, epoch, batch, running, history, elapsed) -> Dict[str, Any]:
    return {
        "kind": "pretrain" if cfg.full_precision else "train",
        "config": cfg.to_dict(),
        "trainer": trainer.state_dict(),
        "data": dict(loader_state),
        "scheduler": scheduler.state_dict(),
        "epoch": int(epoch),
        "batch": int(batch),
        "step": int(trainer.step_count),
        "running": dict(running),
        "history": [dict(r) for r in history],
        "elapsed": float(elapsed),
        "rng": rng_state(),
        # the architecture without the dataset (fsg export / summary): {"name", "kwargs"} or None
        "model_spec": _model_spec(trainer.model),
    }


def _model_spec(model: nn.Module):
    from fsg.io.export import model_spec

    return model_spec(model)


def _new_running() -> Dict[str, float]:
    return {"loss_sum": 0.0, "acc_sum": 0.0, "n": 0, "batches": 0, "win_loss": 0.0, "win_acc": 0.0,
            "win_steps": 0, "train_time": 0.0, "lr": None}


def _plain_model_state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def train(config: Optional[TrainConfig] = None, *, resume: Optional[PathLike] = None,
          progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train (or continue, with ``resume``) the run described by ``config``; see the module doc.

    ``resume``: a checkpoint path; ``config`` may then be ``None`` (the checkpoint's) or differ
    from it only in :data:`fsg.config.RESUME_CHANGEABLE` fields. Without ``resume`` the run
    directory ``config.out`` must not hold a checkpoint (``last.pt``) already.
    ``progress``: show a tqdm bar on stderr (default: when stderr is a terminal). ``log``: where
    one-line notes go (default: stderr).

    Raises ``ValueError`` (bad configuration, unusable checkpoint — :class:`CheckpointError` —
    or pre-trained file), :class:`fsg.data.DataError` (missing data) and
    :class:`TrainingInterrupted` (Ctrl-C, after saving a checkpoint).
    """
    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    group = {"joined": False}
    try:
        result = _train_checked(config, resume, progress, log, group)
        if group["joined"]:
            dist.barrier()  # rank 0 has written its last checkpoint: all ranks leave the group together
        return result
    finally:
        if group["joined"]:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _train_checked(config: Optional[TrainConfig], resume, progress, log, group: Dict[str, bool]) -> TrainResult:
    ckpt = None
    resume_stat = None
    if resume is not None:
        resume_stat = (Path(resume), _file_signature(resume))  # to notice another run rewriting it meanwhile
        ckpt = load_checkpoint(resume)  # reads only; a bad file stops here, before anything is written
        try:
            saved = TrainConfig.from_dict(ckpt["config"])
        except ValueError as e:
            raise CheckpointError(f"{str(resume)!r} holds an invalid configuration: {e}") from None
        cfg = saved if config is None else _check_resume_config(saved, config.validate())
        if ckpt.get("kind") != ("pretrain" if cfg.full_precision else "train"):
            raise CheckpointError(f"{str(resume)!r} is a {ckpt.get('kind')!r} checkpoint")
    else:
        if config is None:
            raise ValueError("train() needs a config (or resume=CHECKPOINT)")
        cfg = config.validate()
    require_device(cfg.device)  # no usable device: one line, before anything is written
    # under torchrun: join the process group (NCCL for a CUDA device, one GPU per LOCAL_RANK)
    group["joined"], device = dist.init_from_env(cfg.device)
    if device != cfg.device:
        cfg = cfg.replace(device=device)
        require_device(cfg.device)
    if not dist.is_main_process():  # rank 0 speaks and writes for the group
        log, progress = (lambda msg: None), False
    out = Path(cfg.out)
    last = out / "last.pt"
    if ckpt is None and last.exists():
        raise ValueError(f"{str(out)!r} already holds a run ({last.name}): resume it (--resume) or choose another --out")
    if cfg.batch_size < dist.world_size():
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {dist.world_size()} processes: it is the "
                         "global batch, split over the processes; raise it")
    dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
    if cfg.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ValueError("tensorboard logging needs tensorboardX (pip install tensorboardX)") from None

    prev_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    # rank 0 locks the run directory before it writes anything there (RunLock), held to the end
    lock = RunLock(out) if dist.is_main_process() else None
    try:
        return _train(cfg, ckpt, out, last, progress, log, lock, resume_stat)
    finally:
        if lock is not None:
            lock.release()
        if cfg.num_threads is not None:
            torch.set_num_threads(prev_threads)


def _file_signature(path) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _take_run_dir(lock: "RunLock", cfg: TrainConfig, ckpt, last: Path, resume_stat, log) -> None:
    """Lock the run directory (one line if another live run holds it), check again what the run
    found there before the lock (another run may have written it meanwhile), remove the
    temporaries of saves that a killed process left behind."""
    lock.acquire()
    if ckpt is None and last.exists():
        raise ValueError(f"{str(last.parent)!r} already holds a run ({last.name}): resume it (--resume) or choose "
                         "another --out")
    rewritten = resume_stat is not None and resume_stat[0].resolve() == last.resolve() and \
        _file_signature(last) != resume_stat[1]
    if rewritten:
        raise ValueError(f"{str(last)!r} was rewritten by another run while this one was starting: start again")
    removed = remove_stale_temporaries(last.parent)
    if removed:
        log(f"fsg: removed {len(removed)} temporary file{'s' * (len(removed) > 1)} of an interrupted save: "
            f"{', '.join(removed)}")


def _train(cfg: TrainConfig, ckpt, out: Path, last: Path, progress, log, lock=None, resume_stat=None) -> TrainResult:
    _seed_everything(cfg.seed)
    data = build_data(cfg)
    train_ds, loader = data["train"]
    _, test_loader = data["test"]
    if ckpt is None:
        model = build_model(cfg, train_ds, log=log)
    else:
        model = build_model(cfg, train_ds, pretrained=False)  # every weight comes from the checkpoint
    trainer = build_trainer(cfg, model)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)

    epoch, batch = 0, 0
    running = _new_running()
    history: List[Dict[str, Any]] = []
    if ckpt is not None:
        try:
            trainer.load_state_dict(ckpt["trainer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["data"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint does not fit this run: {' '.join(str(e).split())}") from None
        epoch, batch = int(ckpt["epoch"]), int(ckpt.get("batch", 0))
        running.update(ckpt.get("running") or {})
        history = [dict(r) for r in ckpt["history"]]
        set_rng_state(ckpt["rng"])

    main = dist.is_main_process()  # in a process group only rank 0 writes
    if main:
        if lock is not None:
            _take_run_dir(lock, cfg, ckpt, last, resume_stat, log)
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        metrics = MetricsLog(out, resume_step=None if ckpt is None else trainer.step_count, tensorboard=cfg.tensorboard)
    else:
        metrics = _NoLog()
    if progress is None:
        progress = sys.stderr.isatty()
    t_start = time.perf_counter() - (float(ckpt.get("elapsed") or 0.0) if ckpt is not None else 0.0)
    losses: List[float] = []
    val_metrics: Dict[str, float] = {}  # the last validation figures (cfg.val_split), merged into the rows
    trained_before = sum(r.get("epoch_time") or 0.0 for r in history if r.get("kind") == "epoch")
    final: Dict[str, Any] = {"test_loss": None, "test_accuracy": None}
    stopped = "epochs"
    bar = None
    safe = {"loader": loader.state_dict(), "epoch": epoch, "batch": batch, "running": dict(running)}

    last_save = time.monotonic()

    def save(epoch_, batch_, loader_state, running_) -> Path:
        nonlocal last_save
        if not main:
            return last
        bad = _nonfinite_state(trainer)
        if bad:
            raise NonFiniteError(f"refusing to write a checkpoint holding non-finite values ({', '.join(bad)})")
        path = save_checkpoint(last, _payload(cfg, trainer, loader_state, scheduler, epoch_, batch_, running_, history,
                                              time.perf_counter() - t_start))
        last_save = time.monotonic()
        return path

    def run_eval() -> Tuple[float, float, float]:
        t0 = time.perf_counter()
        tl, ta = evaluate_model(model, test_loader, distributed=dist.is_distributed())
        if "val" in data:
            val_metrics.update(zip(("val_loss", "val_accuracy"),
                                   evaluate_model(model, data["val"][1], distributed=dist.is_distributed())))
        return tl, ta, time.perf_counter() - t0

    def save_model_pt() -> None:
        if cfg.full_precision and main:
            save_checkpoint_plain(out / "model.pt", _plain_model_state(model))

    guard = _InterruptGuard()
    try:
        with guard:
            at_max = cfg.max_steps is not None and trainer.step_count >= cfg.max_steps
            pending_epoch_end = batch > 0 and batch >= len(loader)  # stopped after an epoch's last step, before its end
            if epoch >= cfg.epochs or (at_max and not pending_epoch_end):
                stopped = "done"
            while stopped != "done" and epoch < cfg.epochs:
                n_batches = len(loader)
                if batch == 0:
                    running = _new_running()
                    loader.set_epoch(epoch)
                running["lr"] = trainer.lr
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=n_batches, initial=batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                               file=sys.stderr, leave=False, dynamic_ncols=True)
                hit_max = cfg.max_steps is not None and trainer.step_count >= cfg.max_steps
                if batch < n_batches:
                    t_last = time.perf_counter()
                    for x, y in loader:
                        with guard.critical():
                            r = trainer.step(x, y)
                            now = time.perf_counter()
                            running["train_time"] += now - t_last
                            batch += 1  # the batch is consumed, even by a skipped step
                            step = trainer.step_count
                            if r.skipped:  # non-finite, nonfinite="skip": nothing was updated
                                running["skipped"] = running.get("skipped", 0) + 1
                                log(f"fsg: {r.nonfinite}")
                            else:
                                bs = r.samples or int(y.shape[0])  # the global batch
                                acc = r.accuracy if r.accuracy is not None else float("nan")
                                running["loss_sum"] += r.loss * bs
                                running["acc_sum"] += acc * bs
                                running["n"] += bs
                                running["batches"] += 1
                                running["win_loss"] += r.loss
                                running["win_acc"] += acc
                                running["win_steps"] += 1
                                losses.append(r.loss)
                            if not r.skipped and step % cfg.log_every == 0:
                                w = running["win_steps"]
                                metrics.write({"kind": "step", "epoch": epoch + 1, "step": step,
                                               "loss": running["win_loss"] / w, "accuracy": running["win_acc"] / w,
                                               "lr": r.lr, "elapsed": now - t_start,
                                               "train_time": trained_before + running["train_time"]})
                                running["win_loss"], running["win_acc"], running["win_steps"] = 0.0, 0.0, 0
                            safe = {"loader": loader.state_dict(), "epoch": epoch, "batch": batch,
                                    "running": dict(running)}
                            hit_max = cfg.max_steps is not None and step >= cfg.max_steps
                            # --save-every / --save-every-seconds: last.pt mid-epoch (an epoch's last
                            # step and max_steps are saved right after anyway)
                            if not hit_max and batch < n_batches and (
                                    (cfg.save_every is not None and not r.skipped and step % cfg.save_every == 0)
                                    or (cfg.save_every_seconds is not None
                                        and time.monotonic() - last_save >= cfg.save_every_seconds)):
                                save(epoch, batch, safe["loader"], safe["running"])
                        if bar is not None:
                            bar.set_postfix(loss=f"{running['loss_sum'] / running['n']:.4f}",
                                            acc=f"{running['acc_sum'] / running['n']:.3f}", refresh=False)
                            bar.update(1)
                        if hit_max:
                            break
                        t_last = time.perf_counter()
                if bar is not None:
                    bar.close()
                    bar = None
                train_loss = running["loss_sum"] / running["n"] if running["n"] else None
                train_acc = running["acc_sum"] / running["n"] if running["n"] else None
                if batch < n_batches:  # max_steps reached mid-epoch: evaluate, final row, checkpoint
                    tl, ta, te = run_eval()
                    with guard.critical():
                        row = {"kind": "final", "epoch": epoch + 1, "step": trainer.step_count, "lr": running["lr"],
                               "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": tl,
                               "test_accuracy": ta, "epoch_time": running["train_time"], "eval_time": te,
                               "elapsed": time.perf_counter() - t_start, **val_metrics, **_skips(running)}
                        metrics.write(row)
                        history.append(row)
                        final = {"test_loss": tl, "test_accuracy": ta}
                        save(epoch, batch, loader.state_dict(), running)
                        save_model_pt()
                        safe = {"loader": loader.state_dict(), "epoch": epoch, "batch": batch, "running": dict(running)}
                    stopped = "max_steps"
                    break
                # end of the epoch
                last_epoch = epoch + 1 == cfg.epochs or hit_max
                do_eval = (epoch + 1) % cfg.eval_every == 0 or last_epoch
                tl = ta = te = None
                if do_eval:
                    tl, ta, te = run_eval()
                with guard.critical():
                    row = {"kind": "epoch", "epoch": epoch + 1, "step": trainer.step_count, "lr": running["lr"],
                           "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": tl,
                           "test_accuracy": ta, "epoch_time": running["train_time"], "eval_time": te,
                           "elapsed": time.perf_counter() - t_start, **(val_metrics if do_eval else {}),
                           **_skips(running)}
                    metrics.write(row)
                    history.append(row)
                    if do_eval:
                        final = {"test_loss": tl, "test_accuracy": ta}
                    log(_epoch_line(row, cfg.epochs))
                    scheduler.step()
                    trained_before += running["train_time"]
                    epoch, batch = epoch + 1, 0
                    running = _new_running()
                    loader.set_epoch(epoch)
                    save(epoch, batch, loader.state_dict(), running)
                    save_model_pt()
                    safe = {"loader": loader.state_dict(), "epoch": epoch, "batch": batch, "running": dict(running)}
                if hit_max:
                    stopped = "max_steps"
                    break
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        step = trainer.step_count
        signum = guard.signum or signal.SIGINT
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        if guard.torn:
            raise TrainingInterrupted(
                f"fsg: {how} inside a training step (state not saved); {_kept(last)}"
                + (f"; resume with: fsg {_cmd(cfg)} --resume {last}" if last.exists() else ""),
                last if last.exists() else None, step, signum) from None
        with guard.saving():
            try:
                path = save(safe["epoch"], safe["batch"], safe["loader"], safe["running"])
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; {_kept(last)}", e.step) from None
        raise TrainingInterrupted(
            f"fsg: {how} at epoch {safe['epoch'] + 1}, step {step}; checkpoint saved to {path}; "
            f"resume with: fsg {_cmd(cfg)} --resume {path}", path, step, signum) from None
    except NonFiniteError as e:  # nothing was updated, nothing is saved: the last checkpoint stays
        hint = ""
        if e.step is not None and cfg.nonfinite == "raise" and last.exists():
            hint = f"; to skip such steps: fsg {_cmd(cfg)} --resume {last} --nonfinite skip"
        raise NonFiniteError(f"{e}; {_kept(last)}{hint}", e.step) from None
    finally:
        if bar is not None:
            bar.close()
        metrics.close()

    if stopped == "done":
        log(f"fsg: nothing to do: the run in {out} has completed "
            f"{'max_steps' if cfg.max_steps is not None and trainer.step_count >= cfg.max_steps else 'its epochs'} "
            "(raise --epochs or --max-steps to continue it)")
        evaluated = [r for r in history if r.get("test_accuracy") is not None]
        if evaluated:
            final = {"test_loss": evaluated[-1]["test_loss"], "test_accuracy": evaluated[-1]["test_accuracy"]}
    return TrainResult(out=out, checkpoint=last, epochs=epoch, steps=trainer.step_count,
                       test_loss=final["test_loss"], test_accuracy=final["test_accuracy"], history=history,
                       stopped=stopped, losses=losses)


def _epoch_line(row: Dict[str, Any], epochs: int) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    test = (f", test loss {f(row['test_loss'], '.4f')} acc {f(row['test_accuracy'] * 100, '.2f')}%"
            if row.get("test_accuracy") is not None else "")
    if row.get("val_accuracy") is not None:
        test += f", val loss {f(row['val_loss'], '.4f')} acc {f(row['val_accuracy'] * 100, '.2f')}%"
    return (f"fsg: epoch {row['epoch']}/{epochs} (step {row['step']}, lr {row['lr']:.3g}): train loss "
            f"{f(row['train_loss'], '.4f')} acc {f(None if row['train_accuracy'] is None else row['train_accuracy'] * 100, '.2f')}%"
            f"{test}, {row['epoch_time']:.1f} s")


def _skips(running: Dict[str, Any]) -> Dict[str, int]:
    """``{"skipped": n}`` for a metrics row when steps of the epoch were skipped as non-finite."""
    n = int(running.get("skipped") or 0)
    return {"skipped": n} if n else {}


def _nonfinite_state(trainer) -> List[str]:
    """What of the trainer's weights, buffers, hypernetworks and optimizer states is not finite
    (empty when everything is: one fused check)."""
    named = [(f"model {n}", t) for n, t in trainer.model.state_dict().items() if isinstance(t, Tensor)]
    est = getattr(trainer, "estimator", None)
    if est is not None:
        named += [(f"hypernetwork {n}", p) for n, p in est.named_parameters()]
    opts = [("optimizer", trainer.optimizer)] + list(getattr(trainer, "meta_optimizers", {}).items())
    for name, opt in opts:
        for i, st in enumerate(opt.state.values()):
            named += [(f"{name} state {k} ({i})", v) for k, v in st.items() if isinstance(v, Tensor)]
    if all_finite(t.detach() for _, t in named):
        return []
    return nonfinite_names(named)


def _kept(last: Path) -> str:
    """Where the run stands on disk after a failure: the last checkpoint kept, or none."""
    if last.exists():
        return f"the last checkpoint {last} (step {_ckpt_step(last)}) is kept"
    return "no checkpoint was written"


def _cmd(cfg: TrainConfig) -> str:
    return "pretrain" if cfg.full_precision else "train"


def _ckpt_step(path: Path):
    try:
        return load_checkpoint(path)["step"]
    except CheckpointError:
        return "?"


def save_checkpoint_plain(path: PathLike, state: Dict[str, Tensor]) -> Path:
    """Write a plain ``state_dict`` atomically (no format tag: for :func:`load_pretrained`)."""
    from fsg.files import atomic_write

    return atomic_write(path, lambda f: torch.save(state, f))


def pretrain(config: TrainConfig, **kwargs) -> TrainResult:
    """:func:`train` with ``full_precision=True``: plain autograd training of the unbinarized
    model; ``<out>/model.pt`` then holds its ``state_dict`` for :func:`fsg.models.load_pretrained`."""
    return train(config.replace(full_precision=True), **kwargs)


# ----------------------------------------------------------------------------------------------
# evaluation of a checkpoint


def evaluate(checkpoint: PathLike, data_dir: Optional[str] = None, *, batch_size: Optional[int] = None,
             test_subset: Optional[int] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Test loss and accuracy of the model in a checkpoint (a ``last.pt``, or a run directory
    holding one), on the test split of the dataset it was trained on (``data_dir`` overrides where
    that dataset lives). Returns ``{"loss", "accuracy", "images", "step", "epoch", "checkpoint"}``."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "last.pt"
    ckpt = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r} holds an invalid configuration: {e}") from None
    changes = {}
    if data_dir is not None:
        changes["data_dir"] = data_dir
    if batch_size is not None:
        changes["eval_batch_size"] = batch_size
    if test_subset is not None:
        changes["test_subset"] = test_subset
    if device is not None:
        changes["device"] = device
    cfg = cfg.replace(**changes).validate()
    require_device(cfg.device)
    ds, loader = build_data(cfg, splits=("test",))["test"]
    model = build_model(cfg, ds, pretrained=False)
    try:
        model.load_state_dict(ckpt["trainer"]["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{str(path)!r}: the model state does not fit its configuration ({' '.join(str(e).split())[:160]})") from None
    loss, acc = evaluate_model(model, loader)
    return {"loss": loss, "accuracy": acc, "images": len(ds), "step": int(ckpt["step"]),
            "epoch": int(ckpt["epoch"]), "checkpoint": str(path)}
