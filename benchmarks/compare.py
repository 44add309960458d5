"""Which estimator should I use? The comparison protocol of BENCHMARKS.md, in one command.

    python benchmarks/compare.py --out runs/compare --report benchmarks/compare-cpu \\
        --data ../shared/data/cifar10-jpeg.tar.gz \\
        --pretrained ../shared/pretrained/ResNet20-CIFAR10-pretrain.pth --jobs 2 --threads 1

Pre-trained ResNet-20, CIFAR-10 JPEGs, dorefa 1-bit, batch 128, ``--epochs`` (2), a validation
split of ``--val-split`` (5000) training images held out of every run (the same images):

=================  =========  ============================================  =========
group              optimizer  estimator                                     seeds
=================  =========  ============================================  =========
ste-sgd            SGD 1e-3   ste (the paper's lr)                          0, 1, 2
ste-sgd-tuned      SGD        ste at the lr of {3e-3, 1e-2, 3e-2} with the   0, 1, 2
                              best validation accuracy at seed 0
multifc-sgd        SGD 1e-3   multifc                                       0, 1, 2
fsg-stream-sgd     SGD 1e-3   fsg, layout stream                            0, 1, 2
ste-adam           Adam 1e-3  ste                                           0, 1
multifc-adam       Adam 1e-3  multifc                                       0, 1
fsg-flat-sgd       SGD 1e-3   fsg, flat layout, update combined (1 epoch)   0
=================  =========  ============================================  =========

Each run is ``fsg train`` in its own process (``--jobs`` side by side, ``--threads`` each) in
``<out>/<run>/``. Interrupted? Run the same command again: finished runs are skipped (their
records are kept in ``<report>/records/<run>/``), unfinished ones resume from their checkpoint.
Then (and with ``--report-only``) ``<report>/results.md``, ``results.json``, ``curves-steps.png``
and ``curves-seconds.png`` are written: per group the mean ± sample std over seeds of the test
accuracy and the last epoch's training loss, seconds per step, and the equal-compute view (each
group's training loss at the training time of the fastest group's runs).

Seconds measured by runs that share a machine (with each other, with other work) are not
comparable between methods. ``--step-seconds BENCH_JSON`` (the output of ``fsg bench --json
--threads 1``, run alone) puts the seconds on that benchmark's clock instead: a step's time is
``step × the group's s/step``; the runs' own figures stay in the table as "s/step logged".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

TUNE_LRS = (3e-3, 1e-2, 3e-2)
RECORD_FILES = ("config.json", "metrics.jsonl")


@dataclass(frozen=True)
class Group:
    """One method of the protocol: ``fsg train`` options and the seeds it runs."""

    name: str
    options: Dict[str, Any]
    seeds: Sequence[int]
    epochs: Optional[int] = None  # None: the comparison's --epochs
    tune_lr: bool = False  # lr chosen on the validation split at seed 0 among TUNE_LRS
    last: bool = False  # start after every other group's runs


# in the order runs start: seed 0 of every group, then seed 1, …; groups marked ``last`` after all
# others (fsg-flat: one epoch is hours on two CPU cores)
PROTOCOL: List[Group] = [
    Group("ste-sgd", dict(estimator="ste", optimizer="sgd", lr=1e-3), (0, 1, 2)),
    Group("multifc-sgd", dict(estimator="multifc", optimizer="sgd", lr=1e-3), (0, 1, 2)),
    Group("fsg-stream-sgd", dict(estimator="fsg", optimizer="sgd", lr=1e-3,
                                 estimator_options={"layout": "stream"}), (0, 1, 2)),
    Group("ste-sgd-tuned", dict(estimator="ste", optimizer="sgd"), (0, 1, 2), tune_lr=True),
    Group("ste-adam", dict(estimator="ste", optimizer="adam", lr=1e-3), (0, 1)),
    Group("multifc-adam", dict(estimator="multifc", optimizer="adam", lr=1e-3), (0, 1)),
    Group("fsg-flat-sgd", dict(estimator="fsg", optimizer="sgd", lr=1e-3,
                               estimator_options={"layout": "flat", "update": "combined"}), (0,), epochs=1,
          last=True),
]
GROUPS = {g.name: g for g in PROTOCOL}


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def run_name(group: str, seed: int, lr: Optional[float] = None) -> str:
    return f"{group}-lr{_lr_tag(lr)}-s{seed}" if lr is not None else f"{group}-s{seed}"


# ----------------------------------------------------------------------------------------------
# reading runs and the report (pure functions of the run records)


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of a metrics.jsonl (a partial last line is skipped)."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def run_summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Figures of one run from its metric rows: the last evaluation's test (and validation)
    accuracy, the last epoch's mean training loss, steps, training seconds and seconds per step."""
    ends = [r for r in rows if r.get("kind") in ("epoch", "final")]
    evaluated = [r for r in ends if r.get("test_accuracy") is not None]
    if not ends or not evaluated:
        raise ValueError("the run has no evaluated epoch yet")
    last = ends[-1]
    seconds = sum(r.get("epoch_time") or 0.0 for r in ends)
    steps = int(last["step"])
    return {"test_accuracy": evaluated[-1]["test_accuracy"], "val_accuracy": evaluated[-1].get("val_accuracy"),
            "train_loss": last["train_loss"], "steps": steps, "epochs": int(last["epoch"]),
            "train_seconds": seconds, "s_per_step": seconds / steps if steps else None}


