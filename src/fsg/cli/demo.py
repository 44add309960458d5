"""``fsg demo``: the same binarized :class:`fsg.models.SmallCNN` trained on the built-in synthetic
task (:mod:`fsg.data.synthetic`) with several gradient estimators by :class:`fsg.Trainer`,
seed-matched (same initial weights, same batch order), compared side by side."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import islice
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from fsg.binarize import binarize
from fsg.cli.options import HelpFormatter, finite_or_none, nonnegative_float, nonnegative_int, parse_estimators, \
    positive_float, positive_int
from fsg.data.synthetic import batches, make_synthetic
from fsg.estimators import ESTIMATORS
from fsg.models import SmallCNN
from fsg.optim import OPTIMIZERS
from fsg.quantizers import QUANTIZERS
from fsg.trainer import Trainer, evaluate

__all__ = ["DEMO_DEFAULTS", "DEMO_TASK", "TRAIN_LOSS_WINDOW", "add_parser", "cmd_demo", "format_table", "jsonable",
           "run_demo"]

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


def add_parser(sub) -> None:
    """The ``demo`` subcommand."""
    d = DEMO_DEFAULTS
    demo = sub.add_parser(
        "demo",
        help="train a small binarized CNN on a built-in synthetic task with several estimators "
        "and compare them (no download; well under a minute with the defaults)",
        description="Train the same binarized SmallCNN on the built-in synthetic image task with "
        "several gradient estimators, seed-matched (same initial weights, same batch order), and "
        "print final training loss (mean of the last "
        f"{TRAIN_LOSS_WINDOW} steps), test loss, test accuracy and time per step.",
        formatter_class=HelpFormatter,
    )
    demo.add_argument("--estimators", default=d["estimators"], metavar="LIST",
                      help=f"comma list of estimators, from: {', '.join(ESTIMATORS)}")
    demo.add_argument("--quantizer", default=d["quantizer"], choices=list(QUANTIZERS),
                      help="weight quantizer (1 bit)")
    demo.add_argument("--optimizer", default=d["optimizer"], choices=list(OPTIMIZERS),
                      help="base optimizer")
    demo.add_argument("--lr", type=positive_float, default=d["lr"], help="base learning rate")
    demo.add_argument("--schedule", default=d["schedule"], choices=["cosine", "constant"],
                      help="learning-rate schedule over the run (cosine: annealed to 0)")
    demo.add_argument("--steps", type=positive_int, default=d["steps"], help="training steps per estimator")
    demo.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help="mini-batch size")
    demo.add_argument("--seed", type=nonnegative_int, default=d["seed"],
                      help="seed of the model initialisation and the batch order (the task itself is fixed)")
    demo.add_argument("--width", type=positive_int, default=d["width"],
                      help="SmallCNN width (channels of the first conv)")
    demo.add_argument("--noise", type=nonnegative_float, default=d["noise"],
                      help="pixel noise of the synthetic task (higher = harder)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    demo.set_defaults(func=cmd_demo, command_parser=demo)


def endless_batches(data, batch_size: int, order: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of ``data``, epoch after epoch, in the order ``order`` draws."""
    while True:
        yield from batches(data, batch_size, generator=order)


def _train_one(name: str, *, train, test, quantizer: str, optimizer: str, lr: float, schedule: str,
               steps: int, batch_size: int, seed: int, width: int, progress: bool) -> Dict[str, object]:
    """One estimator's run: a fresh binarized SmallCNN trained ``steps`` steps by :class:`fsg.Trainer`,
    then evaluated on ``test``."""
    torch.manual_seed(seed)  # same initial CNN (and hypernetwork init) for every estimator
    model = binarize(SmallCNN(in_channels=train.x.shape[1], num_classes=train.num_classes, width=width), quantizer)
    trainer = Trainer(model, name, optimizer=optimizer, lr=lr)
    order = torch.Generator().manual_seed(seed)  # same batch order for every estimator

    losses: List[float] = []
    elapsed = 0.0
    with tqdm(total=steps, desc=f"{name:>8s}", file=sys.stderr, disable=not progress) as bar:
        for step, (x, y) in enumerate(islice(endless_batches(train, batch_size, order), steps)):
            if schedule == "cosine":  # annealed from lr to 0 over the run
                for group in trainer.optimizer.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
            t0 = time.perf_counter()
            losses.append(trainer.step(x, y).loss)
            elapsed += time.perf_counter() - t0
            bar.set_postfix(loss=f"{_mean(losses[-TRAIN_LOSS_WINDOW:]):.3f}", refresh=False)
            bar.update(1)

    test_loss, test_acc = evaluate(model, batches(test, 512, shuffle=False))
    return {"train_loss": _mean(losses[-TRAIN_LOSS_WINDOW:]), "test_loss": test_loss, "test_accuracy": test_acc,
            "sec_per_step": elapsed / steps, "steps": steps}


def _mean(values: List[float]) -> float:
    return sum(values) / len(values)


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


def jsonable(report: Dict[str, object]) -> Dict[str, object]:
    """``report`` with every NaN or infinite number replaced by ``None`` (for strict JSON)."""
    def fix(v):
        if isinstance(v, float):
            return finite_or_none(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return fix(report)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``fsg demo``: run the comparison and print it as a table (or JSON)."""
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
        print(json.dumps(jsonable(report), indent=2, allow_nan=False))
    else:
        print(format_table(report))
    return 0

