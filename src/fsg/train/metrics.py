"""A run's metric rows: ``<out>/metrics.jsonl`` and ``metrics.csv`` (the same rows, appended and
flushed; rows after a resumed checkpoint's step dropped), optionally TensorBoard, and the one-line
epoch summary printed on stderr."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from fsg.files import atomic_write_text

__all__ = ["METRIC_COLUMNS", "MetricsLog", "NoLog", "finite_or_none", "epoch_line"]

#: Columns of ``metrics.csv`` (every row kind; empty where a field does not apply).
METRIC_COLUMNS = (
    "kind", "epoch", "step", "loss", "accuracy", "lr", "train_loss", "train_accuracy", "test_loss",
    "test_accuracy", "epoch_time", "eval_time", "elapsed",
)


def finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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
        return json.dumps({k: finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n"

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


class NoLog:
    """The metrics log of a rank other than 0: writes nothing."""

    def write(self, row: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def epoch_line(row: Dict[str, Any], epochs: int) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    test = (f", test loss {f(row['test_loss'], '.4f')} acc {f(row['test_accuracy'] * 100, '.2f')}%"
            if row.get("test_accuracy") is not None else "")
    if row.get("val_accuracy") is not None:
        test += f", val loss {f(row['val_loss'], '.4f')} acc {f(row['val_accuracy'] * 100, '.2f')}%"
    return (f"fsg: epoch {row['epoch']}/{epochs} (step {row['step']}, lr {row['lr']:.3g}): train loss "
            f"{f(row['train_loss'], '.4f')} acc {f(None if row['train_accuracy'] is None else row['train_accuracy'] * 100, '.2f')}%"
            f"{test}, {row['epoch_time']:.1f} s")