def value_at(rows: List[Dict[str, Any]], seconds: float, key: str = "loss") -> Optional[Dict[str, float]]:
    """The last logged step row at or before ``seconds`` of training: ``{step, loss}``; None if
    the run logged nothing that early."""
    best = None
    for r in rows:
        if r.get("kind") == "step" and r.get("train_time") is not None and r["train_time"] <= seconds:
            best = {"step": r["step"], key: r[key], "train_time": r["train_time"]}
    return best


#: which ``fsg bench --json`` step time stands for each group's step (the Adam groups' optimizer step
#: is a few element-wise operations more than SGD's: negligible beside the forward/backward)
BENCH_KEYS = {"ste-sgd": "ste_step_s", "ste-sgd-tuned": "ste_step_s", "ste-adam": "ste_step_s",
              "multifc-sgd": "multifc_step_s", "multifc-adam": "multifc_step_s",
              "fsg-stream-sgd": "fsg_stream_step_s", "fsg-flat-sgd": "fsg_flat_step_s"}


def step_seconds_from_bench(bench: Dict[str, Any]) -> Dict[str, float]:
    """group → seconds per training step, from an ``fsg bench --json`` result (measured one case
    after the other on a quiet machine, so the ratios between groups are not distorted by the
    runs sharing the machine with each other and with other work)."""
    out = {}
    for g, key in BENCH_KEYS.items():
        v = bench.get(key)
        if not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"the benchmark result has no positive {key!r} (for group {g}); "
                             "produce it with: fsg bench --json --threads 1 > step-seconds.json")
        out[g] = float(v)
    return out


def on_clock(rows: List[Dict[str, Any]], s_per_step: float) -> List[Dict[str, Any]]:
    """The rows with training time re-expressed on a benchmark clock: a step row's ``train_time``
    is ``step × s_per_step``, an epoch/final row's ``epoch_time`` ``(step − previous end's step) ×
    s_per_step``; everything else is kept."""
    out, prev = [], 0
    for r in rows:
        r = dict(r)
        if r.get("kind") == "step":
            r["train_time"] = r["step"] * s_per_step
        elif r.get("kind") in ("epoch", "final"):
            r["epoch_time"] = (r["step"] - prev) * s_per_step
            prev = r["step"]
        out.append(r)
    return out


