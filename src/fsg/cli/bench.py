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
* ``multifc_step``: the MetaQuant MultiFC step of the same network (new keys ``multifc_*``).
* ``fsg_stream_bf16_step``: the stream step with ``state_dtype="bfloat16"`` (the carried state
  stored in 16 bits, one copy; keys ``fsg_stream_bf16_*``).

* ``aten_ops_per_step``: per step measurement, the ATen operators (views excluded) one more,
  untimed step dispatches, backward included: on a GPU each is at least one kernel launch, which
  is what a ResNet-20 step's time is mostly made of there.
* ``fsg_flat_per_layer_step`` (CUDA only): the flat step with ``batch_layers=False``; the
  ``fsg_flat_step`` on CUDA runs the slow-net once per sequence length for all layers (FSG's
  ``batch_layers``, on by default with CUDA), on the CPU once per layer (the CPU default).

``--device cuda`` (one GPU): the same cases on the GPU (models, batches and scan inputs on the
device), timed with CUDA events after the warm-up (``torch.cuda.synchronize()`` first; the scan
gets one untimed warm-up run, which also compiles the Triton kernels), with the peak GPU memory
(``torch.cuda.max_memory_allocated``: the whole process's for the steps, ``*_peak_gpu_mb``; the
scans', minus what the inputs hold) besides the peak RSS. The scan is the CUDA backend
``fsg.ssm`` selects (``mamba_ssm``, else Triton; ``scan_backend``) on 184,321 tokens and on
1,350,000 (``scan_long``: the flat history of every ResNet-20 weight, 5 × 270,000), against
the plain-PyTorch reference scan (``ref_scan``) on the 184,321 tokens only: the reference is a
Python loop over time, with L × d_inner × d_state tensors (≈ 26 GB at 1.35 M tokens), so it is
not timed on the long sequence (the JSON notes say so). On the CPU the output keys are those of
the CPU benchmark above; the CUDA-only keys are ``null`` with a note.
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
#: Keys added to the result (both devices; the ``*_gpu_mb``, ``scan_long_*`` and ``ref_scan_*`` ones are
#: measured on CUDA only, ``null`` with a note on the CPU).
EXTRA_KEYS = ["device", "multifc_step_s", "multifc_peak_rss_mb", "ste_peak_gpu_mb", "multifc_peak_gpu_mb",
              "fsg_flat_peak_gpu_mb", "fsg_stream_peak_gpu_mb", "scan_backend", "scan_peak_gpu_mb", "scan_long_s",
              "scan_long_peak_gpu_mb", "ref_scan_s", "ref_scan_peak_gpu_mb", "mambapy_scan_peak_gpu_mb",
              "fsg_stream_bf16_step_s", "fsg_stream_bf16_peak_rss_mb", "fsg_stream_bf16_peak_gpu_mb",
              "fsg_flat_per_layer_step_s", "fsg_flat_per_layer_peak_gpu_mb", "aten_ops_per_step"]

SCAN_LENGTH = 1 + 5 * 36864
#: The flat history of every ResNet-20 weight (≈ 270,000 weights × L = 5): the long scan on CUDA.
LONG_SCAN_LENGTH = 1_350_000
#: Longest sequence the reference scan (a Python loop over time) is timed on, on CUDA.
REF_SCAN_MAX = SCAN_LENGTH


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gpu_mb(nbytes: int) -> float:
    return nbytes / 2 ** 20


def _cuda_timed(fn, reps: int) -> List[float]:
    """Seconds of each of ``reps`` calls of ``fn``, by CUDA events (the GPU timeline from just
    before the call to just after it; host stalls inside the call count)."""
    import torch

    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times


def _case_step(estimator: str, options: dict, steps: int, batch: int, threads: Optional[int],
               model_name: str = "resnet20", device: str = "cpu") -> dict:
    import torch

    import fsg
    from fsg.models import SmallCNN, get_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3) if model_name == "small-cnn" else get_model(model_name)
    model = fsg.binarize(net, "dorefa")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        model = model.to(device)
    tr = fsg.Trainer(model, estimator, optimizer="sgd", lr=1e-3, **options)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if cuda:
        x, y = x.to(device), y.to(device)
    warmup = 1 + (options.get("history", 5) if estimator == "fsg" else 1)
    for _ in range(warmup):
        tr.step(x, y)
    if cuda:
        times = _cuda_timed(lambda: tr.step(x, y), steps)
        torch.cuda.synchronize()
        res = {"seconds": min(times), "mean_seconds": sum(times) / len(times), "peak_rss_mb": _rss_mb(),
               "peak_gpu_mb": _gpu_mb(torch.cuda.max_memory_allocated()),
               "peak_gpu_reserved_mb": _gpu_mb(torch.cuda.max_memory_reserved()),
               "warmup_steps": warmup, "timed_steps": steps, "timing": "cuda events", "device": device}
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tr.step(x, y)
            times.append(time.perf_counter() - t0)
        res = {"seconds": min(times), "mean_seconds": sum(times) / len(times), "peak_rss_mb": _rss_mb(),
               "warmup_steps": warmup, "timed_steps": steps}
    res["aten_ops"] = aten_ops(lambda: tr.step(x, y))  # one more step, untimed
    return res


