"""Compile fsg's Triton scan kernels for a GPU that is not here, and report their resources.

    python benchmarks/triton_compile.py [--arch 90] [--quick] [--json]

Every kernel specialisation the CUDA path launches (FSG flat: plain and low-memory block; FSG
stream and temporal steps, the streaming block step with a float32 and a bf16 state; the general scan with an initial state, bf16/fp16 inputs, d_state 1
and 17) goes through Triton's own argument binding and compiler down to a cubin for ``sm_<arch>``
(default 90: H100/H200), with the GPU tiling, from CPU tensors: a stand-in driver answers "device
0 of compute capability <arch>" and nothing is launched. ``ptxas -v`` (the one bundled with
Triton) then gives each kernel's registers per thread, spills and shared memory.

What this checks and what it does not: a kernel that the interpreter runs (the CI tests) may
still fail to compile for a GPU (unsupported layouts, type errors in untaken branches, too much
shared memory); this finds those, and register spills, on a machine without a GPU. It says
nothing about speed or about results on the device: that needs ``benchmarks/gpu_check.sh``.

Prints a table (and, with ``--json``, one JSON object on the last line); exit status 1 if any
kernel fails to compile or asks for more shared memory than the target has.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from fsg.ssm import triton_scan as ts  # noqa: E402
from fsg.ssm import triton_stream as tst  # noqa: E402
from fsg.ssm.mamba import Mamba  # noqa: E402

#: Shared memory per block of a compute capability (bytes): what a launch may ask for at most.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
#: (module, kernel name) of every Triton kernel fsg launches.
KERNELS = [(ts, name) for name in ("_fwd_local_kernel", "_combine_kernel", "_fwd_out_kernel", "_bwd_local_kernel",
                                   "_bwd_main_kernel")] + [(tst, "_stream_fwd_kernel"), (tst, "_stream_bwd_kernel")]


class StandInDriver:
    """Just enough of a Triton driver to bind and compile for ``target`` without a device."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself compiles with for ``arch`` (newer Triton: another one from sm_90)."""
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):
        try:
            return nv.get_ptxas(arch).path
        except TypeError:  # older Triton: get_ptxas() without the arch
            return nv.get_ptxas().path
    return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def ptxas_resources(ptx: str, arch: int) -> Dict[str, int]:
    """Registers per thread and spill bytes of a kernel's PTX, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(arch), f"-arch={_sm(arch)}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-400:]}")
    text = res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0}


def _cuobjdump(arch: int) -> str:
    return os.path.join(os.path.dirname(_ptxas(arch)), "cuobjdump")


def sass_instructions(cubin: bytes, arch: int) -> List[Tuple[int, str]]:
    """(address, opcode and operands) of every SASS instruction of a cubin (``cuobjdump -sass``,
    the one bundled with Triton), predicates stripped."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_cuobjdump(arch), "-sass", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr.strip()[-400:]}")
    out = []
    for line in res.stdout.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][^;]*);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(text: str) -> str:
    return text.split()[0].split(".")[0]


def sass_mix(cubin: bytes, arch: int) -> Dict[str, int]:
    """Instruction counts of a kernel's innermost loop (the shortest backward branch: in fsg's
    per-chunk kernels, the loop over the d_state states, the hot path) and of the whole kernel:
    instructions, shuffles (``SHFL``: cross-lane traffic), ``MUFU`` (exp2 and friends) and, in the
    loop, local-memory loads and stores (``LDL``/``STL``: register spills on the hot path)."""
    ins = sass_instructions(cubin, arch)
    loops = []
    for addr, text in ins:
        target = re.search(r"0x([0-9a-f]+)", text) if _opcode(text) == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            loops.append((addr - int(target.group(1), 16), int(target.group(1), 16), addr))
    body = []
    if loops:
        _, lo, hi = min(loops)
        body = [_opcode(t) for a, t in ins if lo <= a <= hi]
    ops = [_opcode(t) for _, t in ins]
    return {"loop_instructions": len(body), "loop_shfl": body.count("SHFL"), "loop_mufu": body.count("MUFU"),
            "loop_spill_ops": body.count("LDL") + body.count("STL"), "kernel_instructions": len(ops),
            "kernel_shfl": ops.count("SHFL")}


def lanes_on_time(ttgir: str) -> bool:
    """Whether any 2-D blocked layout of a kernel spreads its first axis over lanes. In fsg's
    per-chunk kernels axis 0 of every 2-D tile is time (or chunks): a lane count > 1 there turns
    the in-thread scans and sums over time into shuffles (see triton_scan._store_tc)."""
    layouts = dict(re.findall(r"^#(blocked\d*) = #ttg\.blocked<\{[^}]*threadsPerWarp = \[(\d+), \d+\]", ttgir, re.M))
    for rows, name in re.findall(r"tensor<(\d+)x\d+x[^,>]+, #(blocked\d*)>", ttgir):
        if int(rows) > 1 and int(layouts.get(name, 1)) > 1:  # (1, C) tiles (one step) cannot spread time
            return True
    return False


