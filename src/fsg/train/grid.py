"""``fsg grid``: a grid of training runs (estimators × quantizers × optimizers × seeds) and its report.

:func:`run_grid` trains every combination sequentially with :func:`fsg.train.loop.train`, each in its own
run directory ``<out>/<estimator>-<quantizer>-<optimizer>-s<seed>/`` (the usual ``config.json``,
``metrics.jsonl``, ``metrics.csv``, ``last.pt``), then :func:`write_report` summarises them from
the ``metrics.jsonl`` files the runs wrote:

* ``<out>/results.md`` — one row per (estimator, quantizer, optimizer): test accuracy and final
  training loss as mean ± standard deviation over the seeds, the number of seeds, the steps;
* ``<out>/results.json`` — the same numbers (accuracies as fractions in [0, 1]) and every run's;
* ``<out>/curves.png`` — training loss and test accuracy of every run (needs matplotlib).

**Groups.** One row per configuration: runs are grouped by everything in their ``config.json``
but the seed and the run-only settings (output and data location, logging, threads, device,
checkpointing, non-finite policy: ``_REPORT_FREE``), so runs of another model, dataset, learning
rate or number of epochs are never averaged together; when groups differ in more than estimator,
quantizer and optimizer, a ``settings`` column says how. Two runs of one group with the same seed
are an error (one line): a seed is counted once.

**Metric** (MetaQuant's, METHOD.md §6). A run's *evaluations* are its ``epoch`` and ``final``
rows with a test accuracy, one per evaluated epoch (a ``final`` row — a run stopped by
``max_steps`` mid-epoch — counts unless a later row of the same epoch supersedes it). Per run,
``acc_k`` = the mean test accuracy of its last ``k`` evaluations (all of them if it has fewer);
per group, the mean and the sample standard deviation (``n − 1``) of ``acc_k`` over its seeds.
The *final training loss* of a run is the ``train_loss`` of its last evaluation row (the mean
training loss over its last, possibly partial, epoch); per group, mean and sample standard
deviation over the seeds. With one seed the standard deviation is undefined (``null`` in the
JSON, omitted in the table).

**Resume.** A run whose checkpoint already reached the grid's ``epochs`` (or ``max_steps``,
evaluated) is skipped; a run with a checkpoint short of that is resumed from its ``last.pt``
(exactly, see :mod:`fsg.run`), a run without one starts afresh. Running the same grid again thus
finishes what an interruption left; raising ``epochs`` / ``max_steps`` extends every run. A run
directory whose checkpoint has another configuration (other than the fields of
:data:`fsg.train.config.RESUME_CHANGEABLE`) is an error, not silently reused.

**Estimator options** given to the grid go to each estimator that takes them (``hidden`` to
``multifc``, not to ``ste``); an option that no estimator of the grid takes is an error.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from fsg.train import loop as _run
from fsg.files import atomic_write, atomic_write_text
from fsg.train.checkpoint import read_header
from fsg.train.interrupt import TrainingInterrupted
from fsg.train.metrics import MetricsLog
from fsg.train.config import (RESUME_CHANGEABLE, TrainConfig, estimator_option_names, estimator_takes_any_option,
                              require_device)

__all__ = ["run_grid", "write_report", "collect_runs", "run_name", "parse_list", "parse_seeds",
           "GRID_AXES", "DEFAULT_LAST_K"]

#: The grid's axes: TrainConfig fields, in run-name order.
GRID_AXES = ("estimator", "quantizer", "optimizer", "seed")
#: Default number of final evaluations averaged per run (MetaQuant: the last 10 epochs).
DEFAULT_LAST_K = 10

#: Fields that may differ between runs of one group without a warning in the report.

PathLike = Union[str, "Path"]


# ----------------------------------------------------------------------------------------------
# axes


def run_name(estimator: str, quantizer: str, optimizer: str, seed: int) -> str:
    """The run directory name ``<estimator>-<quantizer>-<optimizer>-s<seed>``."""
    return f"{estimator}-{quantizer}-{optimizer}-s{seed}"


def parse_list(value: Union[str, Iterable[str]], what: str, choices: Sequence[str]) -> List[str]:
    """A comma list (or a sequence) of names from ``choices``, deduplicated in order; one-line
    ``ValueError`` for an empty or unknown name."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    names: List[str] = []
    for part in parts:
        name = str(part).strip()
        if not name:
            raise ValueError(f"{what}: empty name in {value!r} (give a comma list like {','.join(choices[:2])!r})")
        if name not in choices:
            noun = what.lstrip("-")
            noun = noun[:-1] if noun.endswith("s") else noun
            raise ValueError(f"unknown {noun} {name!r}: choose from {', '.join(choices)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"{what}: no name given")
    return names


def parse_seeds(value: Union[str, int, Iterable[int]]) -> List[int]:
    """Seeds from a comma list with ranges (``"0,1,2"``, ``"0-4"``) or integers; deduplicated."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    parts = value.split(",") if isinstance(value, str) else list(value)
    seeds: List[int] = []
    for part in parts:
        if isinstance(part, bool):
            raise ValueError(f"seeds must be non-negative integers, got {part!r}")
        if isinstance(part, int):
            found = [part]
        else:
            text = str(part).strip()
            lo, sep, hi = text.partition("-")
            try:
                found = list(range(int(lo), int(hi) + 1)) if sep and lo else [int(text)]
            except ValueError:
                raise ValueError(f"seeds: expected non-negative integers or ranges like 0-4, got {text!r}") from None
            if sep and lo and int(hi) < int(lo):
                raise ValueError(f"seeds: empty range {text!r}")
        for s in found:
            if s < 0:
                raise ValueError(f"seeds must be non-negative integers, got {s}")
            if s not in seeds:
                seeds.append(s)
    if not seeds:
        raise ValueError("seeds: no seed given")
    return seeds


def _options_for(estimator: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """The options of ``options`` that ``estimator`` takes (its options dataclass's fields)."""
    if estimator_takes_any_option(estimator):
        return dict(options)
    accepted = set(estimator_option_names(estimator))
    return {k: v for k, v in options.items() if k in accepted}


def _plan(out: Path, base: TrainConfig, estimators, quantizers, optimizers, seeds) -> List[Tuple[str, TrainConfig]]:
    """Every run's (name, validated configuration); raises a one-line ``ValueError``."""
    from fsg.estimators import ESTIMATORS

    options = dict(base.estimator_options or {})
    if options and not base.full_precision:
        unused = [k for k in options
                  if not any(k in _options_for(e, {k: None}) for e in estimators)]
        if unused:
            raise ValueError(f"estimator option(s) {', '.join(sorted(unused))} taken by none of the grid's "
                             f"estimators ({', '.join(estimators)})")
    for e in estimators:
        if e not in ESTIMATORS:
            raise ValueError(f"unknown estimator {e!r}: choose from {', '.join(ESTIMATORS)}")
    plan = []
    for e in estimators:
        for q in quantizers:
            for o in optimizers:
                for s in seeds:
                    name = run_name(e, q, o, s)
                    cfg = base.replace(estimator=e, quantizer=q, optimizer=o, seed=s, out=str(out / name),
                                       estimator_options=_options_for(e, options))
                    try:
                        cfg.validate()
                    except ValueError as err:
                        raise ValueError(f"run {name}: {err}") from None
                    plan.append((name, cfg))
    return plan


# ----------------------------------------------------------------------------------------------
# running


def _state(name: str, cfg: TrainConfig) -> Tuple[str, Optional[int]]:
    """``("new" | "done" | "resume", checkpoint step)`` of a planned run."""
    last = Path(cfg.out) / "last.pt"
    if not last.exists():
        return "new", None
    ckpt = read_header(last)  # config, epoch, step and history only: the tensors are not read
    saved, given = dict(ckpt["config"]), cfg.to_dict()
    for k in given:
        if k not in RESUME_CHANGEABLE and saved.get(k) != given[k]:
            raise ValueError(f"{cfg.out} holds a run with another configuration ({k}: {saved.get(k)!r} there, "
                             f"{given[k]!r} in this grid): remove it or choose another output directory")
    epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
    if epoch >= cfg.epochs:
        return "done", step
    if cfg.max_steps is not None and step >= cfg.max_steps:
        if any(r.get("step") == step and r.get("test_accuracy") is not None for r in ckpt.get("history") or []):
            return "done", step
    return "resume", step


def run_grid(out: PathLike, estimators: Union[str, Sequence[str], None] = None,
             quantizers: Union[str, Sequence[str], None] = None,
             optimizers: Union[str, Sequence[str], None] = None,
             seeds: Union[str, int, Sequence[int], None] = None, *,
             config: Union[TrainConfig, Dict[str, Any], None] = None, last_k: int = DEFAULT_LAST_K,
             x_axis: str = "step", progress: Optional[bool] = None,
             log: Optional[Callable[[str], None]] = None, **options) -> Dict[str, Any]:
    """Train the grid ``estimators × quantizers × optimizers × seeds`` into ``out`` and write its
    report (``results.md``, ``results.json``, ``curves.png``); returns the report (as in
    ``results.json``).

    Each axis is a sequence or a comma list (seeds also take ranges, ``"0-4"``); an axis left
    ``None`` takes the base configuration's value. The base configuration is ``config`` (a
    :class:`~fsg.train.config.TrainConfig` or a dict of its fields; default ``TrainConfig()``) updated
    with ``options`` (TrainConfig fields, e.g. ``model="small-cnn", epochs=1``); its ``out`` and
    the axes' fields are set per run. ``last_k``: evaluations averaged per run (see the module
    doc); ``x_axis``: ``"step"`` or ``"epoch"`` for the curves. ``progress`` and ``log`` go to
    :func:`fsg.train.loop.train` (``log`` also gets one line per run).

    Runs that finished are skipped, unfinished ones resumed from their ``last.pt``. Raises
    ``ValueError`` (one line) for bad input before anything is trained, and the errors of
    :func:`fsg.train.loop.train`; on Ctrl-C, :class:`fsg.train.interrupt.TrainingInterrupted` after the current run
    saved its checkpoint (running the grid again resumes it).
    """
    if log is None:
        log = _stderr_log
    _check_report_args(last_k, x_axis)
    base_cfg = _base_config(config, options)
    axes = _grid_axes(base_cfg, estimators, quantizers, optimizers, seeds)
    _check_shared_settings(base_cfg, axes)
    out = Path(out)
    plan = _plan(out, base_cfg, *axes.values())
    states = [_state(name, cfg) for name, cfg in plan]  # every checkpoint checked before training

    out.mkdir(parents=True, exist_ok=True)
    _write_grid_json(out, axes, base_cfg)
    _train_runs(plan, states, progress, log)
    return write_report(out, last_k=last_k, x_axis=x_axis, order=[run_name(*a) for a in _axes_product(axes)],
                        log=log)


def _stderr_log(msg: str) -> None:
    """The default log: one line on stderr, flushed."""
    print(msg, file=sys.stderr, flush=True)


def _base_config(config: Union[TrainConfig, Dict[str, Any], None], options: Dict[str, Any]) -> TrainConfig:
    """The grid's base configuration (``config`` updated with ``options``), not validated; binarized only."""
    if config is None:
        base = TrainConfig().to_dict()
    elif isinstance(config, TrainConfig):
        base = config.to_dict()
    elif isinstance(config, dict):
        base = {**TrainConfig().to_dict(), **config}
    else:
        raise ValueError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    base.update(options)
    try:
        base_cfg = TrainConfig.from_dict(base, validate=False)
    except TypeError as e:
        raise ValueError(" ".join(str(e).split())) from None
    if base_cfg.full_precision:
        raise ValueError("a grid trains binarized networks (full_precision must be false; use 'fsg pretrain')")
    return base_cfg


def _grid_axes(base_cfg: TrainConfig, estimators, quantizers, optimizers, seeds) -> Dict[str, list]:
    """The parsed axes ``{estimators, quantizers, optimizers, seeds}``, an axis left ``None`` from ``base_cfg``."""
    from fsg.estimators import ESTIMATORS
    from fsg.quantizers import QUANTIZERS
    from fsg.optim import OPTIMIZERS

    estimators = parse_list(base_cfg.estimator if estimators is None else estimators, "estimators", list(ESTIMATORS))
    quantizers = parse_list(base_cfg.quantizer if quantizers is None else quantizers, "quantizers", list(QUANTIZERS))
    optimizers = parse_list(base_cfg.optimizer if optimizers is None else optimizers, "optimizers", list(OPTIMIZERS))
    seeds = parse_seeds(base_cfg.seed if seeds is None else seeds)
    return {"estimators": estimators, "quantizers": quantizers, "optimizers": optimizers, "seeds": seeds}


def _check_shared_settings(base_cfg: TrainConfig, axes: Dict[str, list]) -> None:
    """Validate what every run shares (without a run name), the device and the pre-trained weights' file."""
    base_cfg.replace(estimator=axes["estimators"][0], quantizer=axes["quantizers"][0],
                     optimizer=axes["optimizers"][0], seed=axes["seeds"][0],
                     estimator_options={}).validate()  # errors of the shared settings, without a run name
    require_device(base_cfg.device)  # an unusable device: one line, before anything is written
    if base_cfg.pretrained and not Path(base_cfg.pretrained).is_file():
        raise ValueError(f"pre-trained weights not found: {base_cfg.pretrained!r}")


def _write_grid_json(out: Path, axes: Dict[str, list], base_cfg: TrainConfig) -> None:
    """Write ``<out>/grid.json``: the axes and the shared configuration (without the axes' fields and ``out``)."""
    base_dict = base_cfg.to_dict()
    for k in GRID_AXES + ("out",):
        base_dict.pop(k, None)
    atomic_write_text(out / "grid.json", json.dumps({"axes": axes, "config": base_dict}, indent=2) + "\n")


def _train_runs(plan: List[Tuple[str, TrainConfig]], states: List[Tuple[str, Optional[int]]],
                progress: Optional[bool], log: Callable[[str], None]) -> None:
    """Train (or resume, or skip when finished) every planned run in turn, one log line each."""
    n = len(plan)
    for i, ((name, cfg), (state, step)) in enumerate(zip(plan, states), 1):
        if state == "done":
            log(f"fsg grid: [{i}/{n}] {name}: finished (step {step}), skipped")
            continue
        if state == "resume":
            log(f"fsg grid: [{i}/{n}] {name}: resuming from step {step} ({cfg.out}/last.pt)")
        else:
            log(f"fsg grid: [{i}/{n}] {name}: training")
        try:
            _run.train(cfg, resume=Path(cfg.out) / "last.pt" if state == "resume" else None,
                       progress=progress, log=log)
        except TrainingInterrupted as e:
            msg = e.message + "; running the same grid again resumes every unfinished run"
            raise TrainingInterrupted(msg, e.checkpoint, e.step, e.signum) from None


def _axes_product(axes: Dict[str, list]):
    for e in axes["estimators"]:
        for q in axes["quantizers"]:
            for o in axes["optimizers"]:
                for s in axes["seeds"]:
                    yield e, q, o, s


# ----------------------------------------------------------------------------------------------
# reading runs


def _epoch_ends(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The run's ``epoch`` and ``final`` rows in order, a ``final`` row dropped when a later row of
    the same epoch follows it (a run stopped by max_steps mid-epoch, then resumed)."""
    ends = [r for r in rows if r.get("kind") in ("epoch", "final")]
    return [r for i, r in enumerate(ends)
            if not (r["kind"] == "final" and any(later.get("epoch") == r.get("epoch") for later in ends[i + 1:]))]


def _evaluations(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The run's evaluations: the rows of :func:`_epoch_ends` that have a test accuracy."""
    return [r for r in _epoch_ends(rows) if r.get("test_accuracy") is not None]


def _finished(cfg: Dict[str, Any], rows: List[Dict[str, Any]]) -> bool:
    ends = [r for r in rows if r.get("kind") in ("epoch", "final")]
    if any(r.get("kind") == "epoch" and (r.get("epoch") or 0) >= cfg.get("epochs", math.inf) for r in ends):
        return True
    ms = cfg.get("max_steps")
    return ms is not None and any((r.get("step") or 0) >= ms for r in ends)


def collect_runs(out: PathLike, last_k: int = DEFAULT_LAST_K) -> Dict[str, Dict[str, Any]]:
    """Every run directory directly under ``out`` (one holding ``config.json`` and
    ``metrics.jsonl``), summarised: ``{name: {estimator, quantizer, optimizer, seed, config,
    rows, evaluations, acc_k, k_used, train_loss, final_test_accuracy, steps, epochs, finished}}``
    (``acc_k``/``train_loss`` ``None`` for a run not evaluated yet)."""
    runs: Dict[str, Dict[str, Any]] = {}
    for d in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        if not (d / "config.json").is_file() or not (d / "metrics.jsonl").is_file():
            continue
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(cfg, dict) or cfg.get("full_precision"):
            continue
        rows = MetricsLog.read(d / "metrics.jsonl")
        evals = _evaluations(rows)
        used = evals[-last_k:]
        acc_k = sum(r["test_accuracy"] for r in used) / len(used) if used else None
        steps = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=0)
        epochs = max((r["epoch"] for r in rows if r.get("kind") == "epoch"), default=0)
        runs[d.name] = {
            "dir": str(d), "estimator": cfg.get("estimator"), "quantizer": cfg.get("quantizer"),
            "optimizer": cfg.get("optimizer"), "seed": cfg.get("seed"), "config": cfg, "rows": rows,
            "evaluations": len(evals), "k_used": len(used), "acc_k": acc_k,
            "train_loss": evals[-1].get("train_loss") if evals else None,
            "final_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
            "steps": steps, "epochs": epochs, "finished": _finished(cfg, rows),
        }
    return runs


def _mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


# ----------------------------------------------------------------------------------------------
# the report


def _check_report_args(last_k, x_axis) -> None:
    if isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1:
        raise ValueError(f"last_k must be a positive integer, got {last_k!r}")
    if x_axis not in ("step", "epoch"):
        raise ValueError(f"x_axis must be 'step' or 'epoch', got {x_axis!r}")


def write_report(out: PathLike, last_k: int = DEFAULT_LAST_K, x_axis: str = "step",
                 order: Optional[Sequence[str]] = None, log: Optional[Callable[[str], None]] = None
                 ) -> Dict[str, Any]:
    """Summarise the runs under ``out`` into ``results.md``, ``results.json`` and ``curves.png``
    (``fsg grid --report-only``); returns the report. ``order``: run names in the order their
    groups should appear (others follow, sorted); default: ``<out>/grid.json``'s axes when present.
    Raises a one-line ``ValueError`` when ``out`` holds no run."""
    if log is None:
        log = _stderr_log
    _check_report_args(last_k, x_axis)
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"no grid directory {str(out)!r}")
    runs = collect_runs(out, last_k)
    if not runs:
        raise ValueError(f"{str(out)!r} holds no run (no <run>/config.json with metrics.jsonl)")
    rank = {name: i for i, name in enumerate(_report_order(out, order))}
    names = sorted(runs, key=lambda n: (rank.get(n, len(rank)), runs[n]["estimator"] or "",
                                        runs[n]["quantizer"] or "", runs[n]["optimizer"] or "", runs[n]["seed"] or 0))
    default = TrainConfig().to_dict()
    full = {n: {**default, **runs[n]["config"]} for n in names}  # older config.json files lack newer fields
    groups, labels, settings = _group_runs(out, runs, names, full)
    report_groups = [_group_report(key, members, runs, full, settings) for key, members in groups.items()]
    report = _report(out, last_k, runs, names, report_groups)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "results.md", format_markdown(report))
    plotted = _plot(out / "curves.png", runs, names, {labels[k]: v for k, v in groups.items()}, x_axis, log)
    report["curves"] = str(out / "curves.png") if plotted else None
    return report


