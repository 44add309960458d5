"""``fsg train``, ``fsg pretrain`` and ``fsg eval``: parse, then call :func:`fsg.train.loop.train`
or :func:`fsg.train.loop.evaluate` and print the result."""

from __future__ import annotations

import argparse
import json
import sys

from fsg.cli.options import (HelpFormatter, add_train_options, config_from_args, finite_or_none, fmt_pct,
                             positive_int)

__all__ = ["add_parsers", "cmd_train", "cmd_eval"]


def add_parsers(sub) -> None:
    """The ``train``, ``pretrain`` and ``eval`` subcommands."""
    tr = sub.add_parser(
        "train", help="train a binarized network (CIFAR ResNets, small CNN) with a gradient estimator",
        description="Train a binarized network with a gradient estimator (METHOD.md §3, §6). Writes "
        "<out>/config.json, metrics.jsonl, metrics.csv and last.pt (a checkpoint after every epoch, with "
        "--save-every also mid-epoch, and on Ctrl-C or SIGTERM, which exit with status 130 or 143); --resume "
        "continues a run exactly. Options not given "
        "come from --config FILE, else from the defaults shown.",
    )
    add_train_options(tr, pretrain=False)
    tr.set_defaults(func=cmd_train, command_parser=tr, pretrain=False)

    pt = sub.add_parser(
        "pretrain", help="train the full-precision network (no binarization), for --pretrained",
        description="Train the full-precision network (no binarization, plain autograd) with the same "
        "loop, logs and checkpoints as 'fsg train'. Writes <out>/model.pt, a state_dict to pass to "
        "'fsg train --pretrained'.",
    )
    add_train_options(pt, pretrain=True)
    pt.set_defaults(func=cmd_train, command_parser=pt, pretrain=True)

    ev = sub.add_parser("eval", help="test loss and accuracy of a checkpoint",
                        description="Evaluate the model of a checkpoint (last.pt, or a run directory) on the "
                        "test split of the dataset it was trained on.", formatter_class=HelpFormatter)
    ev.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run directory holding last.pt")
    ev.add_argument("--data-dir", help="where the dataset lives (default: as in the checkpoint's configuration)")
    ev.add_argument("--batch-size", type=positive_int, help="evaluation batch size")
    ev.add_argument("--test-subset", type=positive_int, metavar="N",
                    help="only a fixed random subset of N test images")
    ev.add_argument("--device", help="torch device (default: as trained)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval, command_parser=ev)


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``fsg train`` and ``fsg pretrain``: train (or resume) one run and print where it is and how it did."""
    from fsg.train.loop import train

    cfg, resume = config_from_args(args)
    progress = not args.no_progress and sys.stderr.isatty()
    result = train(cfg, resume=resume, progress=progress)
    summary = {
        "out": str(result.out), "checkpoint": str(result.checkpoint), "epochs": result.epochs,
        "steps": result.steps, "stopped": result.stopped, "test_loss": finite_or_none(result.test_loss)
        if result.test_loss is not None else None, "test_accuracy": result.test_accuracy,
    }
    if cfg.full_precision:
        summary["model"] = str(result.out / "model.pt")
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
        return 0
    loss = "n/a" if result.test_loss is None else f"{result.test_loss:.4f}"
    line = (f"{'pretrained' if cfg.full_precision else 'trained'} {result.steps} steps ({result.epochs} epochs) "
            f"in {result.out}: test loss {loss}, test accuracy {fmt_pct(result.test_accuracy)}; "
            f"checkpoint {result.checkpoint}")
    if cfg.full_precision:
        line += f"; weights for --pretrained: {result.out / 'model.pt'}"
    print(line)
    return 0


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``fsg eval``: test loss and accuracy of a checkpoint."""
    from fsg.train.loop import evaluate as evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.data_dir, batch_size=args.batch_size,
                            test_subset=args.test_subset, device=args.device)
    if args.json:
        print(json.dumps({k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in r.items()},
                         indent=2, allow_nan=False))
    else:
        print(f"{r['checkpoint']} (epoch {r['epoch']}, step {r['step']}): test loss {r['loss']:.4f}, "
              f"test accuracy {fmt_pct(r['accuracy'])} on {r['images']} images")
    return 0