def _sm(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


class Recorder:
    """Replaces each kernel's launch by a compile (``warmup=True``), recording what it compiled."""

    def __init__(self):
        self.case = ""
        self.compiled: List[Tuple[str, str, object, float]] = []  # (case, kernel, CompiledKernel, seconds)
        self.failures: List[Tuple[str, str, str]] = []

    def __enter__(self):
        for mod, name in KERNELS:
            fn = getattr(mod, name)
            fn.run = self._compile_with(name, fn)
        return self

    def __exit__(self, *exc):
        for mod, name in KERNELS:
            vars(getattr(mod, name)).pop("run", None)

    def _compile_with(self, name: str, fn) -> Callable:
        run = type(fn).run

        def compile_only(*args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            try:
                kernel = run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported per kernel
                self.failures.append((self.case, name, f"{type(e).__name__}: {str(e).strip()[:600]}"))
                return None
            self.compiled.append((self.case, name, kernel, time.perf_counter() - t0))
            return kernel

        return compile_only


def _scan_inputs(batch: int, dim: int, length: int, ns: int, dtype=torch.float32, z=True):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length), A=-torch.rand(dim, ns, generator=g) - 0.5,
                B=r(batch, ns, length), C=r(batch, ns, length), D=torch.randn(dim, generator=g),
                z=r(batch, dim, length) if z else None, delta_bias=torch.randn(dim, generator=g))


def _fwd_bwd(x: dict, h0=None, last_out=None, want_h0=False, softplus=True, **tiling):
    y, states, _ = ts.scan_forward(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                   softplus, h0, last_out=last_out, **tiling)
    ts.scan_backward(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], softplus, h0,
                     states if states.shape[2] > 1 else None, torch.zeros_like(y),
                     torch.zeros_like(h0) if h0 is not None else None, want_h0=want_h0, **tiling)


def _lowmem(batch: int, dim: int, length: int, ns: int):
    x = _scan_inputs(batch, dim, length, ns, z=False)
    dfac = (torch.randn(dim), torch.randn(batch, length))
    zfac = (torch.randn(dim), torch.randn(batch, length))
    kernels = ts.LOW_MEMORY_KERNELS
    y, states = kernels.forward(x["u"], None, x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], dfac, zfac)
    kernels.backward(x["u"], None, x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], states, torch.zeros_like(y),
                     dfac, zfac)


def _stream(batch: int, dim: int, length: int, ns: int):
    x = _scan_inputs(batch, dim, length, ns)
    h0 = torch.zeros(batch, dim, ns)
    _fwd_bwd(x, h0=h0, last_out=torch.empty(batch, dim, ns))


def _stream_block(batch: int, state_dtype: torch.dtype, in_place: bool):
    """The one-token streaming step of FSG's slow-net (fsg.ssm.triton_stream), forward and backward."""
    block = Mamba(d_model=1, d_state=16, d_conv=8, expand=100)
    window = torch.randn(batch, 8, 1)
    h = torch.zeros(batch, 100, 16, dtype=state_dtype)
    h_new = h if in_place else torch.empty_like(h)
    tst.stream_block_forward(block, window, h, None if in_place else h_new)
    tst.stream_block_backward(block, window, h, h_new if in_place else None, torch.zeros(batch, 1, 1), False)