def _report_order(out: Path, order: Optional[Sequence[str]]) -> Sequence[str]:
    """``order``, else the run names of ``<out>/grid.json``'s axes (none when it is missing or unreadable)."""
    if order is None:
        try:
            axes = json.loads((out / "grid.json").read_text())["axes"]
            order = [run_name(*a) for a in _axes_product(axes)]
        except (OSError, ValueError, KeyError, TypeError):
            order = []
    return order


def _group_runs(out: Path, runs: Dict[str, Dict[str, Any]], names: List[str], full: Dict[str, Dict[str, Any]]):
    """``(groups, labels, settings)``: the runs (in ``names`` order) grouped by configuration without the seed
    and the run-only settings (:data:`_REPORT_FREE`), each group's curve label, and the settings that tell the
    groups apart; a seed repeated within a group is an error."""
    by_key: Dict[str, List[str]] = {}
    for name in names:
        by_key.setdefault(_group_key(full[name]), []).append(name)
    settings = _distinguishing_settings([full[m[0]] for m in by_key.values()])
    groups: Dict[Tuple[str, ...], List[str]] = {}
    labels: Dict[Tuple[str, ...], str] = {}
    for members in by_key.values():
        c = full[members[0]]
        shown = {k: c.get(k) for k in settings}
        key = (c["estimator"], c["quantizer"], c["optimizer"], json.dumps(shown, sort_keys=True))
        groups[key] = members
        labels[key] = " / ".join([c["estimator"], c["quantizer"], c["optimizer"]] + [_setting(k, v) for k, v in shown.items()])
        seen: Dict[Any, str] = {}
        for m in members:
            seed = runs[m]["seed"]
            if seed in seen:
                raise ValueError(f"runs {seen[seed]} and {m} in {str(out)!r} have the same configuration and seed "
                                 f"{seed}: a seed cannot count twice; move one of them out of the directory")
            seen[seed] = m
    return groups, labels, settings


