"""Where a training run stands between two steps: :class:`RunState` (epoch, batch, the sums of
the current epoch, the metric history, the run's clock, why it stopped) and :class:`EpochSums`.

Each is saved and restored by itself (``state_dict`` / ``load_state_dict``); the loop
(:mod:`fsg.train.loop`) puts ``RunState.state_dict()`` into the checkpoint next to the states of
the trainer, the data loader and the schedule. The entries are those checkpoints have always
held (``"epoch"``, ``"batch"``, ``"running"``, ``"history"``, ``"elapsed"``; see
:mod:`fsg.train.checkpoint`), with the same values, so checkpoints of earlier versions load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

__all__ = ["EpochSums", "RunState", "STOP_REASONS"]

#: Why a run stopped: its epochs are done, ``max_steps`` was reached, or there was nothing to train.
STOP_REASONS = ("epochs", "max_steps", "done")


@dataclass
class EpochSums:
    """Running sums of the current epoch (sample-weighted loss and accuracy, batches, training
    seconds, skipped non-finite steps, the learning rate) and of the current logging window
    (unweighted per-step loss and accuracy). Saved as the checkpoint's ``"running"`` dict."""

    loss_sum: float = 0.0
    acc_sum: float = 0.0
    n: int = 0
    batches: int = 0
    win_loss: float = 0.0
    win_acc: float = 0.0
    win_steps: int = 0
    train_time: float = 0.0
    lr: Optional[float] = None
    skipped: int = 0

    def add(self, loss: float, accuracy: float, samples: int) -> None:
        """Count one finished step: its loss and accuracy over ``samples`` images (the global batch)."""
        self.loss_sum += loss * samples
        self.acc_sum += accuracy * samples
        self.n += samples
        self.batches += 1
        self.win_loss += loss
        self.win_acc += accuracy
        self.win_steps += 1

    def take_window(self) -> Dict[str, float]:
        """The logging window's mean loss and accuracy; the window starts afresh."""
        w = self.win_steps
        means = {"loss": self.win_loss / w, "accuracy": self.win_acc / w}
        self.win_loss, self.win_acc, self.win_steps = 0.0, 0.0, 0
        return means

    def means(self) -> Dict[str, Optional[float]]:
        """The epoch's sample-weighted ``train_loss`` and ``train_accuracy`` (``None`` before any step)."""
        if not self.n:
            return {"train_loss": None, "train_accuracy": None}
        return {"train_loss": self.loss_sum / self.n, "train_accuracy": self.acc_sum / self.n}

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint's ``"running"`` dict (``"skipped"`` only once a step was skipped)."""
        d = {"loss_sum": self.loss_sum, "acc_sum": self.acc_sum, "n": self.n, "batches": self.batches,
             "win_loss": self.win_loss, "win_acc": self.win_acc, "win_steps": self.win_steps,
             "train_time": self.train_time, "lr": self.lr}
        if self.skipped:
            d["skipped"] = self.skipped
        return d

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing entries keep their values)."""
        for k, v in (state or {}).items():
            if k in self.__dataclass_fields__:
                setattr(self, k, v if k != "skipped" else int(v or 0))


@dataclass
class RunState:
    """The loop's own state: ``epoch`` (epochs completed), ``batch`` (training steps taken in the
    current epoch, 0 at an epoch boundary), ``sums`` (:class:`EpochSums` of the current epoch),
    ``history`` (the ``epoch`` and ``final`` metric rows so far), ``elapsed`` (seconds of the run
    before this process took it over; :meth:`start_clock` then counts on from there) and
    ``stopped`` (``None`` while the run goes on, else one of :data:`STOP_REASONS`)."""

    epoch: int = 0
    batch: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    history: List[Dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    stopped: Optional[str] = None
    _origin: Optional[float] = field(default=None, repr=False, compare=False)

    def start_clock(self) -> None:
        """Count the run's seconds from now on, after the ``elapsed`` seconds it had already run."""
        self._origin = time.perf_counter() - self.elapsed

    def seconds(self) -> float:
        """Seconds of the run so far (``elapsed`` before :meth:`start_clock`)."""
        return self.elapsed if self._origin is None else time.perf_counter() - self._origin

    def trained_seconds(self) -> float:
        """Seconds spent in training steps: the finished epochs' and the current one's."""
        return sum(r.get("epoch_time") or 0.0 for r in self.history if r.get("kind") == "epoch") + self.sums.train_time

    def next_epoch(self) -> None:
        """Move to the start of the next epoch, with fresh sums."""
        self.epoch, self.batch, self.sums = self.epoch + 1, 0, EpochSums()

    def stop(self, reason: str) -> None:
        """Mark the run stopped for ``reason`` (one of :data:`STOP_REASONS`)."""
        if reason not in STOP_REASONS:
            raise ValueError(f"unknown stop reason {reason!r}: choose from {', '.join(STOP_REASONS)}")
        self.stopped = reason

    def copy(self) -> "RunState":
        """A copy that later steps do not change (the same clock)."""
        sums = EpochSums()
        sums.load_state_dict(self.sums.state_dict())
        return replace(self, sums=sums, history=list(self.history))

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint entries ``epoch``, ``batch``, ``running``, ``history`` and ``elapsed`` (now)."""
        return {"epoch": int(self.epoch), "batch": int(self.batch), "running": self.sums.state_dict(),
                "history": [dict(r) for r in self.history], "elapsed": float(self.seconds())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from a checkpoint (or :meth:`state_dict`); ``batch``, ``running`` and
        ``elapsed`` may be missing (older checkpoints): 0, fresh sums, 0 seconds."""
        self.epoch, self.batch = int(state["epoch"]), int(state.get("batch", 0))
        self.sums = EpochSums()
        self.sums.load_state_dict(state.get("running") or {})
        self.history = [dict(r) for r in state["history"]]
        self.elapsed = float(state.get("elapsed") or 0.0)
        self._origin, self.stopped = None, None
