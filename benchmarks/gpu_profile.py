#!/usr/bin/env python
"""Where the GPU time goes: the Triton scan kernel by kernel, FSG's training step, the scan's tiling.

    PYTHONPATH=src python benchmarks/gpu_profile.py --out gpu-out                    # one CUDA GPU, about a minute
    PYTHONPATH=src python benchmarks/gpu_profile.py --device cpu --quick --out /tmp/p  # smoke test, no GPU

Prints a text report and writes ``<out>/gpu_profile.json``, rewritten after every section (and
every tiling of the sweep), so a run cut short keeps what it finished. Sections, in this order:

* ``scan``: ``fsg.ssm.triton_scan.selective_scan_triton`` forward + backward on ``--scan-length``
  tokens (d_inner 100, d_state 16, batch 1; float32 inputs drawn on the device in the kernels'
  (batch, d_inner, L) layout, as ``fsg bench``'s scan), one warm-up run (it compiles), the best
  of two runs timed by CUDA events, then one run under ``torch.profiler``: per kernel (a Triton
  kernel under its function name, e.g. ``_bwd_main_kernel``) its device time and launches, their
  sum against the wall time; the peak GPU memory (inputs included); ``effective_gb_per_s``: the
  least float32 traffic of forward + backward (u, delta, B, C read in each direction, dy read, y,
  du, ddelta, dB, dC written: 4 L (8 d_inner + 6 d_state) bytes) over the wall time, against
  the GPU's memory bandwidth (about 4,800 GB/s on an H200).
* ``steps``: one training step as ``fsg bench`` builds it (ResNet-20 binarized with dorefa, SGD
  lr 1e-3, batch 128 of random images, warm-up steps until FSG's gradient history is full) for
  STE, FSG flat and FSG stream: the best of three steps by CUDA events, the peak GPU memory, then
  one step under ``torch.profiler``: its kernels' summed device time against the wall time (the
  step is launch-bound when the device is busy a small part of it), the kernel launches, the
  ATen operator events, the top operators by self device time and by self CPU time, the top
  kernels.
* ``sweep``: the scan for the tilings ``(chunk, block_d, num_warps)`` of ``TILINGS`` (several
  channels per lane first), after the default tiling (the reference): a warm-up run
  (which compiles), the best of three by CUDA events, and the largest difference of the output
  and the input gradients from the default tiling's over their largest value. A tiling that
  raises is recorded with its error; none starts after ``--sweep-budget`` seconds of the sweep, nor
  after ``--deadline`` seconds of the whole script (for a caller's time limit).

``--device cpu --quick`` (for the test): tiny sizes (a 40-token scan of 8 channels and 2 states,
run by Triton's interpreter: ``TRITON_INTERPRET=1`` is set before triton is imported; SmallCNN
at batch 8), one timed repetition, ``time.perf_counter`` instead of CUDA events, no device
columns. Its figures mean nothing; it checks that the script runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

#: Sizes: FSG's slow-net scan (d_inner 100, d_state 16, batch 1) on the flat history of every
#: ResNet-20 weight (5 x 270,000 tokens); --quick: what Triton's interpreter runs in about a second.
FULL = dict(dim=100, n=16, length=1_350_000, model="resnet20", batch=128, reps=3)
QUICK = dict(dim=8, n=2, length=40, model="small-cnn", batch=8, reps=1)
#: (chunk, block_d, num_warps) of the sweep after the default, most promising first (the budget may
#: cut it): fewer steps per chunk and several channels per lane (block_d > 32 x num_warps: the
#: backward's sums over channels take fewer shuffles per channel), then longer chunks and wider
#: blocks with one channel per lane (num_warps None: block_d / 32 x chunk / 16). A fourth entry sets
#: triton_scan.COMBINE_STAGES (the default tiling with the combine kernels' loads pipelined).
TILINGS = [(8, 64, 1), (16, None, None, 3), (8, 32, 1), (8, 128, 2), (32, 32, None), (16, 64, None),
           (16, 128, None), (32, 64, None), (64, 32, None)]
#: (name, estimator, Trainer options) of the profiled steps.
STEP_CASES = [("ste", "ste", {}), ("fsg_flat", "fsg", {}), ("fsg_stream", "fsg", {"layout": "stream"})]
SECTIONS = ("scan", "steps", "sweep")
TOP = 15


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--sections`` split into a list; --device cpu requires --quick)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (or cuda:N), or cpu with --quick")
    p.add_argument("--out", default=".", help="folder for gpu_profile.json")
    p.add_argument("--scan-length", type=int, default=None, help="scan tokens (default 1,350,000; --quick: 40)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke test, e.g. on the CPU)")
    p.add_argument("--sweep-budget", type=float, default=60.0, help="seconds after which no new tiling starts")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the script's start after which no new tiling starts (default: none)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    if set(args.sections) - set(SECTIONS):
        p.error(f"--sections: choose from {', '.join(SECTIONS)}")
    if args.device == "cpu" and not args.quick:
        p.error("--device cpu needs --quick (Triton's interpreter is far too slow for the full sizes)")
    return args


def make_config(args, started: float) -> SimpleNamespace:
    """The run's settings: the --quick or full sizes, the device, the output folder, the sweep's
    limits (``stop_at``: the perf_counter time of --deadline)."""
    import torch

    sizes = dict(QUICK if args.quick else FULL)
    if args.scan_length:
        sizes["length"] = args.scan_length
    device = torch.device(args.device)
    stop_at = started + args.deadline if args.deadline is not None else float("inf")
    return SimpleNamespace(**sizes, device=device, cuda=device.type == "cuda", out=Path(args.out),
                           sweep_budget=args.sweep_budget, stop_at=stop_at, quick=args.quick)


# ---------------------------------------------------------------------------------------------
# Timing and profiling
# ---------------------------------------------------------------------------------------------


def sync(cfg) -> None:
    """Wait for the GPU (nothing on the CPU)."""
    import torch

    if cfg.cuda:
        torch.cuda.synchronize(cfg.device)


def timed(fn, cfg) -> float:
    """Seconds of one call of ``fn()``: by CUDA events on a GPU (the device timeline from just before
    the call to just after it, host stalls included, after a synchronize), by perf_counter on the CPU."""
    import torch

    sync(cfg)
    if not cfg.cuda:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def profiled(fn, cfg):
    """Run ``fn()`` once under torch.profiler (CPU activity, and CUDA on a GPU): (the profiler's
    ``key_averages()``, the call's seconds by :func:`timed`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.cuda else [])
    with profile(activities=activities) as prof:
        seconds = timed(fn, cfg)
        sync(cfg)
    return prof.key_averages(), seconds


def _us(evt, names) -> float:
    """The first of the attributes ``names`` that ``evt`` has (microseconds; the profiler renamed
    ``cuda_time`` to ``device_time`` in torch 2.4), else 0."""
    for name in names:
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def event_rows(averages):
    """(device rows, host rows) of ``key_averages()``, in seconds: device-side events (kernels,
    memcpy, memset) with their count and device time; host-side events (operators, runtime calls)
    with count, self CPU time and self device time (the kernels they launched themselves)."""
    from torch.autograd import DeviceType

    dev, host = [], []
    for e in averages:
        row = {"name": str(e.key)[:200], "count": int(e.count),
               "device_s": _us(e, ("self_device_time_total", "self_cuda_time_total")) / 1e6}
        if e.device_type == DeviceType.CPU:
            host.append(dict(row, cpu_s=float(e.self_cpu_time_total) / 1e6))
        else:
            dev.append(row)
    return dev, host


def top(rows, key: str, n: int = TOP) -> list:
    """The ``n`` rows of largest ``key`` (non-zero only)."""
    return sorted((r for r in rows if r[key] > 0), key=lambda r: -r[key])[:n]


def mb(nbytes: int) -> float:
    """Bytes in MiB."""
    return nbytes / 2 ** 20


def fresh_memory(cfg) -> None:
    """Free what earlier work left, reset the peak GPU memory statistic."""
    import torch

    gc.collect()
    if cfg.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(cfg.device)


def peak_mb(cfg):
    """Peak GPU memory allocated since :func:`fresh_memory` (MB), None on the CPU."""
    import torch

    return mb(torch.cuda.max_memory_allocated(cfg.device)) if cfg.cuda else None


# ---------------------------------------------------------------------------------------------
# Section 1: the scan, kernel by kernel
# ---------------------------------------------------------------------------------------------


def scan_inputs(cfg):
    """(inputs, dy): u, delta, A, B, C, D as fsg bench's scan (seed 0, delta = softplus(0.5 x - 3),
    A = -(1..n) per channel, D = 1), float32 on the device in the kernels' (batch, d_inner, L)
    layout, requiring gradients; dy the output's gradient."""
    import torch

    torch.manual_seed(0)
    dim, n, length, dev = cfg.dim, cfg.n, cfg.length, cfg.device
    u = torch.randn(1, dim, length, device=dev)
    delta = torch.nn.functional.softplus(torch.randn(1, dim, length, device=dev) * 0.5 - 3)
    A = -torch.arange(1, n + 1.0, device=dev).repeat(dim, 1)
    B, C = torch.randn(1, n, length, device=dev), torch.randn(1, n, length, device=dev)
    D = torch.ones(dim, device=dev)
    dy = torch.randn(1, dim, length, device=dev)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D)], dy


