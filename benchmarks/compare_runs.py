"""Compare finished runs: a markdown table and one PNG of their training-loss curves.

    python benchmarks/compare_runs.py RUN_DIR [RUN_DIR ...] [--png curves.png] [--last 50]

Reads each run's ``metrics.jsonl`` (``fsg train``): the logged ``step`` rows (mean loss over
each ``--log-every`` window) and the last ``epoch``/``final`` row's test accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsg.train.metrics import MetricsLog


def summarize(run: Path, last: int) -> dict:
    rows = MetricsLog.read(run / "metrics.jsonl")
    steps = [r for r in rows if r.get("kind") == "step"]
    if not steps:
        raise SystemExit(f"compare_runs: no step rows in {run / 'metrics.jsonl'}")
    end = steps[-1]["step"]
    tail = [r["loss"] for r in steps if r["step"] > end - last]
    evals = [r for r in rows if r.get("kind") in ("epoch", "final") and r.get("test_accuracy") is not None]
    return {
        "run": run.name, "steps": end, "curve": [(r["step"], r["loss"]) for r in steps],
        "loss_tail": sum(tail) / len(tail), "test_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "s_per_step": (evals[-1]["epoch_time"] / end) if evals and evals[-1].get("epoch_time") else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--png", type=Path, help="write the training-loss curves here")
    ap.add_argument("--last", type=int, default=50, help="steps averaged for the final training loss")
    args = ap.parse_args(argv)
    res = [summarize(r, args.last) for r in args.runs]
    print(f"| run | steps | train loss (last {args.last} steps) | test accuracy | s/step |")
    print("|---|---:|---:|---:|---:|")
    for r in res:
        acc = "—" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
        sps = "—" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}"
        print(f"| {r['run']} | {r['steps']} | {r['loss_tail']:.4f} | {acc} | {sps} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in res:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, label=r["run"], linewidth=1.6)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (window mean)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
