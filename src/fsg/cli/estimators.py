"""``fsg estimators``: the registered gradient estimators, quantizers and base optimizers."""

from __future__ import annotations

import argparse

from fsg.estimators import ESTIMATORS
from fsg.optim import OPTIMIZERS
from fsg.quantizers import QUANTIZERS

__all__ = ["add_parser", "cmd_estimators"]


def add_parser(sub) -> None:
    """The ``estimators`` subcommand."""
    est = sub.add_parser("estimators", help="list the registered estimators, quantizers and optimizers",
                         description="List the registered gradient estimators, quantizers and base optimizers.")
    est.set_defaults(func=cmd_estimators, command_parser=est)


def _summary(cls) -> str:
    """First paragraph of a class docstring, on one line, without RST double backquotes."""
    doc = (cls.__doc__ or "").strip()
    first = doc.split("\n\n")[0] if doc else "(no description)"
    return " ".join(first.split()).replace("``", "")


def cmd_estimators(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``fsg estimators``: one line per estimator and quantizer, then the optimizers."""
    out = ["estimators (--estimators):"]
    width = max(map(len, list(ESTIMATORS) + list(QUANTIZERS))) + 2
    for name, cls in ESTIMATORS.items():
        out.append(f"  {name:<{width}}{_summary(cls)}")
    out.append("")
    out.append("quantizers (--quantizer):")
    for name, cls in QUANTIZERS.items():
        out.append(f"  {name:<{width}}{_summary(cls)}")
    out.append("")
    out.append(f"optimizers (--optimizer): {', '.join(OPTIMIZERS)}")
    print("\n".join(out))
    return 0

