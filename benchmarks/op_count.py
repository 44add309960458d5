"""ATen operators per training step on the CUDA code path, counted on a machine without a GPU.

    python benchmarks/op_count.py [--model resnet20] [--batch-size 128] [--json]

On a GPU a ResNet-20 step is small: its time is mostly the launches of its operators. This runs
each step on the CPU with the ``"triton"`` backend's ops (scan, low-memory block, streaming block
step) as on CUDA, but with every Triton kernel replaced by a no-op that zeroes its tensor
arguments (the numbers are meaningless, the operators are those of the CUDA path; fsg's own
kernel launches are not counted), and with FSG's CUDA defaults (``batch_layers`` on, the stream
state updated in place, and the optimizers' multi-tensor ``foreach`` updates, PyTorch's
default for CUDA parameters). It counts the ATen operators one step dispatches (views excluded,
backward included: :func:`fsg.cli.bench.aten_ops`) after the warm-up. Prints a table, or one
JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels are never run; triton needs no GPU to import

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import fsg  # noqa: E402
from fsg import ssm  # noqa: E402
from fsg.cli.bench import aten_ops  # noqa: E402
from fsg.estimators import FSG  # noqa: E402
from fsg.ssm import backends, triton_scan, triton_stream  # noqa: E402

#: (name, estimator, options) of the measured steps.
CASES = [("ste", "ste", {}), ("multifc", "multifc", {}), ("fsg-flat", "fsg", {}),
         ("fsg-flat-per-layer", "fsg", {"batch_layers": False}), ("fsg-stream", "fsg", {"layout": "stream"}),
         ("fsg-stream-bf16", "fsg", {"layout": "stream", "state_dtype": "bfloat16"})]
KERNELS = [(triton_scan, n) for n in ("_fwd_local_kernel", "_combine_kernel", "_fwd_out_kernel", "_bwd_local_kernel",
                                      "_bwd_main_kernel")] + [(triton_stream, "_stream_fwd_kernel"),
                                                              (triton_stream, "_stream_bwd_kernel")]


class _NoKernel:
    """A Triton kernel stand-in: ``kernel[grid](*args)`` zeroes the tensor arguments' memory
    (``.data``: no version bump, no operator counted) and launches nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            for t in args:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.data.zero_()


def _cuda_path() -> None:
    """Route the CPU through the triton backend's ops with no-op kernels and FSG's CUDA defaults."""
    for mod, name in KERNELS:
        setattr(mod, name, _NoKernel())
    t = backends.TRITON
    ssm.register_backend(ssm.Backend("triton-on-cpu", devices={"cpu"}, selective_scan=t.selective_scan,
                                     selective_scan_step=t.selective_scan_step, mamba_low_memory=t.mamba_low_memory,
                                     mamba_stream=t.mamba_stream))
    ssm.set_backend("triton-on-cpu")
    FSG.stream_in_place = lambda self: True


def count(model_name: str, batch: int, estimator: str, options: dict) -> int:
    from fsg.models import SmallCNN, get_model

    torch.manual_seed(0)
    net = SmallCNN(in_channels=3) if model_name == "small-cnn" else get_model(model_name)
    opts = dict(options)
    if estimator == "fsg":
        opts.setdefault("batch_layers", True)
    tr = fsg.Trainer(fsg.binarize(net, "dorefa"), estimator, optimizer="sgd", lr=1e-3, **opts)
    for opt in [tr.optimizer, *tr.meta_optimizers.values()]:  # PyTorch's default for CUDA parameters
        for group in opt.param_groups:
            group["foreach"] = True
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    for _ in range(1 + (options.get("history", 5) if estimator == "fsg" else 1)):
        tr.step(x, y)
    return aten_ops(lambda: tr.step(x, y))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32", "resnet44", "small-cnn"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma-separated case names")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    wanted = args.cases.split(",")
    unknown = set(wanted) - {c[0] for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(c[0] for c in CASES)}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    _cuda_path()
    res = {name: count(args.model, args.batch_size, est, opts) for name, est, opts in CASES if name in wanted}
    if args.json:
        print(json.dumps({"model": args.model, "batch_size": args.batch_size, "aten_ops_per_step": res}))
    else:
        print(f"{args.model}, batch {args.batch_size}: ATen operators per step on the CUDA code path")
        for name, n in res.items():
            ste = f"  ({n / res['ste']:.1f}x STE)" if "ste" in res and name != "ste" else ""
            print(f"  {name:<20} {n:>6,}{ste}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
