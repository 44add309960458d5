"""The ``fsg`` parser (one subcommand per verb module of :mod:`fsg.cli`) and its entry point
:func:`main`, which turns the library's errors into one line ``fsg: error: ...`` and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from fsg.cli import bench, demo, estimators, export, grid, train
from fsg.cli.options import Parser
from fsg.train.interrupt import TrainingInterrupted
from fsg.trainer import NonFiniteError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fsg`` argument parser, one subcommand per verb."""
    from fsg import __version__

    parser = Parser(
        prog="fsg",
        description="Binary neural networks trained with learned gradient estimators "
        "(FSG, MetaQuant FC-Grad/MultiFC/LSTMFC, STE).",
    )
    parser.add_argument("--version", action="version", version=f"fsg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_parser(sub)
    estimators.add_parser(sub)
    train.add_parsers(sub)  # train, pretrain, eval
    _add_bench_parser(sub)
    export.add_parsers(sub)  # export, summary
    grid.add_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    """The ``bench`` subcommand (its options and runner live in :mod:`fsg.cli.bench`)."""
    doc = bench.__doc__
    be = sub.add_parser("bench", help="benchmark FSG steps (flat, stream) against STE, and the scan against mambapy",
                        description=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.build_parser(be)
    be.set_defaults(func=lambda args, sub: bench.run(args), command_parser=be)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fsg`` command; returns the exit status (errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: demo, estimators, train, pretrain, eval, export, summary, grid, bench")
    sub = args.command_parser  # its errors point at "fsg <command> --help"
    try:
        return args.func(args, sub)
    except ValueError as e:  # bad options rejected by the library: one clean line, not a traceback
        sub.error(str(e))
    except TrainingInterrupted as e:  # a checkpoint was saved: say where and how to resume
        print(e.message, file=sys.stderr)
        return 128 + e.signum  # 130 after Ctrl-C, 143 after SIGTERM
    except NonFiniteError as e:  # a NaN/Inf step under --nonfinite raise: nothing updated or saved
        print(f"fsg: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fsg demo | head -3`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as e:  # unwritable run directory, full disk, ...: one line, no usage hint
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        sub.exit(2, f"fsg: error: {' '.join(str(e.strerror or e).split())}{where}\n")
    except RuntimeError as e:  # missing or bad data (fsg.data.DataError): one line
        from fsg.data import DataError

        if isinstance(e, DataError):
            sub.error(str(e))
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
