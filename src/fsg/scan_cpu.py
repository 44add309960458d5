"""Fused, memory-bounded selective scan for the CPU (compiled C, loaded with ctypes).

:func:`selective_scan_fused` has the signature and semantics of
:func:`fsg.mamba.selective_scan_ref`. The kernel (``csrc/selective_scan.c``) scans every
(batch, channel) sequence with its ``d_state``-dimensional state in registers, fuses the
``delta`` bias + softplus, the ``D`` skip and the ``silu(z)`` gate, and never materialises a
``L × d_inner × d_state`` tensor: the forward keeps only the state at the start of every chunk of
:data:`CHUNK` steps (``L/CHUNK × d_inner × d_state`` floats); the backward walks the chunks in
reverse, recomputes each chunk's states from its start state and back-propagates through them.
Work is split over ``torch.get_num_threads()`` OpenMP threads.

The C file is compiled at first use with the system C compiler (``$CC``, ``cc`` or ``gcc``;
``-O3 -march=native -fopenmp``) into a cache directory (``$FSG_CACHE``, else
``$XDG_CACHE_HOME/fsg`` or ``~/.cache/fsg``), keyed by the source, the flags, the compiler and the
CPU. Where no compiler is available, the build fails, or ``FSG_NO_COMPILE=1`` is set,
:func:`available` is False and callers fall back to the pure-PyTorch reference scan.
float64 inputs (e.g. ``gradcheck``) and non-CPU tensors also go to the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["selective_scan_fused", "causal_conv1d_fused", "available", "load_library", "CHUNK", "build_error"]

#: Steps between stored states in the forward pass (memory ∝ L / CHUNK; recompute ∝ CHUNK).
CHUNK = 64

_SRC = Path(__file__).with_name("csrc") / "selective_scan.c"
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c99"] + (
    ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_error: Optional[str] = None


def _cache_dir() -> Path:
    env = os.environ.get("FSG_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fsg"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile(cc: str, out: Path, native: bool) -> None:
    flags = _FLAGS + (["-march=native"] if native else [])
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        subprocess.run([cc, *flags, "-o", str(tmp_out), str(_SRC)], check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        os.replace(tmp_out, out)  # atomic: concurrent builders never see a partial library


def load_library() -> Optional[ctypes.CDLL]:
    """Compile (once, cached) and load the kernel; None if that is not possible here."""
    global _lib, _tried, _error
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("FSG_NO_COMPILE", "") not in ("", "0"):
            _error = "FSG_NO_COMPILE is set"
            return None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            _error = "no C compiler (cc/gcc) found"
            return None
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            key = hashlib.sha256(
                b"\0".join([_SRC.read_bytes(), " ".join(_FLAGS).encode(), version.encode(),
                            _cpu_id().encode(), platform.machine().encode()])
            ).hexdigest()[:16]
            cache = _cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            path = cache / f"fsg_scan_{key}.so"
            if not path.exists():
                try:
                    _compile(cc, path, native=True)
                except subprocess.CalledProcessError:
                    _compile(cc, path, native=False)  # a compiler without -march=native
            lib = ctypes.CDLL(str(path))
            if lib.fsg_scan_version() != 5:
                raise RuntimeError("unexpected kernel version")
        except Exception as e:  # noqa: BLE001 - any failure means "use the reference"
            detail = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if isinstance(
                e, subprocess.CalledProcessError) and e.stderr else [str(e)]
            _error = f"building the fused scan failed: {' '.join(detail)}"
            warnings.warn(f"fsg: {_error}; using the slower reference scan", RuntimeWarning, stacklevel=3)
            return None
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.fsg_scan_fwd.argtypes = [i64] * 5 + [ptr] * 8 + [cint, ptr, ptr, ptr, ptr, cint]
        lib.fsg_scan_fwd.restype = None
        lib.fsg_scan_bwd.argtypes = [i64] * 5 + [ptr] * 8 + [cint] + [ptr] * 3 + [ptr] * 9 + [cint]
        lib.fsg_scan_bwd.restype = cint
        lib.fsg_conv_fwd.argtypes = [i64] * 4 + [ptr] * 4 + [cint, cint]
        lib.fsg_conv_fwd.restype = None
        lib.fsg_conv_bwd.argtypes = [i64] * 4 + [ptr] * 4 + [cint] + [ptr] * 3 + [cint]
        lib.fsg_conv_bwd.restype = cint
        _lib = lib
        return lib


def available() -> bool:
    """True when the compiled kernel is (or can be) loaded."""
    return load_library() is not None


def build_error() -> Optional[str]:
    """Why the kernel is unavailable (None if it is available or was not tried)."""
    return _error


def _p(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):  # type: ignore[override]
        lib = load_library()
        batch, dim, length = u.shape
        n = A.shape[1]
        u_, d_, A_ = _f32(u), _f32(delta), _f32(A)
        B_ = B.detach().to(torch.float32).transpose(1, 2).contiguous()  # (batch, L, n)
        C_ = C.detach().to(torch.float32).transpose(1, 2).contiguous()
        D_, z_, bias_, h0_ = _f32(D), _f32(z), _f32(delta_bias), _f32(initial_state)
        nchunks = max(1, (length + CHUNK - 1) // CHUNK)
        out = torch.empty(batch, dim, length, dtype=torch.float32)
        states = torch.empty(batch, dim, nchunks, n, dtype=torch.float32)
        last = torch.empty(batch, dim, n, dtype=torch.float32)
        if length > 0:
            lib.fsg_scan_fwd(batch, dim, length, n, CHUNK, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_),
                             _p(z_), _p(bias_), int(softplus), _p(h0_), _p(out), _p(states), _p(last),
                             torch.get_num_threads())
        else:
            last = h0_.clone() if h0_ is not None else torch.zeros(batch, dim, n)
        ctx.save_for_backward(u_, d_, A_, B_, C_, D_, z_, bias_, states)
        ctx.softplus = softplus
        ctx.flags = (D is not None, z is not None, delta_bias is not None, initial_state is not None)
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):  # type: ignore[override]
        lib = load_library()
        u_, d_, A_, B_, C_, D_, z_, bias_, states = ctx.saved_tensors
        has_D, has_z, has_bias, has_h0 = ctx.flags
        batch, dim, length = u_.shape
        n = A_.shape[1]
        dout_ = dout.to(torch.float32).contiguous()
        dlast_ = None if dlast is None else dlast.to(torch.float32).contiguous()
        du = torch.empty_like(u_)
        ddelta = torch.empty_like(d_)
        dA = torch.zeros_like(A_)
        dB = torch.zeros(batch, length, n)
        dC = torch.zeros(batch, length, n)
        dD = torch.zeros(dim)
        dz = torch.empty_like(u_) if has_z else None
        dbias = torch.zeros(dim)
        dh0 = torch.zeros(batch, dim, n) if has_h0 else None
        if length > 0:
            rc = lib.fsg_scan_bwd(batch, dim, length, n, CHUNK, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_),
                                  _p(z_), _p(bias_), int(ctx.softplus), _p(states), _p(dout_), _p(dlast_),
                                  _p(du), _p(ddelta), _p(dA), _p(dB), _p(dC), _p(dD), _p(dz), _p(dbias),
                                  _p(dh0), torch.get_num_threads())
            if rc != 0:
                raise MemoryError("fused selective scan backward: out of memory for its per-thread buffers")
        elif has_h0 and dlast_ is not None:
            dh0 = dlast_.clone()
        if has_z and length == 0:
            dz = torch.zeros_like(u_)
        return (du, ddelta, dA, dB.transpose(1, 2), dC.transpose(1, 2), dD if has_D else None, dz,
                dbias if has_bias else None, dh0, None)


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                         z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False, initial_state: Optional[Tensor] = None):
    """Fused CPU selective scan; same signature and results as :func:`fsg.mamba.selective_scan_ref`.

    Falls back to the reference for float64 inputs, non-CPU tensors, or when the kernel is not
    available (no compiler)."""
    from .mamba import _check_scan_shapes, selective_scan_ref

    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    if (any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available()):
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  return_last_state=return_last_state, initial_state=initial_state)
    y, last = _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus))
    return (y, last) if return_last_state else y


class _FusedCausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):  # type: ignore[override]
        lib = load_library()
        x_, w_, b_ = _f32(x), _f32(weight), _f32(bias)
        batch, dim, length = x_.shape
        out = torch.empty_like(x_)
        lib.fsg_conv_fwd(batch, dim, length, w_.shape[1], _p(x_), _p(w_), _p(b_), _p(out), int(silu),
                         torch.get_num_threads())
        ctx.save_for_backward(x_, w_, b_)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        lib = load_library()
        x_, w_, b_ = ctx.saved_tensors
        batch, dim, length = x_.shape
        g = dout.to(torch.float32).contiguous()
        dx, dw, db = torch.empty_like(x_), torch.empty_like(w_), torch.empty(dim)
        if lib.fsg_conv_bwd(batch, dim, length, w_.shape[1], _p(x_), _p(w_), _p(b_ if ctx.has_bias else None),
                            _p(g), int(ctx.silu), _p(dx), _p(dw), _p(db), torch.get_num_threads()):
            raise MemoryError("fused causal conv backward: out of memory")
        return dx, dw, (db if ctx.has_bias else None), None


def causal_conv1d_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = False
                        ) -> Optional[Tensor]:
    """Causal depthwise conv (see :func:`fsg.mamba.causal_conv1d`), followed by SiLU if ``silu``,
    with the compiled kernel (the backward recomputes the pre-activation from ``x``); None when
    the kernel does not apply (not CPU, float64, or unavailable)."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available():
        return None
    return _FusedCausalConv.apply(x, weight, bias, bool(silu))