def scan_once(ins, dy, chunk=None, block_d=None, num_warps=None, combine_stages=None) -> list:
    """Forward + backward of the Triton scan with the given tiling (None: the default):
    ``[y, du, ddelta, dA, dB, dC, dD]``, detached."""
    import torch

    from fsg.ssm import triton_scan as ts

    with ts.combine_stages(combine_stages):
        y = ts.selective_scan_triton(*ins[:5], D=ins[5], chunk=chunk or ts.CHUNK, block_d=block_d, num_warps=num_warps)
        return [y.detach(), *torch.autograd.grad(y, ins, dy)]


def scan_section(cfg, save) -> dict:
    """Section ``scan`` (module docstring)."""
    fresh_memory(cfg)
    ins, dy = scan_inputs(cfg)
    t0 = time.perf_counter()
    scan_once(ins, dy)
    sync(cfg)
    warmup_s = time.perf_counter() - t0
    wall_s = min(timed(lambda: scan_once(ins, dy), cfg) for _ in range(max(1, cfg.reps - 1)))
    averages, profiled_s = profiled(lambda: scan_once(ins, dy), cfg)
    dev, host = event_rows(averages)
    kernel_s = sum(r["device_s"] for r in dev)
    for r in dev:
        r["share"] = r["device_s"] / kernel_s if kernel_s else None
    io_bytes = 4 * cfg.length * (8 * cfg.dim + 6 * cfg.n)
    return {"tokens": cfg.length, "d_inner": cfg.dim, "d_state": cfg.n, "batch": 1, "tiling": "default",
            "warmup_s": warmup_s, "wall_s": wall_s, "profiled_wall_s": profiled_s, "kernel_sum_s": kernel_s,
            "kernel_launches": sum(r["count"] for r in dev), "peak_gpu_mb": peak_mb(cfg), "min_io_bytes": io_bytes,
            "effective_gb_per_s": io_bytes / wall_s / 1e9, "kernels": top(dev, "device_s", len(dev)),
            "top_cpu_ops": top(host, "cpu_s")}


