"""``fsg grid``: parse, then call :func:`fsg.train.grid.run_grid` (or
:func:`fsg.train.grid.write_report` for ``--report-only``) and print the table."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fsg.cli.options import CONFIG_FIELDS, add_train_options, config_dict_from_args, flag, positive_int
from fsg.estimators import ESTIMATORS
from fsg.optim import OPTIMIZERS
from fsg.quantizers import QUANTIZERS

__all__ = ["add_parser", "cmd_grid"]


def add_parser(sub) -> None:
    """The ``grid`` subcommand."""
    gr = sub.add_parser(
        "grid", help="train a grid of runs (estimators x quantizers x optimizers x seeds) and tabulate them",
        description="Train every combination of --estimators, --quantizers, --optimizers and --seeds, one "
        "after the other, each into <out>/<estimator>-<quantizer>-<optimizer>-s<seed>/ (as 'fsg train'; "
        "every other option applies to every run; an estimator option goes to the estimators that take "
        "it). Runs that finished are skipped and unfinished ones resumed from their last.pt, so running "
        "the same command again continues the grid. Then writes <out>/results.md and results.json (per "
        "estimator/quantizer/optimizer: mean ± sample std over seeds of each run's mean test accuracy "
        "over its last K evaluated epochs, and of its final training loss) and <out>/curves.png "
        "(needs matplotlib). --report-only DIR rebuilds these from existing runs.",
    )
    g = gr.add_argument_group("grid")
    g.add_argument("--estimators", metavar="LIST", help=f"comma list from: {', '.join(ESTIMATORS)} "
                   "(default: the configuration's estimator, fsg)")
    g.add_argument("--quantizers", metavar="LIST", help=f"comma list from: {', '.join(QUANTIZERS)} "
                   "(default: dorefa)")
    g.add_argument("--optimizers", metavar="LIST", help=f"comma list from: {', '.join(OPTIMIZERS)} (default: sgd)")
    g.add_argument("--seeds", metavar="LIST", help="comma list of seeds, ranges allowed: 0,1,2 or 0-4 (default: 0)")
    g.add_argument("--out", dest="grid_out", metavar="DIR", default="runs/grid",
                   help="grid directory (default: runs/grid)")
    g.add_argument("--last-k", type=positive_int, default=10, metavar="K",
                   help="evaluations (epochs) averaged per run in the table (default: 10, MetaQuant's)")
    g.add_argument("--x-axis", choices=["step", "epoch"], default="step", help="x axis of curves.png (default: step)")
    g.add_argument("--report-only", metavar="DIR",
                   help="train nothing: rebuild DIR/results.md, results.json and curves.png from the runs in DIR")
    add_train_options(gr, pretrain=False, grid=True)
    gr.set_defaults(func=cmd_grid, command_parser=gr, pretrain=False, resume=None)


def cmd_grid(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``fsg grid``: train the grid (or only rebuild its report) and print the results table."""
    from fsg.train.grid import format_markdown, run_grid, write_report

    if args.report_only is not None:
        given = [k[4:] if k.startswith("est_") else k for k in vars(args)  # train options
                 if k in CONFIG_FIELDS or k.startswith("est_")]
        given += [k for k in ("config", "dataset_option", "estimator_option", "estimators", "quantizers",
                              "optimizers", "seeds") if getattr(args, k)]
        if args.grid_out != "runs/grid":
            given.append("out")
        if given:
            raise ValueError(f"--report-only trains nothing: it takes only --last-k, --x-axis and --json "
                             f"(got {', '.join(flag(k) for k in given)})")
        report = write_report(args.report_only, last_k=args.last_k, x_axis=args.x_axis)
        out = args.report_only
    else:
        progress = not args.no_progress and sys.stderr.isatty()
        report = run_grid(args.grid_out, args.estimators, args.quantizers, args.optimizers, args.seeds,
                          config=config_dict_from_args(args), last_k=args.last_k, x_axis=args.x_axis,
                          progress=progress)
        out = args.grid_out
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        return 0
    print(format_markdown(report), end="")
    files = ["results.md", "results.json"] + (["curves.png"] if report.get("curves") else [])
    print(f"\nwrote {', '.join(os.path.join(out, f) for f in files)}")
    return 0