def mean_std(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and sample standard deviation (n − 1; None for a single value)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": m, "std": sd, "n": n}


def retime(runs: Dict[str, Dict[str, Any]], groups: Dict[str, List[str]],
           step_seconds: Optional[Dict[str, float]]) -> Dict[str, Dict[str, Any]]:
    """``runs`` with every group's rows put :func:`on_clock` of ``step_seconds[group]`` (as is
    without ``step_seconds``)."""
    if not step_seconds:
        return runs
    out = dict(runs)
    for g, names in groups.items():
        for n in names:
            out[n] = dict(runs[n], rows=on_clock(runs[n]["rows"], step_seconds[g]))
    return out


def build_report(runs: Dict[str, Dict[str, Any]], groups: Dict[str, List[str]], tuning: Dict[str, Any],
                 step_seconds: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """``runs``: name → {"rows", "config"}; ``groups``: group → its finished run names.
    ``step_seconds`` (group → s/step from a quiet benchmark): the equal-compute view and the
    seconds are on that clock; each run's own logged seconds per step stay in ``logged_s_per_step``."""
    logged = {n: run_summary(r["rows"])["s_per_step"] for n, r in runs.items()}
    runs = retime(runs, groups, step_seconds)
    summaries = {n: dict(run_summary(r["rows"]), logged_s_per_step=logged[n]) for n, r in runs.items()}
    table = {}
    for g, names in groups.items():
        if not names:
            continue
        s = [summaries[n] for n in names]
        table[g] = {"runs": names, "seeds": len(names), "steps": sorted({x["steps"] for x in s}),
                    "lr": sorted({runs[n]["config"].get("lr") for n in names}),
                    "test_accuracy": mean_std([x["test_accuracy"] for x in s]),
                    "train_loss": mean_std([x["train_loss"] for x in s]),
                    "s_per_step": mean_std([x["s_per_step"] for x in s]),
                    "logged_s_per_step": mean_std([x["logged_s_per_step"] for x in s]),
                    "train_seconds": mean_std([x["train_seconds"] for x in s])}
    equal = None
    if table:
        t_eq = min(v["train_seconds"]["mean"] for v in table.values())
        fastest = min(table, key=lambda k: table[k]["train_seconds"]["mean"])
        equal = {"seconds": t_eq, "fastest": fastest, "groups": {}}
        for g, v in table.items():
            at = [value_at(runs[n]["rows"], t_eq) for n in v["runs"]]
            at = [a for a in at if a is not None]
            equal["groups"][g] = {"loss": mean_std([a["loss"] for a in at]),
                                  "step": mean_std([a["step"] for a in at])}
    return {"groups": table, "runs": summaries, "tuning": tuning, "equal_compute": equal,
            "clock": "benchmark" if step_seconds else "logged"}


def _pm(ms: Dict[str, Any], scale: float = 1.0, fmt: str = ".2f") -> str:
    if ms["mean"] is None:
        return "—"
    s = format(ms["mean"] * scale, fmt)
    return s + (f" ± {format(ms['std'] * scale, fmt)}" if ms["std"] is not None else "")


def format_markdown(report: Dict[str, Any]) -> str:
    bench = report.get("clock") == "benchmark"
    lines = ["| group | lr | seeds | steps | test accuracy (%) | train loss, last epoch | s/step |"
             + (" s/step logged |" if bench else ""), "|---|---|---:|---|---:|---:|---:|" + ("---:|" if bench else "")]
    for g, v in report["groups"].items():
        lr = ", ".join(f"{x:g}" for x in v["lr"])
        steps = ", ".join(str(x) for x in v["steps"])
        lines.append(f"| {g} | {lr} | {v['seeds']} | {steps} | {_pm(v['test_accuracy'], 100)} | "
                     f"{_pm(v['train_loss'], 1, '.3f')} | {_pm(v['s_per_step'], 1, '.3f')} |"
                     + (f" {_pm(v['logged_s_per_step'], 1, '.3f')} |" if bench else ""))
    eq = report.get("equal_compute")
    if eq:
        lines += ["", f"Equal compute: at {eq['seconds']:.0f} s of training (the mean training time of "
                  f"{eq['fastest']}), the logged training loss (window mean) and step reached:", "",
                  "| group | train loss at equal time | step reached |", "|---|---:|---:|"]
        for g, v in eq["groups"].items():
            lines.append(f"| {g} | {_pm(v['loss'], 1, '.3f')} | {_pm(v['step'], 1, '.0f')} |")
    if report.get("tuning"):
        t = report["tuning"]
        lines += ["", "STE lr tuning (seed 0, validation accuracy): " +
                  ", ".join(f"lr {lr}: {acc * 100:.2f}%" for lr, acc in t["val_accuracy"].items()) +
                  (f" → {t['best']}" if t.get("best") is not None else "")]
    lines += ["", "Mean ± sample standard deviation over seeds (no ± with one seed)."]
    if bench:
        lines += ["Seconds (s/step, equal compute, the seconds figure) are on the benchmark clock: step × the "
                  "group's s/step from `fsg bench --json` on a quiet machine; 's/step logged' is what the runs "
                  "measured while sharing the machine."]
    return "\n".join(lines) + "\n"


def plot(runs: Dict[str, Dict[str, Any]], groups: Dict[str, List[str]], path: Path, x: str,
         seconds_label: str = "training seconds (this machine)") -> bool:
    """Training loss (step rows) and test accuracy (evaluations) against ``x`` = "step" or
    "train_time"; one colour per group, one line per seed. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (g, names) in enumerate(groups.items()):
        colour = f"C{i % 10}"
        for j, n in enumerate(names):
            rows = runs[n]["rows"]
            steps = [r for r in rows if r.get("kind") == "step" and r.get("train_time") is not None]
            a1.plot([r[x] for r in steps], [r["loss"] for r in steps], color=colour, lw=1, alpha=0.8,
                    label=g if j == 0 else None)
            ends, t = [], 0.0
            for r in rows:
                if r.get("kind") in ("epoch", "final"):
                    t += r.get("epoch_time") or 0.0
                    if r.get("test_accuracy") is not None:
                        ends.append((r["step"] if x == "step" else t, r["test_accuracy"] * 100))
            if ends:
                a2.plot(*zip(*ends), color=colour, marker="o", lw=1, label=g if j == 0 else None)
    label = "training step" if x == "step" else seconds_label
    a1.set(xlabel=label, ylabel="training loss (window mean)", yscale="log", title="training loss")
    a2.set(xlabel=label, ylabel="test accuracy (%)", title="test accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# running the protocol


@dataclass
class Comparison:
    out: Path
    report_dir: Path
    base: Dict[str, Any]
    epochs: int
    threads: int
    groups: List[Group] = field(default_factory=lambda: list(PROTOCOL))
    log: Any = print
    step_seconds: Optional[Dict[str, float]] = None  # group → s/step of a quiet benchmark

    def record_dir(self, name: str) -> Path:
        return self.report_dir / "records" / name

    def rows(self, name: str) -> List[Dict[str, Any]]:
        for d in (self.record_dir(name), self.out / name):
            rows = read_rows(d / "metrics.jsonl")
            if rows:
                return rows
        return []

    def finished(self, name: str) -> bool:
        """A run is finished once its records are archived (after ``fsg train`` exited 0)."""
        return (self.record_dir(name) / "metrics.jsonl").exists()

    def config(self, group: Group, seed: int, lr: Optional[float]) -> Dict[str, Any]:
        cfg = dict(self.base, **group.options, seed=seed, epochs=group.epochs or self.epochs,
                   num_threads=self.threads)
        if lr is not None:
            cfg["lr"] = lr
        return cfg

    def tuning(self) -> Dict[str, Any]:
        """Validation accuracy at seed 0 of each tuned lr; ``best`` once all have finished."""
        acc = {}
        for g in self.groups:
            if g.tune_lr:
                for lr in TUNE_LRS:
                    name = run_name(g.name, 0, lr)
                    if self.finished(name):
                        acc[lr] = run_summary(self.rows(name))["val_accuracy"]
        best = max(acc, key=acc.get) if len(acc) == len(TUNE_LRS) else None
        return {"val_accuracy": acc, "best": best}

    def jobs(self) -> List[Dict[str, Any]]:
        """Every run the protocol needs now: name, config, group (tuned seeds > 0 only once the
        seed-0 tuning is complete)."""
        best = self.tuning()["best"]
        out = []
        for g in self.groups:
            for seed in g.seeds:
                if g.tune_lr and seed == 0:
                    out += [dict(name=run_name(g.name, 0, lr), config=self.config(g, 0, lr), group=g) for lr in TUNE_LRS]
                elif g.tune_lr:
                    if best is not None:
                        out.append(dict(name=run_name(g.name, seed, best), config=self.config(g, seed, best), group=g))
                else:
                    out.append(dict(name=run_name(g.name, seed), config=self.config(g, seed, None), group=g))
        return sorted(out, key=lambda j: (j["group"].last, j["config"]["seed"]))  # stable: protocol order

    def group_runs(self) -> Dict[str, List[str]]:
        """group → its finished runs (for a tuned group: the runs at the chosen lr)."""
        best = self.tuning()["best"]
        groups = {}
        for g in self.groups:
            names = [run_name(g.name, s, best) if g.tune_lr else run_name(g.name, s) for s in g.seeds]
            if g.tune_lr and best is None:
                names = []
            groups[g.name] = [n for n in names if self.finished(n)]
        return groups

    def _command(self, job) -> List[str]:
        d = self.out / job["name"]
        d.mkdir(parents=True, exist_ok=True)
        ckpt = d / "last.pt"
        if ckpt.exists():
            return [sys.executable, "-m", "fsg", "train", "--resume", str(ckpt), "--no-progress",
                    "--num-threads", str(self.threads), "--epochs", str(job["config"]["epochs"])]
        cfg_path = d / "compare-config.json"
        cfg_path.write_text(json.dumps(dict(job["config"], out=str(d)), indent=1))
        return [sys.executable, "-m", "fsg", "train", "--config", str(cfg_path), "--no-progress"]

    def _archive(self, name: str) -> None:
        dst = self.record_dir(name)
        dst.mkdir(parents=True, exist_ok=True)
        for f in RECORD_FILES:
            shutil.copy2(self.out / name / f, dst / f)
        ckpt = self.out / name / "last.pt"
        if ckpt.exists():  # the records are what the report needs; the checkpoint can be GBs
            ckpt.unlink()

    def run(self, jobs_at_once: int) -> None:
        running: Dict[str, subprocess.Popen] = {}
        failed = set()
        while True:
            todo = [j for j in self.jobs() if not self.finished(j["name"])
                    and j["name"] not in running and j["name"] not in failed]
            while todo and len(running) < jobs_at_once:
                job = todo.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
                logf = open(self.out / f"{job['name']}.log", "a")
                self.log(f"compare: start {job['name']}")
                running[job["name"]] = subprocess.Popen(self._command(job), stdout=logf, stderr=subprocess.STDOUT, env=env)
            if not running:
                break
            time.sleep(5)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode == 0:
                    self._archive(name)
                    self.log(f"compare: done {name}")
                else:
                    failed.add(name)
                    self.log(f"compare: {name} failed (exit {proc.returncode}); see {self.out / (name + '.log')}")
        if failed:
            raise SystemExit(f"compare: {len(failed)} run(s) failed: {', '.join(sorted(failed))}")

    def report(self) -> Dict[str, Any]:
        groups = {g: n for g, n in self.group_runs().items() if n}
        runs = {n: {"rows": self.rows(n), "config": json.loads((self.record_dir(n) / "config.json").read_text())}
                for names in groups.values() for n in names}
        report = build_report(runs, groups, self.tuning(), self.step_seconds)
        runs = retime(runs, groups, self.step_seconds)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (self.report_dir / "results.md").write_text(format_markdown(report))
        for x, f in (("step", "curves-steps.png"), ("train_time", "curves-seconds.png")):
            plot(runs, groups, self.report_dir / f, x, "training seconds (quiet-benchmark clock: step × s/step)"
                 if self.step_seconds else "training seconds (as logged, machine shared)")
        return report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/compare", help="run directories (checkpoints; default: runs/compare)")
    p.add_argument("--report", default=None, help="results.md/json, figures, run records (default: --out)")
    p.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz", help="CIFAR-10 JPEG tarball or folder")
    p.add_argument("--pretrained", default="../shared/pretrained/ResNet20-CIFAR10-pretrain.pth")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--val-split", type=int, default=5000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--groups", default=None, help=f"comma list of groups to run (default: all): {', '.join(GROUPS)}")
    p.add_argument("--report-only", action="store_true", help="only write the report from finished runs")
    p.add_argument("--step-seconds", default=None, metavar="BENCH_JSON",
                   help="put seconds on a quiet benchmark's clock: the JSON of `fsg bench --json --threads 1` "
                        "(default: the seconds each run logged)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a base training option for every run (e.g. max_steps=20, test_subset=500)")
    a = p.parse_args(argv)
    groups = list(PROTOCOL)
    if a.groups:
        names = [s.strip() for s in a.groups.split(",") if s.strip()]
        bad = [n for n in names if n not in GROUPS]
        if bad:
            p.error(f"unknown group(s) {', '.join(bad)}: choose from {', '.join(GROUPS)}")
        groups = [GROUPS[n] for n in names]
    base = dict(model="resnet20", dataset="imagefolder", data_dir=a.data, pretrained=a.pretrained,
                quantizer="dorefa", bits=1, batch_size=128, val_split=a.val_split, device=a.device, log_every=10)
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            base[k] = json.loads(v)
        except json.JSONDecodeError:
            base[k] = v
    step_seconds = None
    if a.step_seconds:
        try:
            step_seconds = step_seconds_from_bench(json.loads(Path(a.step_seconds).read_text()))
        except (OSError, ValueError) as e:
            p.error(f"--step-seconds {a.step_seconds}: {e}")
    cmp = Comparison(Path(a.out), Path(a.report or a.out), base, a.epochs, a.threads, groups,
                     step_seconds=step_seconds)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fsg.train.config import TrainConfig

    for job in cmp.jobs():
        try:
            TrainConfig.from_dict(dict(job["config"], out=str(cmp.out / job["name"])))
        except ValueError as e:
            p.error(f"run {job['name']}: {e}")
    cmp.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        cmp.run(a.jobs)
    report = cmp.report()
    print(format_markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