def aten_ops(fn) -> int:
    """How many ATen operators (views excluded) ``fn()`` dispatches, its backward passes included: on
    a GPU each is at least one kernel launch (fsg's own C and Triton kernels are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        fn()
    return counter.n


def _scan_inputs(length: int, device: str = "cpu"):
    """The scan benchmark's inputs, (B, L, ED) layout, requiring gradients; the same values on
    every device (drawn on the CPU with seed 0)."""
    import torch

    torch.manual_seed(0)
    dim, n = 100, 16
    delta = torch.nn.functional.softplus(torch.randn(1, length, dim) * 0.5 - 3)
    u = torch.randn(1, length, dim)
    A = -torch.arange(1, n + 1.0).repeat(dim, 1)
    B = torch.randn(1, length, n)
    C = torch.randn(1, length, n)
    D = torch.ones(dim)
    dy = torch.randn(1, length, dim)
    ins = [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D)]
    return ins, dy.to(device)


def _case_scan_cuda(impl: str, reps: int, length: int, device: str) -> dict:
    """The scan, forward + backward, on a CUDA device: ``impl`` ``fused`` (the backend fsg.ssm
    selects there), ``reference`` or ``mambapy``; one untimed warm-up run first (the reference's on
    a short sequence), then ``reps`` runs timed by CUDA events."""
    import torch

    import fsg.ssm

    dim, n = 100, 16
    backend = None
    if impl == "mambapy":
        from mambapy.mamba import MambaBlock, MambaConfig

        block = MambaBlock(MambaConfig(d_model=1, n_layers=1, d_state=n, expand_factor=dim, d_conv=8,
                                       pscan=True)).to(device)

        def scan(u, delta, A, B, C, D):
            return block.selective_scan(u, delta, A, B, C, D)
    else:
        if impl == "reference":
            fn = fsg.ssm.selective_scan_ref
            backend = "reference"
        else:
            backend = fsg.ssm.select_backend(device).name
            fn = fsg.ssm.selective_scan

        def scan(u, delta, A, B, C, D):  # the (B, ED, L) layout of fsg / mamba_ssm
            return fn(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                      D=D).transpose(1, 2)

    def run(ins, dy):
        out = scan(*ins)
        torch.autograd.grad(out, ins, dy)

    warm_length = min(length, 2048) if impl == "reference" else length
    run(*_scan_inputs(warm_length, device))  # compiles kernels, initialises cuBLAS
    ins, dy = _scan_inputs(length, device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = _cuda_timed(lambda: run(ins, dy), reps)
    return {"seconds": min(times), "mean_seconds": sum(times) / len(times),
            "peak_gpu_mb": _gpu_mb(torch.cuda.max_memory_allocated() - base), "peak_rss_mb": _rss_mb(),
            "tokens": length, "reps": reps, "backend": backend, "warmup_tokens": warm_length,
            "timing": "cuda events", "device": device}


def _case_scan(impl: str, reps: int, threads: Optional[int], length: int = SCAN_LENGTH, device: str = "cpu") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":
        return _case_scan_cuda(impl, reps, length, device)
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
        res = _case_step(args.estimator, opts, args.steps, args.batch_size, args.threads, args.model, args.device)
    else:
        res = _case_scan(args.impl, args.reps, args.threads, args.scan_length, args.device)
    print("FSG_BENCH_RESULT " + json.dumps(res))


def _spawn(argv: List[str], timeout: float) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "fsg.cli.bench", "--child", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("FSG_BENCH_RESULT "):
            return json.loads(line[len("FSG_BENCH_RESULT "):])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(err)


def run_benchmarks(steps: int = 2, batch_size: int = 128, scan_reps: int = 2, threads: Optional[int] = None,
                   skip_mambapy: bool = False, timeout: float = 1800, log=None, model: str = "resnet20",
                   scan_length: int = SCAN_LENGTH, device: str = "cpu", long_scan_length: int = LONG_SCAN_LENGTH,
                   ref_reps: int = 1, ref_scan_length: Optional[int] = None) -> dict:
    """Run every measurement (each in a subprocess) and return the result dictionary.
    ``model`` / ``scan_length`` / ``long_scan_length`` shrink the problem (for tests); the defaults
    are the benchmark. ``device``: ``"cpu"`` or a CUDA device (module docstring); ``ref_reps``:
    timed runs of the reference scan on CUDA, on ``ref_scan_length`` tokens (None:
    ``min(scan_length, REF_SCAN_MAX)``)."""
    log = log or (lambda msg: None)
    import torch

    cuda = torch.device(device).type == "cuda"
    common = {"--steps": steps, "--batch-size": batch_size, "--reps": scan_reps, "--model": model,
              "--scan-length": scan_length, "--device": device}
    if threads:
        common["--threads"] = threads
    ref_length = min(scan_length, REF_SCAN_MAX) if ref_scan_length is None else ref_scan_length
    plan = _bench_plan(common, cuda, long_scan_length, ref_length, ref_reps)
    result: Dict[str, object] = {k: None for k in KEYS + EXTRA_KEYS}
    result["device"] = str(device)
    notes: Dict[str, str] = {}
    raw = _run_plan(plan, result, notes, skip_mambapy, timeout, log)
    result["ste_peak_rss_mb"] = raw.get("ste_step", {}).get("peak_rss_mb")
    result["multifc_peak_rss_mb"] = raw.get("multifc_step", {}).get("peak_rss_mb")
    _note_scans(result, notes, raw, cuda, scan_length, ref_length)
    _note_missing(result, notes, cuda)
    if cuda:
        notes["ref_scan_long"] = (f"the reference scan is not timed on {long_scan_length:,} tokens: it is a Python "
                                  f"loop over time ({long_scan_length:,} sequential steps, each a few kernel launches) "
                                  "and holds L x d_inner x d_state float32 tensors (about "
                                  f"{3 * long_scan_length * 100 * 16 * 4 / 1e9:.0f} GB); ref_scan_s is on "
                                  f"{ref_length:,} tokens")
    ratios = _ratios(result, cuda, scan_length == ref_length)
    setup = _setup(model, batch_size, steps, scan_length, threads, device, cuda, long_scan_length, ref_length,
                   ref_reps)
    result.update(ratios=ratios, notes=notes, raw=raw, setup=setup)
    return result


def _bench_plan(common: dict, cuda: bool, long_scan_length: int, ref_length: int, ref_reps: int) -> list:
    """The measurements to run, in order: ``(name, child arguments)``."""

    def case(*argv, **overrides):  # the child's arguments: the case's, then the shared ones (overridden)
        opts = dict(common, **{"--" + k.replace("_", "-"): v for k, v in overrides.items()})
        return list(argv) + [a for k, v in opts.items() for a in (k, str(v))]

    plan = [
        ("ste_step", case("--case", "step", "--estimator", "ste")),
        ("multifc_step", case("--case", "step", "--estimator", "multifc")),
        ("fsg_flat_step", case("--case", "step", "--estimator", "fsg")),
        ("fsg_stream_step", case("--case", "step", "--estimator", "fsg", "--options", json.dumps({"layout": "stream"}))),
        ("fsg_stream_bf16_step", case("--case", "step", "--estimator", "fsg",
                                      "--options", json.dumps({"layout": "stream", "state_dtype": "bfloat16"}))),
        ("scan", case("--case", "scan", "--impl", "fused")),
    ]
    if cuda:  # the flat step above runs the slow-net once per sequence length (batch_layers, on with CUDA)
        plan += [
            ("fsg_flat_per_layer_step", case("--case", "step", "--estimator", "fsg",
                                             "--options", json.dumps({"batch_layers": False}))),
            ("scan_long", case("--case", "scan", "--impl", "fused", scan_length=long_scan_length)),
            ("ref_scan", case("--case", "scan", "--impl", "reference", scan_length=ref_length, reps=ref_reps)),
        ]
    plan.append(("mambapy_scan", case("--case", "scan", "--impl", "mambapy")))
    return plan


def _run_plan(plan: list, result: dict, notes: Dict[str, str], skip_mambapy: bool, timeout: float,
              log) -> Dict[str, dict]:
    """Run each measurement in its subprocess, filling ``result`` (and ``notes`` for the ones that did not run)."""
    raw: Dict[str, dict] = {}
    for name, argv in plan:
        if name == "mambapy_scan" and skip_mambapy:
            notes[name] = "skipped (--skip-mambapy)"
            continue
        log(f"running {name} ...")
        try:
            raw[name] = _spawn(argv, timeout)
        except subprocess.TimeoutExpired:
            notes[name] = f"timed out after {timeout:.0f} s"
            continue
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            notes[name] = f"failed: {e}"
            continue
        result[f"{name}_s"] = raw[name]["seconds"]
        if "aten_ops" in raw[name]:
            result["aten_ops_per_step"] = dict(result["aten_ops_per_step"] or {}, **{name: raw[name]["aten_ops"]})
        if name not in ("ste_step", "multifc_step", "scan_long", "ref_scan", "fsg_flat_per_layer_step"):
            result[f"{name.replace('_step', '')}_peak_rss_mb"] = raw[name]["peak_rss_mb"]
        if "peak_gpu_mb" in raw[name]:
            result[f"{name.replace('_step', '')}_peak_gpu_mb"] = raw[name]["peak_gpu_mb"]
        gpu = f", peak GPU {raw[name]['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in raw[name] else ""
        log(f"  {name}: {raw[name]['seconds']:.3f} s, peak RSS {raw[name]['peak_rss_mb']:.0f} MB{gpu}")
    return raw


def _note_scans(result: dict, notes: Dict[str, str], raw: Dict[str, dict], cuda: bool, scan_length: int,
                ref_length: int) -> None:
    """Record the CUDA scan backend, and note a reference-only backend, a missing mambapy, a shortened ref scan."""
    if "scan" in raw and cuda:
        result["scan_backend"] = raw["scan"].get("backend")
        if result["scan_backend"] == "reference":
            notes["scan_backend"] = ("no fast CUDA scan backend (mamba_ssm, triton) is available: scan_s is the "
                                     "Python-loop reference")
    if "mambapy_scan" in notes and "No module named 'mambapy'" in notes["mambapy_scan"]:
        notes["mambapy_scan"] = "mambapy is not installed (pip install mambapy==1.2.0)"
    if cuda and "ref_scan" in raw and ref_length != scan_length:
        notes["ref_scan"] = f"timed on {ref_length:,} tokens (--scan-length is {scan_length:,})"


#: The measurement each result key comes from (whose note explains a missing value).
_KEY_SOURCE = {"ste_step_s": "ste_step", "fsg_flat_step_s": "fsg_flat_step", "fsg_stream_step_s": "fsg_stream_step",
               "fsg_flat_peak_rss_mb": "fsg_flat_step", "fsg_stream_peak_rss_mb": "fsg_stream_step",
               "scan_s": "scan", "scan_peak_rss_mb": "scan", "mambapy_scan_s": "mambapy_scan",
               "mambapy_scan_peak_rss_mb": "mambapy_scan", "multifc_step_s": "multifc_step",
               "multifc_peak_rss_mb": "multifc_step", "scan_long_s": "scan_long", "ref_scan_s": "ref_scan",
               "fsg_stream_bf16_step_s": "fsg_stream_bf16_step", "fsg_stream_bf16_peak_rss_mb": "fsg_stream_bf16_step"}


def _note_missing(result: dict, notes: Dict[str, str], cuda: bool) -> None:
    """A note for every result key left ``None``: CUDA only, or its measurement's note (else "not measured")."""
    for k in KEYS + EXTRA_KEYS:
        if result[k] is not None or k == "device":
            continue
        if not cuda and (k.endswith("_gpu_mb") or k.startswith(("scan_long", "ref_scan", "fsg_flat_per_layer"))
                         or k == "scan_backend"):
            notes.setdefault(k, "CUDA only (fsg bench --device cuda)")
        elif k in _KEY_SOURCE:
            notes[k] = notes.get(_KEY_SOURCE[k], "not measured")
        elif k == "aten_ops_per_step":
            notes[k] = "not measured"
        elif k.endswith("_peak_gpu_mb"):
            step = k.replace("_peak_gpu_mb", "")
            src = step if step in ("scan", "scan_long", "ref_scan", "mambapy_scan") else step + "_step"
            notes[k] = notes.get(src, "not measured")