def _group_report(key: Tuple[str, ...], members: List[str], runs: Dict[str, Dict[str, Any]],
                  full: Dict[str, Dict[str, Any]], settings: List[str]) -> Dict[str, Any]:
    """One group's entry of the report: its settings, accuracy and loss over the seeds, runs and notes."""
    e, q, o = key[:3]
    scored = [m for m in members if runs[m]["acc_k"] is not None]
    members_sorted = sorted(members, key=lambda m: runs[m]["seed"] or 0)
    acc_mean, acc_std = _mean_std([runs[m]["acc_k"] for m in scored])
    loss_vals = [runs[m]["train_loss"] for m in scored if runs[m]["train_loss"] is not None]
    loss_mean, loss_std = _mean_std(loss_vals)
    steps = sorted({runs[m]["steps"] for m in scored})
    differ = sorted({k for m in members for k in _NOTED if full[m].get(k) != full[members[0]].get(k)})
    return {
        "estimator": e, "quantizer": q, "optimizer": o,
        "settings": {k: full[members[0]].get(k) for k in settings},
        "n_seeds": len(scored), "seeds": sorted(runs[m]["seed"] for m in scored),
        "test_accuracy_last_k": {"mean": acc_mean, "std": acc_std},
        "train_loss": {"mean": loss_mean, "std": loss_std},
        "steps": steps, "runs": members_sorted,
        "estimator_options": runs[members_sorted[0]]["config"].get("estimator_options") or {},
        "not_evaluated": [m for m in members_sorted if runs[m]["acc_k"] is None],
        "unfinished": [m for m in members_sorted if not runs[m]["finished"]],
        "settings_differ": differ,
    }