# ---------------------------------------------------------------------------------------------
# Section 2: training steps
# ---------------------------------------------------------------------------------------------


def build_step(cfg, estimator: str, options: dict):
    """A training step as fsg bench's ``_case_step`` builds it: (step function, warm-up steps)."""
    import torch

    import fsg
    from fsg.models import SmallCNN, get_model

    torch.manual_seed(0)
    net = SmallCNN(in_channels=3) if cfg.model == "small-cnn" else get_model(cfg.model)
    model = fsg.binarize(net, "dorefa").to(cfg.device)
    trainer = fsg.Trainer(model, estimator, optimizer="sgd", lr=1e-3, **options)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, 3, 32, 32, generator=g).to(cfg.device)
    y = torch.randint(0, 10, (cfg.batch,), generator=g).to(cfg.device)
    warmup = 1 + (options.get("history", 5) if estimator == "fsg" else 1)
    return (lambda: trainer.step(x, y)), warmup


def step_case(cfg, estimator: str, options: dict) -> dict:
    """One step case of section ``steps``: warm-up, best of ``reps`` timed steps, one profiled step."""
    fresh_memory(cfg)
    step, warmup = build_step(cfg, estimator, options)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(cfg)
    warmup_s = time.perf_counter() - t0
    wall_s = min(timed(step, cfg) for _ in range(cfg.reps))
    averages, profiled_s = profiled(step, cfg)
    dev, host = event_rows(averages)
    kernel_s = sum(r["device_s"] for r in dev)
    aten = sum(r["count"] for r in host if r["name"].startswith("aten::"))
    busy = kernel_s / wall_s if cfg.cuda else None
    return {"estimator": estimator, "options": options, "warmup_steps": warmup, "warmup_s": warmup_s,
            "wall_s": wall_s, "profiled_wall_s": profiled_s, "kernel_sum_s": kernel_s, "device_busy": busy,
            "bound": None if busy is None else ("launch/host" if busy < 0.5 else "device"),
            "kernel_launches": sum(r["count"] for r in dev), "aten_op_events": aten,
            "wall_us_per_aten_op": 1e6 * wall_s / aten if aten else None, "peak_gpu_mb": peak_mb(cfg),
            "top_ops_by_device": top(host, "device_s"), "top_ops_by_cpu": top(host, "cpu_s"),
            "top_kernels": top(dev, "device_s")}