def _ratios(result: dict, cuda: bool, same_length: bool) -> Dict[str, float]:
    """Step times × STE's; mambapy's and the reference scan's time (and memory) over fsg's scan."""
    ratios = {}
    if result["ste_step_s"]:
        for k in ("multifc_step", "fsg_flat_step", "fsg_stream_step", "fsg_stream_bf16_step", "fsg_flat_per_layer_step"):
            if result[k + "_s"]:
                ratios[k + "_vs_ste"] = result[k + "_s"] / result["ste_step_s"]
    if result["scan_s"] and result["mambapy_scan_s"]:
        ratios["mambapy_vs_scan_time"] = result["mambapy_scan_s"] / result["scan_s"]
        mem = "gpu" if cuda else "rss"
        if result[f"mambapy_scan_peak_{mem}_mb"] is not None and result[f"scan_peak_{mem}_mb"] is not None:
            ratios["mambapy_vs_scan_memory"] = (result[f"mambapy_scan_peak_{mem}_mb"]
                                                / max(result[f"scan_peak_{mem}_mb"], 1e-9))
    if result["scan_s"] and result["ref_scan_s"] and same_length:
        ratios["ref_vs_scan_time"] = result["ref_scan_s"] / result["scan_s"]
        if result["ref_scan_peak_gpu_mb"] is not None and result["scan_peak_gpu_mb"]:
            ratios["ref_vs_scan_memory"] = result["ref_scan_peak_gpu_mb"] / max(result["scan_peak_gpu_mb"], 1e-9)
    return ratios


