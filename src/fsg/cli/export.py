"""``fsg export`` and ``fsg summary``: parse, then call :func:`fsg.io.export.export_checkpoint` or
:func:`fsg.io.summary.summary` and print the result."""

from __future__ import annotations

import argparse
import json
import math

from fsg.binarize import binarize
from fsg.cli.options import HelpFormatter, flag, positive_int
from fsg.quantizers import QUANTIZERS
from fsg.train.config import MODEL_NAMES

__all__ = ["add_parsers", "cmd_export", "cmd_summary"]


def add_parsers(sub) -> None:
    """The ``export`` and ``summary`` subcommands."""
    ex = sub.add_parser(
        "export", help="write a trained binary network bit-packed (1 bit per weight) in a pickle-free file",
        description="Write the model of a checkpoint (last.pt, or a run directory) with every binarized weight "
        "bit-packed (1 bit per weight plus one scale per layer) and every other tensor in full precision, as a "
        "safetensors file with fsg metadata (format fsg-binary; fsg.load_exported reads it back). No dataset "
        "is needed.", formatter_class=HelpFormatter)
    ex.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run directory holding last.pt")
    ex.add_argument("output", metavar="OUT", help="the file to write (e.g. model.safetensors; replaced atomically)")
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.set_defaults(func=cmd_export, command_parser=ex)

    su = sub.add_parser(
        "summary", help="per-layer parameters, memory and MACs of a (binarized) model",
        description="Per-layer table (binarized or not, 1-bit and 32-bit parameters, memory, multiply-"
        "accumulates) with totals and the compression ratio against full precision, of a checkpoint, run "
        "directory or exported file, or of a built-in model binarized with the options given.",
        formatter_class=HelpFormatter)
    su.add_argument("source", nargs="?", metavar="CHECKPOINT_OR_EXPORTED_FILE",
                    help="a checkpoint, run directory or 'fsg export' file (or use --model)")
    su.add_argument("--model", choices=list(MODEL_NAMES), help="a built-in network instead of a file")
    su.add_argument("--num-classes", type=positive_int, help="--model: classes (default 10)")
    su.add_argument("--in-channels", type=positive_int, help="--model small-cnn: input channels (default 1)")
    su.add_argument("--width", type=positive_int, help="--model small-cnn: channels of the first conv (default 8)")
    su.add_argument("--quantizer", choices=list(QUANTIZERS), help="--model: weight quantizer (default dorefa)")
    su.add_argument("--bits", type=positive_int, help="--model: dorefa bits (default 1)")
    su.add_argument("--keep-first", action="store_true", help="--model: keep the first conv in full precision")
    su.add_argument("--keep-last", action="store_true", help="--model: keep the classifier in full precision")
    su.add_argument("--activations", action="store_true", help="--model: also binarize activations (1W1A)")
    su.add_argument("--full-precision", action="store_true", help="--model: do not binarize")
    su.add_argument("--input-size", metavar="C,H,W", help="one input sample's size (default: 3,32,32 for the "
                    "ResNets, in_channels,16,16 for small-cnn)")
    su.add_argument("--json", action="store_true", help="print one JSON object")
    su.set_defaults(func=cmd_summary, command_parser=su)


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``fsg export``: write the bit-packed file and say what is in it."""
    from fsg.io.export import export_checkpoint, read_exported

    path = export_checkpoint(args.checkpoint, args.output)
    exp = read_exported(path)
    size = path.stat().st_size
    n_bits = sum(math.prod(r["shape"]) for r in exp.layers)
    packed = sum(exp.tensors[t].numel() * exp.tensors[t].element_size() for r in exp.layers
                 for t in r["tensors"].values())
    info = {"output": str(path), "bytes": size, "arch": exp.arch, "binarized_layers": len(exp.layers),
            "binarized_weights": n_bits, "packed_bytes": packed, "float32_bytes_of_binarized": 4 * n_bits,
            "activations": exp.binary_activations, "source": exp.source}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {path} ({size:,} bytes): {len(exp.layers)} binarized layers, {n_bits:,} weights in "
              f"{packed:,} bytes ({4 * n_bits:,} as float32)")
    return 0


def cmd_summary(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``fsg summary``: the per-layer table of a file or of a built-in model."""
    from fsg.io.summary import summary

    size = _input_size(args.input_size) if args.input_size else None
    model_flags = [f for f in ("num_classes", "in_channels", "width", "quantizer", "bits", "keep_first", "keep_last",
                               "activations", "full_precision") if getattr(args, f) not in (None, False)]
    if args.source is not None:
        if args.model is not None or model_flags:
            raise ValueError(f"a {args.source!r} file brings its own model: drop "
                             + ", ".join(flag(f) for f in (["model"] if args.model else []) + model_flags))
        result = summary(args.source, size)
    else:
        if args.model is None:
            raise ValueError("give a checkpoint, run directory or exported file, or --model NAME")
        result = summary(_builtin_model(args, model_flags), size)
        result.model = f"{result.model} ({args.model})"
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result)
    return 0


def _input_size(text: str) -> tuple:
    """``--input-size C,H,W`` (or ``CxHxW``) as a tuple of positive integers."""
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--input-size must be comma-separated integers like 3,32,32, got {text!r}") from None
    if any(v < 1 for v in size):
        raise ValueError(f"--input-size must be positive integers, got {text!r}")
    return size


def _builtin_model(args: argparse.Namespace, model_flags: list):
    """The ``--model`` network, binarized as the flags say (unless ``--full-precision``)."""
    from fsg.models import get_model

    kwargs = {"num_classes": args.num_classes or 10}
    if args.model == "small-cnn":
        kwargs.update(in_channels=args.in_channels or 1, width=args.width or 8)
    elif args.in_channels not in (None, 3) or args.width is not None:
        raise ValueError(f"--in-channels and --width are small-cnn options ({args.model} takes 3 channels)")
    if args.activations:  # as fsg train builds it: sign() of a ReLU output would be constant
        kwargs["activation"] = "hardtanh"
    model = get_model(args.model, **kwargs)
    if args.full_precision:
        if any(f in model_flags for f in ("quantizer", "bits", "keep_first", "keep_last", "activations")):
            raise ValueError("--full-precision excludes the binarization options")
    else:
        binarize(model, args.quantizer or "dorefa", bits=args.bits or 1, keep_first=args.keep_first,
                 keep_last=args.keep_last, activations=args.activations)
    return model
