"""``fsg bench``: step and scan benchmarks of FSG against STE and mambapy, in one run.

Each measurement runs in its own subprocess (so that its peak RSS is its own) on the same
machine, one after the other; ratios are taken between measurements of the same run.

* ``step``: one training step of the CIFAR ResNet-20 (all conv/linear layers binarized, dorefa,
  SGD) at batch 128 on random 32×32 images, after enough warm-up steps to fill FSG's gradient
  history (L + 1), for ``ste``, ``fsg`` in the paper's flat layout (defaults: β 0.9, L 5,
  Mamba d_inner 100, d_state 16, d_conv 8), and ``fsg`` with ``layout="stream"``.
  ``*_peak_rss_mb``: the process's peak resident memory (model, data, optimizer included).
* ``scan``: the selective scan alone, forward + backward, on the history sequence of ResNet-20's
  largest layer in the flat layout (36,864 weights → 1 + 5·36,864 = 184,321 tokens, 100 channels,
  16 states): ``fsg.ssm.cpu`` against ``mambapy`` 1.2's parallel scan (a benchmark-only extra:
  ``pip install mambapy``). ``*_peak_rss_mb``: the peak resident memory *added* by the scan
  (peak minus the resident memory once the inputs exist).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

__all__ = ["main", "run_benchmarks", "KEYS"]

KEYS = ["ste_step_s", "fsg_flat_step_s", "fsg_stream_step_s", "fsg_flat_peak_rss_mb", "fsg_stream_peak_rss_mb",
        "scan_s", "mambapy_scan_s", "scan_peak_rss_mb", "mambapy_scan_peak_rss_mb"]

SCAN_LENGTH = 1 + 5 * 36864


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _case_step(estimator: str, options: dict, steps: int, batch: int, threads: Optional[int],
               model_name: str = "resnet20") -> dict:
    import torch

    import fsg
    from fsg.models import SmallCNN, get_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3) if model_name == "small-cnn" else get_model(model_name)
    model = fsg.binarize(net, "dorefa")
    tr = fsg.Trainer(model, estimator, optimizer="sgd", lr=1e-3, **options)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    warmup = 1 + (options.get("history", 5) if estimator == "fsg" else 1)
    for _ in range(warmup):
        tr.step(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.step(x, y)
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "mean_seconds": sum(times) / len(times), "peak_rss_mb": _rss_mb(),
            "warmup_steps": warmup, "timed_steps": steps}


def _case_scan(impl: str, reps: int, threads: Optional[int], length: int = SCAN_LENGTH) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dim, n = 100, 16
    delta = torch.nn.functional.softplus(torch.randn(1, length, dim) * 0.5 - 3).requires_grad_()
    u = torch.randn(1, length, dim, requires_grad=True)
    A = (-torch.arange(1, n + 1.0).repeat(dim, 1)).requires_grad_()
    B = torch.randn(1, length, n, requires_grad=True)
    C = torch.randn(1, length, n, requires_grad=True)
    D = torch.ones(dim, requires_grad=True)
    dy = torch.randn(1, length, dim)
    if impl == "mambapy":
        from mambapy.mamba import MambaBlock, MambaConfig

        block = MambaBlock(MambaConfig(d_model=1, n_layers=1, d_state=n, expand_factor=dim, d_conv=8, pscan=True))

        def run():
            return block.selective_scan(u, delta, A, B, C, D)  # (B, L, ED) layout, parallel scan
    else:
        from fsg.ssm import cpu as scan_cpu

        if not scan_cpu.available():
            raise RuntimeError(f"fused scan unavailable: {scan_cpu.build_error()}")

        def run():  # same computation in the (B, ED, L) layout of fsg / mamba_ssm
            out = scan_cpu.selective_scan_fused(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                                C.transpose(1, 2), D=D)
            return out.transpose(1, 2)
    base = _rss_mb()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = run()
        torch.autograd.grad(out, [u, delta, A, B, C, D], dy)
        times.append(time.perf_counter() - t0)
        del out
    return {"seconds": min(times), "mean_seconds": sum(times) / len(times),
            "peak_rss_mb": _rss_mb() - base, "tokens": length}


def _child(args) -> None:
    opts = json.loads(args.options)
    if args.case == "step":
        res = _case_step(args.estimator, opts, args.steps, args.batch_size, args.threads, args.model)
    else:
        res = _case_scan(args.impl, args.reps, args.threads, args.scan_length)
    print("FSG_BENCH_RESULT " + json.dumps(res))


def _spawn(argv: List[str], timeout: float) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "fsg.bench", "--child", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("FSG_BENCH_RESULT "):
            return json.loads(line[len("FSG_BENCH_RESULT "):])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(err)


def run_benchmarks(steps: int = 2, batch_size: int = 128, scan_reps: int = 2, threads: Optional[int] = None,
                   skip_mambapy: bool = False, timeout: float = 1800, log=None, model: str = "resnet20",
                   scan_length: int = SCAN_LENGTH) -> dict:
    """Run every measurement (each in a subprocess) and return the result dictionary.
    ``model`` / ``scan_length`` shrink the problem (for tests); the defaults are the benchmark."""
    log = log or (lambda msg: None)
    common = ["--steps", str(steps), "--batch-size", str(batch_size), "--reps", str(scan_reps),
              "--model", model, "--scan-length", str(scan_length)]
    if threads:
        common += ["--threads", str(threads)]
    plan = [
        ("ste_step", ["--case", "step", "--estimator", "ste"]),
        ("fsg_flat_step", ["--case", "step", "--estimator", "fsg"]),
        ("fsg_stream_step", ["--case", "step", "--estimator", "fsg", "--options", json.dumps({"layout": "stream"})]),
        ("scan", ["--case", "scan", "--impl", "fused"]),
        ("mambapy_scan", ["--case", "scan", "--impl", "mambapy"]),
    ]
    result: Dict[str, object] = {k: None for k in KEYS}
    notes: Dict[str, str] = {}
    raw: Dict[str, dict] = {}
    for name, argv in plan:
        if name == "mambapy_scan" and skip_mambapy:
            notes[name] = "skipped (--skip-mambapy)"
            continue
        log(f"running {name} ...")
        try:
            raw[name] = _spawn(argv + common, timeout)
        except subprocess.TimeoutExpired:
            notes[name] = f"timed out after {timeout:.0f} s"
            continue
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            notes[name] = f"failed: {e}"
            continue
        result[f"{name}_s"] = raw[name]["seconds"]
        if name != "ste_step":
            result[f"{name.replace('_step', '')}_peak_rss_mb"] = raw[name]["peak_rss_mb"]
        log(f"  {name}: {raw[name]['seconds']:.3f} s, peak RSS {raw[name]['peak_rss_mb']:.0f} MB")
    result["ste_peak_rss_mb"] = raw.get("ste_step", {}).get("peak_rss_mb")
    if "mambapy_scan" in notes and "No module named 'mambapy'" in notes["mambapy_scan"]:
        notes["mambapy_scan"] = "mambapy is not installed (pip install mambapy==1.2.0)"
    source = {"ste_step_s": "ste_step", "fsg_flat_step_s": "fsg_flat_step", "fsg_stream_step_s": "fsg_stream_step",
              "fsg_flat_peak_rss_mb": "fsg_flat_step", "fsg_stream_peak_rss_mb": "fsg_stream_step",
              "scan_s": "scan", "scan_peak_rss_mb": "scan", "mambapy_scan_s": "mambapy_scan",
              "mambapy_scan_peak_rss_mb": "mambapy_scan"}
    for k in KEYS:
        if result[k] is None:
            notes[k] = notes.get(source[k], "not measured")
    ratios = {}
    if result["ste_step_s"]:
        for k in ("fsg_flat_step", "fsg_stream_step"):
            if result[k + "_s"]:
                ratios[k + "_vs_ste"] = result[k + "_s"] / result["ste_step_s"]
    if result["scan_s"] and result["mambapy_scan_s"]:
        ratios["mambapy_vs_scan_time"] = result["mambapy_scan_s"] / result["scan_s"]
        ratios["mambapy_vs_scan_memory"] = result["mambapy_scan_peak_rss_mb"] / max(result["scan_peak_rss_mb"], 1e-9)
    import torch

    result.update(ratios=ratios, notes=notes, raw=raw,
                  setup={"model": f"{model}, all conv/linear binarized (dorefa), SGD lr 1e-3",
                         "batch_size": batch_size, "timed_steps": steps, "scan_tokens": scan_length,
                         "torch": torch.__version__, "threads": threads or torch.get_num_threads(),
                         "machine": platform.machine(), "cpus": os.cpu_count()})
    return result


def _table(r: dict) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    rows = [
        ("STE step", r["ste_step_s"], r.get("ste_peak_rss_mb"), None),
        ("FSG flat step (paper defaults)", r["fsg_flat_step_s"], r["fsg_flat_peak_rss_mb"],
         r["ratios"].get("fsg_flat_step_vs_ste")),
        ("FSG stream step", r["fsg_stream_step_s"], r["fsg_stream_peak_rss_mb"], r["ratios"].get("fsg_stream_step_vs_ste")),
        ("scan fwd+bwd, fsg fused", r["scan_s"], r["scan_peak_rss_mb"], None),
        ("scan fwd+bwd, mambapy", r["mambapy_scan_s"], r["mambapy_scan_peak_rss_mb"],
         r["ratios"].get("mambapy_vs_scan_time")),
    ]
    lines = [f"{'measurement':<34} {'seconds':>9} {'peak RSS MB':>12} {'ratio':>8}", "-" * 66]
    for name, s, m, ratio in rows:
        lines.append(f"{name:<34} {f(s, '9.3f'):>9} {f(m, '12.0f'):>12} {f(ratio, '8.1f'):>8}")
    lines.append("ratio: × STE for steps; mambapy time / fsg time for the scan. Scan RSS: added by the scan.")
    for k, v in r["notes"].items():
        lines.append(f"note: {k}: {v}")
    return "\n".join(lines)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fsg bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per estimator (min reported)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=2, help="timed scan repetitions (min reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-mambapy", action="store_true", help="do not run the mambapy comparison")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement")
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32", "resnet44", "small-cnn"],
                   help="model of the step measurements")
    p.add_argument("--scan-length", type=int, default=SCAN_LENGTH, help="tokens of the scan measurement")
    return p


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--child":
        p = argparse.ArgumentParser()
        p.add_argument("--case", choices=["step", "scan"], required=True)
        p.add_argument("--estimator", default="ste")
        p.add_argument("--options", default="{}")
        p.add_argument("--impl", default="fused")
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--reps", type=int, default=2)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--model", default="resnet20")
        p.add_argument("--scan-length", type=int, default=SCAN_LENGTH)
        _child(p.parse_args(argv[1:]))
        return 0
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> int:
    for name in ("steps", "batch_size", "reps", "scan_length"):
        if getattr(args, name) < 1:
            print(f"fsg: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    res = run_benchmarks(steps=args.steps, batch_size=args.batch_size, scan_reps=args.reps, threads=args.threads,
                         skip_mambapy=args.skip_mambapy, timeout=args.timeout, model=args.model,
                         scan_length=args.scan_length,
                         log=None if args.json else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=2) if args.json else _table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