def _setup(model: str, batch_size: int, steps: int, scan_length: int, threads: Optional[int], device: str,
           cuda: bool, long_scan_length: int, ref_length: int, ref_reps: int) -> dict:
    """The benchmark's setting: model, sizes, torch, threads, machine; on CUDA the GPU, CUDA, Triton and timing."""
    import torch

    setup = {"model": f"{model}, all conv/linear binarized (dorefa), SGD lr 1e-3",
             "batch_size": batch_size, "timed_steps": steps, "scan_tokens": scan_length,
             "torch": torch.__version__, "threads": threads or torch.get_num_threads(),
             "machine": platform.machine(), "cpus": os.cpu_count(), "device": str(device)}
    if cuda:
        setup.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda,
                     long_scan_tokens=long_scan_length, ref_scan_tokens=ref_length,
                     ref_scan_reps=ref_reps, timing="CUDA events after warm-up (steps: until the history is full; "
                     "scans: one untimed run); peak GPU memory: torch.cuda.max_memory_allocated")
        try:
            import triton

            setup["triton"] = triton.__version__
        except ImportError:
            setup["triton"] = None
    return setup


def _table(r: dict) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    cuda = r.get("device", "cpu").startswith("cuda")
    ratios = r["ratios"]
    rows = [
        ("STE step", r["ste_step_s"], r.get("ste_peak_rss_mb"), r.get("ste_peak_gpu_mb"), None),
        ("MultiFC step", r.get("multifc_step_s"), r.get("multifc_peak_rss_mb"), r.get("multifc_peak_gpu_mb"),
         ratios.get("multifc_step_vs_ste")),
        ("FSG flat step (paper defaults)", r["fsg_flat_step_s"], r["fsg_flat_peak_rss_mb"],
         r.get("fsg_flat_peak_gpu_mb"), ratios.get("fsg_flat_step_vs_ste")),
        ("FSG stream step", r["fsg_stream_step_s"], r["fsg_stream_peak_rss_mb"], r.get("fsg_stream_peak_gpu_mb"),
         ratios.get("fsg_stream_step_vs_ste")),
        ("FSG stream step, bfloat16 state", r.get("fsg_stream_bf16_step_s"), r.get("fsg_stream_bf16_peak_rss_mb"),
         r.get("fsg_stream_bf16_peak_gpu_mb"), ratios.get("fsg_stream_bf16_step_vs_ste")),
        (f"scan fwd+bwd, fsg {r.get('scan_backend') or 'fused'}" if cuda else "scan fwd+bwd, fsg fused", r["scan_s"],
         r["scan_peak_rss_mb"], r.get("scan_peak_gpu_mb"), None),
    ]
    if cuda:
        rows.insert(3, ("FSG flat step, slow-net per layer", r.get("fsg_flat_per_layer_step_s"), None,
                        r.get("fsg_flat_per_layer_peak_gpu_mb"), ratios.get("fsg_flat_per_layer_step_vs_ste")))
        rows += [
            ("scan fwd+bwd, 1.35M tokens", r.get("scan_long_s"), None, r.get("scan_long_peak_gpu_mb"), None),
            ("scan fwd+bwd, reference", r.get("ref_scan_s"), None, r.get("ref_scan_peak_gpu_mb"),
             ratios.get("ref_vs_scan_time")),
        ]
    rows.append(("scan fwd+bwd, mambapy", r["mambapy_scan_s"], r["mambapy_scan_peak_rss_mb"],
                 r.get("mambapy_scan_peak_gpu_mb"), ratios.get("mambapy_vs_scan_time")))
    gpu_head = f" {'peak GPU MB':>12}" if cuda else ""
    lines = [f"{'measurement':<34} {'seconds':>9} {'peak RSS MB':>12}{gpu_head} {'ratio':>8}",
             "-" * (66 + (13 if cuda else 0))]
    for name, s, m, g, ratio in rows:
        gpu = f" {f(g, '12.0f'):>12}" if cuda else ""
        lines.append(f"{name:<34} {f(s, '9.3f'):>9} {f(m, '12.0f'):>12}{gpu} {f(ratio, '8.1f'):>8}")
    lines.append("ratio: × STE for steps; other scan's time / fsg's time for the scans. Scan memory: added by the scan.")
    if r.get("aten_ops_per_step"):
        lines.append("ATen ops per step (views excluded; each >= 1 kernel launch on a GPU): "
                     + ", ".join(f"{k.replace('_step', '')} {v:,}" for k, v in r["aten_ops_per_step"].items()))
    for k, v in r["notes"].items():
        if not (not cuda and v.startswith("CUDA only")):
            lines.append(f"note: {k}: {v}")
    if not cuda:
        lines.append("note: GPU columns, the 1.35M-token scan and the reference scan: fsg bench --device cuda")
    return "\n".join(lines)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fsg bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA device (cuda, cuda:1): where the steps and scans "
                   "run; on CUDA: CUDA-event timing, peak GPU memory, a 1.35M-token scan and the reference scan")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per estimator (min reported)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=2, help="timed scan repetitions (min reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-mambapy", action="store_true", help="do not run the mambapy comparison")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement")
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32", "resnet44", "small-cnn"],
                   help="model of the step measurements")
    p.add_argument("--scan-length", type=int, default=SCAN_LENGTH, help="tokens of the scan measurement")
    p.add_argument("--long-scan-length", type=int, default=LONG_SCAN_LENGTH,
                   help="tokens of the long scan measurement (CUDA only)")
    p.add_argument("--ref-scan-length", type=int, default=None,
                   help=f"tokens of the reference scan (CUDA only; a Python loop over time; default: the scan's, "
                        f"at most {REF_SCAN_MAX:,})")
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
        p.add_argument("--device", default="cpu")
        _child(p.parse_args(argv[1:]))
        return 0
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> int:
    for name in ("steps", "batch_size", "reps", "scan_length", "long_scan_length", "ref_scan_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"fsg: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from fsg.train.config import require_device

    device = getattr(args, "device", "cpu")
    try:
        require_device(device)
    except ValueError as e:
        print(f"fsg: error: {e}", file=sys.stderr)
        return 2
    res = run_benchmarks(steps=args.steps, batch_size=args.batch_size, scan_reps=args.reps, threads=args.threads,
                         skip_mambapy=args.skip_mambapy, timeout=args.timeout, model=args.model,
                         scan_length=args.scan_length, device=device,
                         long_scan_length=getattr(args, "long_scan_length", LONG_SCAN_LENGTH),
                         ref_scan_length=getattr(args, "ref_scan_length", None),
                         log=None if args.json else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=2) if args.json else _table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
