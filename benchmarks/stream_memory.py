"""Peak RSS and step time of FSG's stream layout on ResNet-20, per carried-state dtype, against STE.

    python benchmarks/stream_memory.py [--dtypes float32,bfloat16,float16] [--steps 3] [--threads N]
                                       [--batch-size 128] [--model resnet20] [--expand 100] [--json]

The measurement is ``fsg bench``'s step case (:func:`fsg.cli.bench._case_step`: ResNet-20, all
conv/linear layers binarized with dorefa, SGD, batch 128 of random 32×32 images, the warm-up
steps untimed, the minimum over ``--steps`` timed steps reported) for ``ste`` and for ``fsg``
with ``layout="stream"`` and each ``state_dtype``; every measurement runs in its own subprocess
(``python -m fsg.cli.bench --child``), one after the other, so each peak RSS (``ru_maxrss``: model,
data, optimizer and the warm-up steps included) is its own. ``--expand`` other than 100 shrinks
the slow-net (d_inner) for a quick check. Prints a table, or with ``--json`` one JSON object.

What to expect (ResNet-20, 270,896 binarized weights, d_inner 100, d_state 16): the carried
state is 1.73 GB in float32 and 0.87 GB in 16 bits; float32 keeps two of them (old and new),
16 bits one, updated in place.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fsg.cli.bench import _spawn  # noqa: E402


def measure(estimator: str, options: dict, args) -> dict:
    argv = ["--case", "step", "--estimator", estimator, "--options", json.dumps(options), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--model", args.model]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return _spawn(argv, args.timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="state dtypes, comma-separated")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (min reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32", "resnet44", "small-cnn"])
    ap.add_argument("--expand", type=int, default=100, help="the slow-net's d_inner (100: FSG's default)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measurement")
    ap.add_argument("--no-ste", action="store_true", help="skip the STE measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]

    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    results = {}
    if not args.no_ste:
        log("measuring ste ...")
        results["ste"] = measure("ste", {}, args)
    for dt in dtypes:
        log(f"measuring fsg stream, state_dtype={dt} ...")
        opts = {"layout": "stream", "state_dtype": dt}
        if args.expand != 100:
            opts["expand"] = args.expand
        results[f"fsg_stream_{dt}"] = measure("fsg", opts, args)
    ste = results.get("ste", {}).get("seconds")
    out = {"machine": platform.machine(), "python": platform.python_version(), "model": args.model,
           "batch_size": args.batch_size, "threads": args.threads, "expand": args.expand, "results": results}
    if ste:
        out["ratios_vs_ste"] = {k: round(v["seconds"] / ste, 2) for k, v in results.items() if k != "ste"}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'measurement':28s} {'step (min)':>11s} {'step (mean)':>12s} {'× STE':>7s} {'peak RSS':>10s}")
    for k, v in results.items():
        ratio = f"{v['seconds'] / ste:.2f}" if ste and k != "ste" else ""
        print(f"{k:28s} {v['seconds']:10.3f}s {v['mean_seconds']:11.3f}s {ratio:>7s} {v['peak_rss_mb']:8.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
