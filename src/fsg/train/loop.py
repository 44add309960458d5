"""The training loop behind ``fsg train`` and ``fsg pretrain``: data, model, schedule, logging,
checkpoints, exact resume.

:func:`train` runs a :class:`~fsg.train.config.TrainConfig`::

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
              :mod:`fsg.train.checkpoint` for its content); never of non-finite values; <out>/config.json;
              for full-precision runs also <out>/model.pt, a plain state_dict for
              :func:`fsg.models.load_pretrained`

**Structure.** The parts come from :mod:`fsg.train.build`, the rows go through
:mod:`fsg.train.metrics`, signals through :mod:`fsg.train.interrupt`. :class:`Run` holds the
components of one run — data loaders, trainer, schedule, metrics log and :class:`fsg.train.state.RunState` (epoch, batch, the epoch's sums, history,
clock, why the run stopped) — each of which saves and restores itself; its methods build them,
train an epoch, end an epoch, stop mid-epoch, save. An epoch ends when its training steps are
done: the loader's batches less a last global batch smaller than the number of processes,
which every rank skips; only ``max_steps`` stops a run inside an epoch (``state.stopped``).

**The run directory** is locked (:class:`fsg.train.runlock.RunLock`, ``<out>/.lock``) by rank 0 from
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

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from fsg import distributed as dist
from fsg.train.checkpoint import (CheckpointError, load_checkpoint, read_header, rng_state, save_checkpoint,
                                  set_rng_state)
from fsg.train.config import RESUME_CHANGEABLE, TrainConfig, require_device
from fsg.models import model_spec
from fsg.train.runlock import RunLock, remove_stale_temporaries
from fsg.train.build import build_data, build_model, build_trainer, seed_everything
from fsg.train.interrupt import InterruptGuard, TrainingInterrupted
from fsg.train.metrics import MetricsLog, NoLog, epoch_line
from fsg.train.state import EpochSums, RunState
from fsg.trainer import (NonFiniteError, all_finite, evaluate as evaluate_model,
                      nonfinite_names)

__all__ = ["train", "pretrain", "evaluate", "TrainResult", "Run", "save_checkpoint_plain"]

PathLike = Union[str, os.PathLike]





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


def _plain_model_state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def train(config: Optional[TrainConfig] = None, *, resume: Optional[PathLike] = None,
          progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train (or continue, with ``resume``) the run described by ``config``; see the module doc.

    ``resume``: a checkpoint path; ``config`` may then be ``None`` (the checkpoint's) or differ
    from it only in :data:`fsg.train.config.RESUME_CHANGEABLE` fields. Without ``resume`` the run
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
    run = Run(cfg, out, progress, log)
    run.build(ckpt)
    run.open(ckpt, lock, resume_stat)
    return run.run()


def _steps_per_epoch(loader) -> int:
    """The training steps of one epoch of ``loader``: its batches, less a last global batch
    smaller than the number of processes, which every rank skips (:class:`fsg.data.DataLoader`)."""
    k = len(loader)
    last = len(loader.dataset) - (k - 1) * loader.batch_size if k else 0
    return k - 1 if k and loader.train and last < loader.world_size else k


class Run:
    """One call of :func:`train`: the components of a run (data loaders, trainer, schedule,
    metrics log, :class:`~fsg.train.state.RunState`) and the loop over them.

    :meth:`build` makes the components (and restores them from a checkpoint), :meth:`open` takes
    the run directory, :meth:`run` trains epoch after epoch (:meth:`train_epoch`, then
    :meth:`end_epoch`, or :meth:`stop_mid_epoch` when ``max_steps`` stops the run inside an
    epoch) and returns the :class:`TrainResult`; :meth:`save` writes ``last.pt``. Why the run
    stopped is kept explicitly in ``state.stopped``. ``safe`` is what a checkpoint written now
    would hold of the loader and the run state: updated after every completed step, so an
    interrupt during data loading saves the state after the last step.
    """

    def __init__(self, cfg: TrainConfig, out: Path, progress: Optional[bool], log: Callable[[str], None]):
        self.cfg, self.out, self.last, self.log = cfg, out, out / "last.pt", log
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.main = dist.is_main_process()  # in a process group only rank 0 writes
        self.state = RunState()
        self.metrics: Any = NoLog()
        self.guard = InterruptGuard()
        self.losses: List[float] = []            # per-step losses of this call
        self.val_metrics: Dict[str, float] = {}  # the last validation figures (cfg.val_split), merged into rows
        self.bar = None
        self.last_save = time.monotonic()

    # -- setup

    def build(self, ckpt: Optional[Dict[str, Any]]) -> None:
        """Seed, then build data, model, trainer and schedule; restore them from ``ckpt`` if given."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        data = build_data(cfg)
        train_ds, self.loader = data["train"]
        self.test_loader = data["test"][1]
        self.val_loader = data["val"][1] if "val" in data else None
        if ckpt is None:
            model = build_model(cfg, train_ds, log=self.log)
        else:
            model = build_model(cfg, train_ds, pretrained=False)  # every weight comes from the checkpoint
        self.trainer = build_trainer(cfg, model)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.trainer.optimizer, step_size=cfg.lr_step,
                                                         gamma=cfg.lr_gamma)
        if ckpt is not None:
            self.restore(ckpt)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        """Each component takes its state from the checkpoint; then the random number generators."""
        try:
            self.trainer.load_state_dict(ckpt["trainer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.loader.load_state_dict(ckpt["data"])
            self.state.load_state_dict(ckpt)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint does not fit this run: {' '.join(str(e).split())}") from None
        set_rng_state(ckpt["rng"])

    def open(self, ckpt, lock: Optional[RunLock] = None, resume_stat=None) -> None:
        """Rank 0 locks and checks the run directory, writes ``config.json`` and opens the metrics
        log (keeping the rows up to the checkpoint's step); the run's clock starts."""
        if self.main:
            if lock is not None:
                _take_run_dir(lock, self.cfg, ckpt, self.last, resume_stat, self.log)
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out / "config.json")
            self.metrics = MetricsLog(self.out, resume_step=None if ckpt is None else self.trainer.step_count,
                                      tensorboard=self.cfg.tensorboard)
        self.state.start_clock()
        self.mark_safe()
        self.last_save = time.monotonic()

    # -- the loop

    def run(self) -> TrainResult:
        """Train until the epochs are done or ``max_steps`` is reached; see the module doc for
        Ctrl-C, SIGTERM and non-finite steps."""
        try:
            with self.guard:
                self.check_done()
                while self.state.stopped is None:
                    if self.train_epoch():
                        self.end_epoch()
                    else:
                        self.stop_mid_epoch()
        except KeyboardInterrupt:
            self.close_bar()
            self.interrupted()
        except NonFiniteError as e:  # nothing was updated, nothing is saved: the last checkpoint stays
            hint = ""
            if e.step is not None and self.cfg.nonfinite == "raise" and self.last.exists():
                hint = f"; to skip such steps: fsg {_cmd(self.cfg)} --resume {self.last} --nonfinite skip"
            raise NonFiniteError(f"{e}; {_kept(self.last)}{hint}", e.step) from None
        finally:
            self.close_bar()
            self.metrics.close()
        return self.result()

    def at_max(self) -> bool:
        """Whether ``max_steps`` training steps are done."""
        return self.cfg.max_steps is not None and self.trainer.step_count >= self.cfg.max_steps

    def check_done(self) -> None:
        """Stop with "done" when a resumed run has nothing left: its epochs are done, or it is
        at ``max_steps`` (unless the checkpoint was written after an epoch's last step but before
        that epoch's end, which is then still to do)."""
        st = self.state
        pending_end = st.batch > 0 and st.batch >= _steps_per_epoch(self.loader)
        if st.epoch >= self.cfg.epochs or (self.at_max() and not pending_end):
            st.stop("done")

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; ``False`` when ``max_steps`` stopped it before its
        last step, ``True`` when all its steps are done."""
        st, loader = self.state, self.loader
        steps = _steps_per_epoch(loader)
        if st.batch == 0:
            st.sums = EpochSums()
            loader.set_epoch(st.epoch)
        st.sums.lr = self.trainer.lr
        self.open_bar(steps)
        stopped_early = False
        if st.batch < steps:
            t_last = time.perf_counter()
            for x, y in loader:
                with self.guard.critical():
                    self.step(x, y, t_last, steps)
                self.advance_bar()
                if self.at_max():
                    stopped_early = st.batch < steps
                    break
                t_last = time.perf_counter()
        self.close_bar()
        return not stopped_early

    def step(self, x: Tensor, y: Tensor, t_last: float, steps: int) -> None:
        """One training step and its bookkeeping: the epoch's sums, a "step" row every
        ``log_every`` steps, the safe state, a mid-epoch checkpoint when one is due."""
        st, cfg = self.state, self.cfg
        r = self.trainer.step(x, y)
        now = time.perf_counter()
        st.sums.train_time += now - t_last
        st.batch += 1  # the batch is consumed, even by a skipped step
        step = self.trainer.step_count
        if r.skipped:  # non-finite, nonfinite="skip": nothing was updated
            st.sums.skipped += 1
            self.log(f"fsg: {r.nonfinite}")
        else:
            acc = r.accuracy if r.accuracy is not None else float("nan")
            st.sums.add(r.loss, acc, r.samples or int(y.shape[0]))  # r.samples: the global batch
            self.losses.append(r.loss)
            if step % cfg.log_every == 0:
                self.metrics.write({"kind": "step", "epoch": st.epoch + 1, "step": step, **st.sums.take_window(),
                                    "lr": r.lr, "elapsed": st.seconds(), "train_time": st.trained_seconds()})
        self.mark_safe()
        # --save-every / --save-every-seconds: last.pt mid-epoch (an epoch's last step and
        # max_steps are saved right after anyway)
        if not self.at_max() and st.batch < steps and (
                (cfg.save_every is not None and not r.skipped and step % cfg.save_every == 0)
                or (cfg.save_every_seconds is not None and time.monotonic() - self.last_save >= cfg.save_every_seconds)):
            self.save()

    def end_epoch(self) -> None:
        """The end of an epoch: evaluate (every ``eval_every`` epochs, after the last one and at
        ``max_steps``), write the "epoch" row, step the schedule, move to the next epoch and
        save; stop when the epochs are done or ``max_steps`` is reached."""
        st, cfg = self.state, self.cfg
        hit_max = self.at_max()
        do_eval = (st.epoch + 1) % cfg.eval_every == 0 or st.epoch + 1 == cfg.epochs or hit_max
        evals = self.evaluate() if do_eval else None
        with self.guard.critical():
            row = self.write_row("epoch", evals)
            self.log(epoch_line(row, cfg.epochs))
            self.scheduler.step()
            st.next_epoch()
            self.loader.set_epoch(st.epoch)
            self.mark_safe()
            self.save()
            self.save_model_pt()
        if hit_max:
            st.stop("max_steps")
        elif st.epoch >= cfg.epochs:
            st.stop("epochs")

    def stop_mid_epoch(self) -> None:
        """``max_steps`` reached inside an epoch: evaluate, write the "final" row, save, stop."""
        evals = self.evaluate()
        with self.guard.critical():
            self.write_row("final", evals)
            self.mark_safe()
            self.save()
            self.save_model_pt()
        self.state.stop("max_steps")

    def evaluate(self) -> Tuple[float, float, float]:
        """``(test loss, test accuracy, seconds)``; the validation figures go to ``val_metrics``."""
        t0 = time.perf_counter()
        distributed = dist.is_distributed()
        tl, ta = evaluate_model(self.trainer.model, self.test_loader, distributed=distributed)
        if self.val_loader is not None:
            self.val_metrics.update(zip(("val_loss", "val_accuracy"),
                                        evaluate_model(self.trainer.model, self.val_loader, distributed=distributed)))
        return tl, ta, time.perf_counter() - t0

    def write_row(self, kind: str, evals: Optional[Tuple[float, float, float]]) -> Dict[str, Any]:
        """Write an "epoch" or "final" row of the current epoch (``evals``: :meth:`evaluate`'s
        figures, or ``None`` when it did not evaluate) and add it to the history."""
        st = self.state
        tl, ta, te = evals if evals is not None else (None, None, None)
        row = {"kind": kind, "epoch": st.epoch + 1, "step": self.trainer.step_count, "lr": st.sums.lr,
               **st.sums.means(), "test_loss": tl, "test_accuracy": ta, "epoch_time": st.sums.train_time,
               "eval_time": te, "elapsed": st.seconds(), **(self.val_metrics if evals is not None else {}),
               **({"skipped": st.sums.skipped} if st.sums.skipped else {})}
        self.metrics.write(row)
        st.history.append(row)
        return row

    # -- checkpoints

    def mark_safe(self) -> None:
        """Record the loader's and the run's state as what a checkpoint written now holds."""
        self.safe = (self.loader.state_dict(), self.state.copy())

    def payload(self) -> Dict[str, Any]:
        """The checkpoint content (:mod:`fsg.train.checkpoint`): every component's state."""
        loader_state, state = self.safe
        s = state.state_dict()
        return {"kind": _cmd(self.cfg), "config": self.cfg.to_dict(), "trainer": self.trainer.state_dict(),
                "data": dict(loader_state), "scheduler": self.scheduler.state_dict(), "epoch": s["epoch"],
                "batch": s["batch"], "step": int(self.trainer.step_count), "running": s["running"],
                "history": s["history"], "elapsed": s["elapsed"], "rng": rng_state(),
                # the architecture without the dataset (fsg export / summary): {"name", "kwargs"} or None
                "model_spec": model_spec(self.trainer.model)}

    def save(self) -> Path:
        """Write ``last.pt`` (rank 0; never holding non-finite values: ``NonFiniteError``)."""
        if not self.main:
            return self.last
        bad = _nonfinite_state(self.trainer)
        if bad:
            raise NonFiniteError(f"refusing to write a checkpoint holding non-finite values ({', '.join(bad)})")
        path = save_checkpoint(self.last, self.payload())
        self.last_save = time.monotonic()
        return path

    def save_model_pt(self) -> None:
        """Full-precision runs: ``model.pt``, the plain ``state_dict`` for :func:`load_pretrained`."""
        if self.cfg.full_precision and self.main:
            save_checkpoint_plain(self.out / "model.pt", _plain_model_state(self.trainer.model))

    # -- the end

    def interrupted(self) -> None:
        """After Ctrl-C or SIGTERM: save the safe state (unless a step was torn) and raise
        :class:`TrainingInterrupted` saying how to resume."""
        cfg, last, guard = self.cfg, self.last, self.guard
        step = self.trainer.step_count
        signum = guard.signum or signal.SIGINT
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        if guard.torn:
            raise TrainingInterrupted(
                f"fsg: {how} inside a training step (state not saved); {_kept(last)}"
                + (f"; resume with: fsg {_cmd(cfg)} --resume {last}" if last.exists() else ""),
                last if last.exists() else None, step, signum) from None
        with guard.saving():
            try:
                path = self.save()
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; {_kept(last)}", e.step) from None
        raise TrainingInterrupted(
            f"fsg: {how} at epoch {self.safe[1].epoch + 1}, step {step}; checkpoint saved to {path}; "
            f"resume with: fsg {_cmd(cfg)} --resume {path}", path, step, signum) from None

    def result(self) -> TrainResult:
        """The :class:`TrainResult`; the test figures are those of the last evaluated row."""
        st = self.state
        if st.stopped == "done":
            self.log(f"fsg: nothing to do: the run in {self.out} has completed "
                     f"{'max_steps' if self.at_max() else 'its epochs'} (raise --epochs or --max-steps to continue it)")
        evaluated = [r for r in st.history if r.get("test_accuracy") is not None]
        last_eval = evaluated[-1] if evaluated else {}
        return TrainResult(out=self.out, checkpoint=self.last, epochs=st.epoch, steps=self.trainer.step_count,
                           test_loss=last_eval.get("test_loss"), test_accuracy=last_eval.get("test_accuracy"),
                           history=st.history, stopped=st.stopped, losses=self.losses)

    # -- the progress bar

    def open_bar(self, steps: int) -> None:
        """A tqdm bar for the epoch on stderr (with ``progress``)."""
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=self.state.batch, desc=f"epoch {self.state.epoch + 1}/{self.cfg.epochs}",
                            file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance_bar(self) -> None:
        """One step on the bar, with the epoch's running loss and accuracy."""
        if self.bar is not None:
            s = self.state.sums
            if s.n:
                self.bar.set_postfix(loss=f"{s.loss_sum / s.n:.4f}", acc=f"{s.acc_sum / s.n:.3f}", refresh=False)
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None




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
        return read_header(path)["step"]
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
    ckpt = load_checkpoint(path, mmap=True)  # only the model's tensors are read
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