def steps_section(cfg, save) -> dict:
    """Section ``steps`` (module docstring): STE, FSG flat and FSG stream."""
    import fsg.ssm

    res = {"model": cfg.model, "batch": cfg.batch, "timed_steps": cfg.reps,
           "scan_backend": fsg.ssm.select_backend(cfg.device).name, "cases": {}}
    for name, estimator, options in STEP_CASES:
        res["cases"][name] = step_case(cfg, estimator, options)
        save(res)
    return res


# ---------------------------------------------------------------------------------------------
# Section 3: the scan's tiling
# ---------------------------------------------------------------------------------------------


def rel_diff(outs, ref) -> float:
    """Largest over the tensors of max |a - b| / max |b| (b: the reference)."""
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(outs, ref))


def tilings() -> list:
    """(chunk, block_d, num_warps) of the sweep: the default (block_d None) leads, then TILINGS."""
    from fsg.ssm.triton_scan import CHUNK

    return [(CHUNK, None, None)] + TILINGS


def run_tiling(cfg, ins, dy, tiling, ref):
    """One tiling: (row, its outputs). The warm-up (compile) run, then the best of ``reps``."""
    t0 = time.perf_counter()
    outs = scan_once(ins, dy, *tiling)
    sync(cfg)
    compile_s = time.perf_counter() - t0
    seconds = min(timed(lambda: scan_once(ins, dy, *tiling), cfg) for _ in range(cfg.reps))
    diff = 0.0 if ref is None else rel_diff(outs, ref)
    return dict(_tiling_row(tiling), seconds=seconds, warmup_s=compile_s, max_rel_diff=diff), outs


def _tiling_row(tiling) -> dict:
    return dict(zip(("chunk", "block_d", "num_warps", "combine_stages"), tiling))


def _tiling_name(row: dict) -> str:
    """e.g. ``chunk 8, block_d 64, num_warps 1, combine stages default``."""
    return (f"chunk {row['chunk']}, block_d {row['block_d'] or 'default'}, num_warps {row.get('num_warps') or 'auto'}, "
            f"combine stages {row.get('combine_stages') or 'default'}")