#: (name, what it stands for, run it); the quick set is the first QUICK.
CASES: List[Tuple[str, str, Callable[[], None]]] = [
    ("flat", "FSG flat, plain block: one ResNet-20 layer's 184,321 tokens, d_state 16",
     lambda: _fwd_bwd(_scan_inputs(1, 100, 184321, 16))),
    ("flat-lowmem", "FSG flat, low-memory block (rank-1 delta/z factors)", lambda: _lowmem(1, 100, 184321, 16)),
    ("stream", "FSG stream step: 36,864 weights, 1 token, initial state, state written in place",
     lambda: _stream(36864, 100, 1, 16)),
    ("stream-first", "FSG stream, first step (LRE token + 1 gradient)", lambda: _stream(36864, 100, 2, 16)),
    ("stream-block", "FSG stream step, the block step kernels: 36,864 weights, float32 state",
     lambda: _stream_block(36864, torch.float32, False)),
    ("stream-bf16", "FSG stream step, the block step kernels: bf16 state written in place by the backward",
     lambda: _stream_block(36864, torch.bfloat16, True)),
    ("temporal", "FSG temporal: 36,864 sequences of 6 tokens", lambda: _fwd_bwd(_scan_inputs(36864, 100, 6, 16))),
    ("bf16-h0", "bf16 inputs, initial state and its gradient, 3 chunks",
     lambda: _fwd_bwd(_scan_inputs(2, 40, 40, 16, torch.bfloat16), h0=torch.randn(2, 40, 16), want_h0=True)),
    ("fp16-ds17", "fp16 inputs, d_state 17, no z", lambda: _fwd_bwd(_scan_inputs(2, 40, 40, 17, torch.float16, z=False))),
    ("ds1", "d_state 1, long sequence (many combine tiles)", lambda: _fwd_bwd(_scan_inputs(1, 100, 5000, 1))),
    ("no-softplus", "no softplus", lambda: _fwd_bwd(_scan_inputs(2, 40, 40, 16), softplus=False)),
    ("flat-2ch", "FSG flat, another tiling of the sweep: chunks of 8 steps, 2 channels per lane (64 per warp)",
     lambda: _fwd_bwd(_scan_inputs(1, 100, 184321, 16), chunk=8, block_d=64, num_warps=1)),
    ("flat-pipelined", "FSG flat, the sweep's combine kernels with their loads pipelined (COMBINE_STAGES 3)",
     lambda: _pipelined(_scan_inputs(1, 100, 184321, 16))),
]


def _pipelined(x: dict) -> None:
    with ts.combine_stages(3):
        _fwd_bwd(x)
QUICK = 3


def compile_all(arch: int, quick: bool, sass: bool = False) -> dict:
    target = GPUTarget("cuda", arch, 32)
    previous, tiling = driver._active, ts.gpu_tiling  # _active: None without a GPU (.active would look for one)
    driver.set_active(StandInDriver(target))
    ts.gpu_tiling = lambda device: True
    rows, seen = [], set()
    try:
        with Recorder() as rec:
            for name, _, fn in CASES[:QUICK] if quick else CASES:
                rec.case = name
                fn()
    finally:
        driver._active, ts.gpu_tiling = previous, tiling
    limit = MAX_SHARED.get(arch)
    for case, name, k, seconds in rec.compiled:
        if k.hash in seen:
            continue
        seen.add(k.hash)
        shared = int(k.metadata.shared)
        res = ptxas_resources(k.asm["ptx"], arch)
        if sass:
            res.update(sass_mix(k.asm["cubin"], arch))
            if hasattr(ts, name):  # the scan kernels: axis 0 of their tiles is time (or chunks)
                res["lanes_on_time"] = lanes_on_time(k.asm["ttgir"])
        rows.append(dict(case=case, kernel=name, num_warps=int(k.metadata.num_warps), shared_bytes=shared,
                         shared_ok=limit is None or shared <= limit, compile_s=round(seconds, 2), **res))
    failures = [dict(case=c, kernel=n, error=e) for c, n, e in rec.failures]
    return dict(arch=arch, target=_sm(arch), triton=triton.__version__, torch=torch.__version__, kernels=rows,
                failures=failures, ok=not failures and all(r["shared_ok"] for r in rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true", help=f"only the first {QUICK} cases (FSG flat and stream)")
    ap.add_argument("--json", action="store_true", help="also print one JSON object (last line)")
    ap.add_argument("--sass", action="store_true",
                    help="also disassemble each kernel: instructions and shuffles (SHFL) of its innermost loop and "
                         "in all, and whether a scan kernel puts time across lanes")
    args = ap.parse_args(argv)
    res = compile_all(args.arch, args.quick, args.sass)
    print(f"Triton {res['triton']}, target {res['target']}: {len(res['kernels'])} kernel specialisations compiled, "
          f"{len(res['failures'])} failed")
    extra = f" {'loop ins/shfl/mufu/spill':>24} {'kernel ins/shfl':>15} {'time lanes':>10}" if args.sass else ""
    print(f"{'case':<13} {'kernel':<18} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'shared':>8} {'compile s':>9}"
          + extra)
    for r in res["kernels"]:
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        flag = "" if r["shared_ok"] else "  TOO MUCH SHARED MEMORY"
        if args.sass:
            loop = f"{r['loop_instructions']}/{r['loop_shfl']}/{r['loop_mufu']}/{r['loop_spill_ops']}"
            whole = f"{r['kernel_instructions']}/{r['kernel_shfl']}"
            flag = f" {loop:>24} {whole:>15} {str(r.get('lanes_on_time', '-')):>10}" + flag
        print(f"{r['case']:<13} {r['kernel']:<18} {r['num_warps']:>5} {r['registers']:>5} {spill:>12} "
              f"{r['shared_bytes']:>8} {r['compile_s']:>9}{flag}")
    for f in res["failures"]:
        print(f"FAILED {f['case']} {f['kernel']}: {f['error']}")
    if args.json:
        print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