def _report(out: Path, last_k: int, runs: Dict[str, Dict[str, Any]], names: List[str],
            report_groups: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The report (as in ``results.json``): the metric's definition, common settings, groups and runs."""
    common = _common_settings([runs[n]["config"] for n in names])
    return {
        "grid": str(out),
        "last_k": last_k,
        "metric": {
            "test_accuracy_last_k": f"per run: mean test accuracy (fraction) of its last {last_k} evaluations "
                                    "(one per evaluated epoch, or the final evaluation of a run stopped by "
                                    "max_steps; all of them if fewer); per group: mean and sample std (n-1) "
                                    "over seeds",
            "train_loss": "per run: train_loss of its last evaluation row (mean training loss over the last, "
                          "possibly partial, epoch); per group: mean and sample std (n-1) over seeds",
        },
        "common_settings": common,
        "groups": report_groups,
        "runs": {n: {k: v for k, v in runs[n].items() if k not in ("rows", "config")} for n in names},
    }


#: Settings that do not define a group of the report: the seed, where a run lives and reads its data,
#: and how it logs, checkpoints, threads or reacts to non-finite steps (shown when they differ).
_REPORT_FREE = frozenset({"seed", "out", "data_dir", "download", "log_every", "tensorboard", "num_threads",
                          "eval_batch_size", "device", "nonfinite", "max_skips", "save_every", "save_every_seconds"})


#: Run-only settings that may still change a run's numbers: noted when a group's runs differ in them.
_NOTED = ("device", "nonfinite", "max_skips")


def _group_key(cfg: Dict[str, Any]) -> str:
    """The configuration of a run without its seed and run-only settings, as a canonical string."""
    return json.dumps({k: v for k, v in cfg.items() if k not in _REPORT_FREE}, sort_keys=True, default=str)


def _distinguishing_settings(configs: List[Dict[str, Any]]) -> List[str]:
    """The settings (besides estimator, quantizer, optimizer) in which the groups' configurations
    differ, to tell the groups apart in the table; the estimator options only when the same
    estimator appears with different ones (else they follow from the estimator)."""
    keys = sorted({k for c in configs for k in c} - _REPORT_FREE - {"estimator", "quantizer", "optimizer"})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    if "estimator_options" in differ:
        per_est: Dict[str, set] = {}
        for c in configs:
            per_est.setdefault(c.get("estimator"), set()).add(json.dumps(c.get("estimator_options"), sort_keys=True))
        if all(len(v) == 1 for v in per_est.values()):
            differ.remove("estimator_options")
    return differ


def _setting(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value}"


_COMMON_KEYS = ("model", "dataset", "data_dir", "pretrained", "bits", "epochs", "max_steps", "batch_size", "lr",
                "lr_step", "lr_gamma", "weight_decay", "augment", "train_subset", "test_subset", "val_split", "keep_first",
                "keep_last", "activations", "update_on_observe", "estimator_options", "dataset_options")


_ALWAYS_SHOWN = ("model", "dataset", "epochs", "batch_size", "lr")


def _common_settings(configs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Settings shared by every run (for the report's header): the main ones, and the others
    where they differ from the defaults."""
    default = TrainConfig().to_dict()
    common = {}
    for k in _COMMON_KEYS:
        vals = [c.get(k) for c in configs]
        if all(v == vals[0] for v in vals) and (k in _ALWAYS_SHOWN or vals[0] != default.get(k)):
            common[k] = vals[0]
    return common


def _pm(mean: Optional[float], std: Optional[float], scale: float, digits: int) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def format_markdown(report: Dict[str, Any]) -> str:
    """``results.md`` of a report."""
    k = report["last_k"]
    lines = [f"# Grid results: {report['grid']}", ""]
    if report["common_settings"]:
        lines += ["Settings common to every run: " + ", ".join(
            f"{key}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
            for key, v in report["common_settings"].items()) + ".", ""]
    with_settings = any(g.get("settings") for g in report["groups"])
    lines += [f"| estimator | quantizer | optimizer |{' settings |' if with_settings else ''} test accuracy % (last {k} "
              f"eval{'s' * (k > 1)}) | final train loss | seeds | steps |",
              f"|---|---|---|{'---|' if with_settings else ''}---:|---:|---:|---:|"]
    notes = []
    for g in report["groups"]:
        steps = g["steps"]
        steps_txt = "n/a" if not steps else (str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}")
        shown = ", ".join(_setting(key, v) for key, v in (g.get("settings") or {}).items())
        lines.append(f"| {g['estimator']} | {g['quantizer']} | {g['optimizer']} | "
                     + (f"{shown} | " if with_settings else "") +
                     f"{_pm(g['test_accuracy_last_k']['mean'], g['test_accuracy_last_k']['std'], 100, 2)} | "
                     f"{_pm(g['train_loss']['mean'], g['train_loss']['std'], 1, 4)} | {g['n_seeds']} | {steps_txt} |")
        label = f"{g['estimator']}-{g['quantizer']}-{g['optimizer']}" + (f" ({shown})" if shown else "")
        if g["estimator_options"] and "estimator_options" not in report["common_settings"]:
            notes.append(f"{label}: estimator options " + ", ".join(f"{o}={v}" for o, v in g["estimator_options"].items()))
        if g["not_evaluated"]:
            notes.append(f"{label}: not evaluated yet, left out: {', '.join(g['not_evaluated'])}")
        if g["unfinished"]:
            notes.append(f"{label}: unfinished, included with the evaluations they have: {', '.join(g['unfinished'])}")
        if g["settings_differ"]:
            notes.append(f"{label}: its runs differ in {', '.join(g['settings_differ'])}")
    short = [n for n, r in report["runs"].items() if r["acc_k"] is not None and r["k_used"] < k]
    lines += ["",
              f"Test accuracy: per run, the mean test accuracy over its last {k} evaluations (one per epoch; a run "
              "stopped by max_steps mid-epoch contributes its final evaluation; a run with fewer evaluations "
              "averages all it has); then mean ± sample standard deviation (n−1) of these per-run means over the "
              "seeds. Final train loss: per run, the mean training loss of its last (possibly partial) epoch; "
              "mean ± sample standard deviation over the seeds. With one seed, no ± is shown. Per-run values: "
              "results.json."]
    counts = {report["runs"][n]["k_used"] for n in short}
    if short and len(short) == len(report["runs"]) and len(counts) == 1:
        c = counts.pop()
        lines += ["", f"Every run has only {c} evaluation{'s' * (c > 1)} (fewer than {k}): all averaged."]
    elif short:
        lines += ["", f"Runs with fewer than {k} evaluations (all averaged): "
                  + ", ".join(f"{n} ({report['runs'][n]['k_used']})" for n in short) + "."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# curves


def _series(rows: List[Dict[str, Any]], x_axis: str) -> Tuple[Tuple[list, list], Tuple[list, list]]:
    """((x, train loss), (x, test accuracy %)) of one run."""
    evals = _evaluations(rows)
    if x_axis == "step":
        steps = [r for r in rows if r.get("kind") == "step" and r.get("loss") is not None]
        if steps:
            loss = ([r["step"] for r in steps], [r["loss"] for r in steps])
        else:
            ends = [r for r in rows if r.get("kind") in ("epoch", "final") and r.get("train_loss") is not None]
            loss = ([r["step"] for r in ends], [r["train_loss"] for r in ends])
        acc = ([r["step"] for r in evals], [100 * r["test_accuracy"] for r in evals])
    else:
        ends = [r for r in _epoch_ends(rows) if r.get("train_loss") is not None]
        loss = ([r["epoch"] for r in ends], [r["train_loss"] for r in ends])
        acc = ([r["epoch"] for r in evals], [100 * r["test_accuracy"] for r in evals])
    return loss, acc


def _plot(path: Path, runs, names, groups, x_axis: str, log) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log("fsg grid: matplotlib is not installed, so curves.png was not written (pip install matplotlib)")
        return False
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for colour, (label, members) in zip(colours, groups.items()):
        series = [_series(runs[m]["rows"], x_axis) for m in members]
        for panel, ax in ((0, ax_loss), (1, ax_acc)):
            curves = [s[panel] for s in series if s[panel][0]]
            if not curves:
                continue
            same_x = len(curves) > 1 and all(c[0] == curves[0][0] for c in curves)
            for j, (x, y) in enumerate(curves):
                ax.plot(x, y, color=colour, linewidth=0.8, alpha=0.35 if same_x else 0.8,
                        marker="." if len(x) < 30 and panel == 1 else None,
                        label=None if (same_x or j) else f"{label} ({len(curves)} seed{'s' * (len(curves) > 1)})")
            if same_x:
                mean = [statistics.fmean(v) for v in zip(*(c[1] for c in curves))]
                ax.plot(curves[0][0], mean, color=colour, linewidth=2.0,
                        marker="." if len(mean) < 30 and panel == 1 else None,
                        label=f"{label} (mean of {len(curves)} seeds)")
    xlabel = "training step" if x_axis == "step" else "epoch"
    ax_loss.set(title="training loss", xlabel=xlabel, ylabel="cross-entropy")
    ax_acc.set(title="test accuracy", xlabel=xlabel, ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return True