def sweep_section(cfg, save) -> dict:
    """Section ``sweep`` (module docstring)."""
    fresh_memory(cfg)
    ins, dy = scan_inputs(cfg)
    res = {"tokens": cfg.length, "budget_s": cfg.sweep_budget, "reps": cfg.reps, "runs": [], "not_run": []}
    start, ref = time.perf_counter(), None
    for tiling in tilings():
        if time.perf_counter() - start > cfg.sweep_budget or time.perf_counter() > cfg.stop_at:
            res["not_run"].append(_tiling_row(tiling))
            continue
        try:
            row, outs = run_tiling(cfg, ins, dy, tiling, ref)
            ref = outs if ref is None else ref
        except Exception as e:  # noqa: BLE001 - a tiling that cannot run is a result
            row = dict(_tiling_row(tiling), error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            if ref is None:
                raise
        res["runs"].append(row)
        save(res)
    ok = [r for r in res["runs"] if "seconds" in r]
    res["fastest"] = min(ok, key=lambda r: r["seconds"]) if ok else None
    res["elapsed_s"] = time.perf_counter() - start
    return res


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def ms(seconds) -> str:
    """Seconds as milliseconds text ("n/a" for None)."""
    return "n/a" if seconds is None else f"{1e3 * seconds:.3f} ms"


def table(rows, columns) -> str:
    """Rows as aligned text; ``columns``: (header, function of a row -> str)."""
    cells = [[h for h, _ in columns]] + [[f(r) for _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


NAME = ("name", lambda r: r["name"][:100])
COUNT = ("count", lambda r: str(r["count"]))
DEVICE = ("device", lambda r: ms(r["device_s"]))
CPU = ("self CPU", lambda r: ms(r["cpu_s"]))


def report_scan(res) -> str:
    """Section ``scan`` as text: the timings, then the kernels (or, on the CPU, the operators)."""
    lines = [f"== scan: Triton forward + backward, {res['tokens']:,} tokens, d_inner {res['d_inner']}, "
             f"d_state {res['d_state']}, default tiling",
             f"  wall {ms(res['wall_s'])} (first run, compiling: {res['warmup_s']:.2f} s; profiled run "
             f"{ms(res['profiled_wall_s'])}), {res['effective_gb_per_s']:.0f} GB/s of least traffic; kernels: "
             f"{res['kernel_launches']} launches, {ms(res['kernel_sum_s'])} in all; peak GPU "
             f"{res['peak_gpu_mb'] or 0:.0f} MB"]
    if res["kernels"]:
        share = ("share", lambda r: f"{100 * r['share']:.1f}%" if r["share"] is not None else "")
        lines.append(table(res["kernels"], [NAME, COUNT, DEVICE, share]))
    else:
        lines += ["  (no device events: operators by self CPU time)", table(res["top_cpu_ops"], [NAME, COUNT, CPU])]
    return "\n".join(lines)


def report_steps(res) -> str:
    """Section ``steps`` as text: per case the timings and counts, then the top-operator tables."""
    lines = [f"== steps: {res['model']}, batch {res['batch']}, scan backend {res['scan_backend']} "
             f"(wall: best of {res['timed_steps']})"]
    for name, c in res["cases"].items():
        busy = ("no device events" if c["device_busy"] is None else
                f"kernels {ms(c['kernel_sum_s'])} in {c['kernel_launches']} launches, device busy "
                f"{100 * c['device_busy']:.0f}% of the wall -> {c['bound']}-bound")
        per_op = "n/a" if c["wall_us_per_aten_op"] is None else f"{c['wall_us_per_aten_op']:.1f}"
        lines += [f"-- {name}: wall {ms(c['wall_s'])} (profiled {ms(c['profiled_wall_s'])}), {busy}; "
                  f"{c['aten_op_events']} ATen op events ({per_op} us of wall each); peak GPU "
                  f"{c['peak_gpu_mb'] or 0:.0f} MB; warm-up {c['warmup_steps']} steps {c['warmup_s']:.2f} s"]
        if c["top_ops_by_device"]:
            lines += ["  top operators by self device time:", table(c["top_ops_by_device"], [NAME, COUNT, DEVICE])]
            lines += ["  top kernels:", table(c["top_kernels"], [NAME, COUNT, DEVICE])]
        lines += ["  top operators by self CPU time:", table(c["top_ops_by_cpu"], [NAME, COUNT, CPU])]
    return "\n".join(lines)


def report_sweep(res) -> str:
    """Section ``sweep`` as text: one row per tiling, those not run, the fastest."""
    lines = [f"== sweep: scan tiling, {res['tokens']:,} tokens (best of {res['reps']}; diff: largest difference "
             "of y and the input gradients from the default tiling's over their largest value)"]
    cols = [("chunk", lambda r: str(r["chunk"])), ("block_d", lambda r: str(r["block_d"] or "default")),
            ("warps", lambda r: str(r.get("num_warps") or "auto")),
            ("combine stages", lambda r: str(r.get("combine_stages") or "default")),
            ("fwd+bwd", lambda r: ms(r.get("seconds"))), ("first run", lambda r: f"{r.get('warmup_s', 0):.2f} s"),
            ("diff", lambda r: f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else r.get("error", ""))]
    lines.append(table(res["runs"], cols))
    if res["not_run"]:
        lines.append(f"  not run (out of time; sweep budget {res['budget_s']:.0f} s): "
                     + ", ".join(_tiling_name(c) for c in res["not_run"]))
    if res.get("fastest"):
        f = res["fastest"]
        lines.append(f"  fastest: {_tiling_name(f)}: {ms(f['seconds'])}")
    return "\n".join(lines)


REPORTS = {"scan": report_scan, "steps": report_steps, "sweep": report_sweep}
RUNNERS = {"scan": scan_section, "steps": steps_section, "sweep": sweep_section}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def setup_info(cfg, import_s: float) -> dict:
    """Versions, device and sizes, for the JSON."""
    import platform

    import torch
    import triton

    info = {"device": str(cfg.device), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "quick": cfg.quick, "d_inner": cfg.dim, "d_state": cfg.n,
            "scan_tokens": cfg.length, "model": cfg.model, "batch": cfg.batch, "reps": cfg.reps,
            "triton_interpret": os.environ.get("TRITON_INTERPRET"), "import_s": import_s,
            "timing": "CUDA events" if cfg.cuda else "time.perf_counter"}
    if cfg.cuda:
        info.update(gpu=torch.cuda.get_device_name(cfg.device), cuda=torch.version.cuda)
    return info


def write_json(cfg, result: dict) -> None:
    """(Re)write <out>/gpu_profile.json."""
    path = cfg.out / "gpu_profile.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def run_section(cfg, name: str, result: dict) -> bool:
    """Run one section into ``result[name]`` (saved as it goes), print its report; False if it failed."""
    def save(partial):
        """Keep a section's partial result (a cut run keeps it)."""
        result[name] = partial
        write_json(cfg, result)

    t0 = time.perf_counter()
    ok = True
    try:
        result[name] = RUNNERS[name](cfg, save)
        print(REPORTS[name](result[name]), flush=True)
    except Exception as e:  # noqa: BLE001 - reported; the other sections still run
        traceback.print_exc()
        result[name] = {"error": f"{type(e).__name__}: {e}"[:500], "partial": result.get(name)}
        print(f"== {name}: FAILED: {result[name]['error']}", flush=True)
        ok = False
    result["section_s"][name] = time.perf_counter() - t0
    write_json(cfg, result)
    return ok


def main(argv=None) -> int:
    """Run the chosen sections; 0 if every one succeeded, else 1 (the JSON is written either way)."""
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    t0 = time.perf_counter()
    import fsg.ssm.triton_scan  # noqa: F401 - imports torch and triton; timed

    cfg = make_config(args, t0)
    cfg.out.mkdir(parents=True, exist_ok=True)
    result = {"setup": setup_info(cfg, time.perf_counter() - t0), "section_s": {}}
    write_json(cfg, result)
    print("gpu_profile: " + ", ".join(f"{k} {v}" for k, v in result["setup"].items()), flush=True)
    ok = [run_section(cfg, name, result) for name in args.sections]
    print(f"gpu_profile: {sum(ok)} of {len(ok)} sections ok; {cfg.out / 'gpu_profile.json'}", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
