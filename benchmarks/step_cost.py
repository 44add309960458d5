"""Cost of one training step for a small binarized CNN, per estimator, as a ratio to STE.

    python benchmarks/step_cost.py [--steps 10] [--batch-size 64] [--width 8] [--json]

All estimators run in one process on the same model, data and seed; the first (warm-up)
steps — including the hypernetworks' observe step 0 — are not timed. Prints a table and, with
``--json``, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import fsg
from fsg.models import SmallCNN
from fsg.data.synthetic import make_synthetic

CONFIGS = [
    ("ste", {}),
    ("fc-grad", {}),
    ("multifc", {}),
    ("lstmfc", {}),
    ("fsg", {}),
    ("fsg", {"update": "fast"}),
    ("fsg", {"layout": "temporal"}),
    ("fsg", {"slow_net": "lstm-fc"}),
]


def label(name, opts):
    return name + ("" if not opts else "[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per estimator")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 2: observe + one meta step)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=8, help="SmallCNN width (conv channels: w, 2w)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)

    train, _ = make_synthetic(n_train=args.batch_size * (args.steps + args.warmup), seed=0)
    rows = []
    for name, opts in CONFIGS:
        torch.manual_seed(0)
        model = fsg.binarize(SmallCNN(width=args.width), "dorefa")
        tr = fsg.Trainer(model, name, optimizer="sgd", lr=1e-3, **opts)
        batches = [(train.x[i:i + args.batch_size], train.y[i:i + args.batch_size])
                   for i in range(0, len(train), args.batch_size)]
        for x, y in batches[:args.warmup]:
            tr.step(x, y)
        t0 = time.perf_counter()
        for x, y in batches[args.warmup:]:
            tr.step(x, y)
        rows.append({"estimator": label(name, opts), "step_s": (time.perf_counter() - t0) / args.steps})
    ste = rows[0]["step_s"]
    for r in rows:
        r["ratio_to_ste"] = r["step_s"] / ste
    n_bin = sum(l.latent.numel() for l in fsg.binarized_layers(fsg.binarize(SmallCNN(width=args.width))))
    result = {
        "model": f"SmallCNN(width={args.width})", "binarized_weights": n_bin, "batch_size": args.batch_size,
        "steps": args.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "scan_impl": fsg.ssm.mamba.get_scan_impl(), "results": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}, {n_bin} binarized weights, batch {args.batch_size}, "
          f"{args.steps} timed steps, torch {torch.__version__}, {result['threads']} threads")
    print(f"{'estimator':<32} {'ms/step':>10} {'× ste':>8}")
    for r in rows:
        print(f"{r['estimator']:<32} {1e3 * r['step_s']:>10.1f} {r['ratio_to_ste']:>8.1f}")


if __name__ == "__main__":
    main()
