"""The ``"cpu"`` backend of :mod:`fsg.ssm`: fused, memory-bounded selective scan, causal conv and
low-memory Mamba block for the CPU (compiled C, loaded with ctypes).

(Formerly ``fsg.scan_cpu``.)

:func:`selective_scan_fused` has the signature and semantics of
:func:`fsg.ssm.reference.selective_scan_ref`. The kernel (``csrc/selective_scan.c``) scans every
(batch, channel) sequence with its ``d_state``-dimensional state in registers, fuses the
``delta`` bias + softplus, the ``D`` skip and the ``silu(z)`` gate, and never materialises a
``L × d_inner × d_state`` tensor: the forward keeps only the state at the start of every chunk of
:data:`CHUNK` steps (``L/CHUNK × d_inner × d_state`` floats); the backward walks the chunks in
reverse, recomputes each chunk's states from its start state and back-propagates through them.
Work is split over ``torch.get_num_threads()`` OpenMP threads.

Streaming (one token per sequence, many sequences): single-step kernels, whose carried state may
be stored in 16 bits (:func:`selective_scan_step` with ``state_dtype`` bfloat16 / float16: read
as stored, float32 arithmetic, the new state rounded to nearest even), and :func:`mamba_stream`,
the whole streaming step of a Mamba block keeping only its input window for the backward pass,
run over slices of rows, optionally updating the state in place from the backward kernel (one
copy of the state instead of two). The backward of a single float32 step whose old state needs
no gradient reads the new state the forward wrote instead of the old one: every term of the
gradients that involves the old state does so as ``exp(Δ·A)·h₀ = h₁ − Δ·u·B``, so it computes
no ``exp`` (the 16-bit in-place step cannot: its forward must leave the state as it was). For a
d_model = 1 block and one new token (FSG's slow-net) the whole streaming step — projections,
scan step, ``out_proj`` — is one kernel each way (``fsg_stream_block_fwd`` / ``_bwd``); the
low-memory block of :mod:`fsg.ssm.lowmem` runs on this module's scan kernels.

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

from fsg.ssm import lowmem as _lowmem
from fsg.ssm.lowmem import ScanKernels
from fsg.ssm.reference import check_scan_shapes, selective_scan_ref

__all__ = ["selective_scan_fused", "selective_scan_step", "causal_conv1d_fused", "mamba_low_memory", "mamba_stream",
           "available", "load_library", "CHUNK", "build_error", "STATE_DTYPES", "state_convert"]

#: Steps between stored states in the forward pass (memory ∝ L / CHUNK; recompute ∝ CHUNK).
CHUNK = 128

_SRC = Path(__file__).parent.parent / "csrc" / "selective_scan.c"  # fsg/csrc/
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
            if lib.fsg_scan_version() != 13:
                raise RuntimeError("unexpected kernel version")
        except Exception as e:  # noqa: BLE001 - any failure means "use the reference"
            detail = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if isinstance(
                e, subprocess.CalledProcessError) and e.stderr else [str(e)]
            _error = f"building the fused scan failed: {' '.join(detail)}"
            warnings.warn(f"fsg: {_error}; using the slower reference scan", RuntimeWarning, stacklevel=3)
            return None
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.fsg_scan_fwd.argtypes = [i64] * 5 + [ptr] * 8 + [cint, ptr, ptr, ptr, ptr] + [ptr] * 4 + [cint]
        lib.fsg_scan_fwd.restype = cint
        lib.fsg_scan_bwd.argtypes = [i64] * 5 + [ptr] * 8 + [cint] + [ptr] * 3 + [ptr] * 10 + [ptr] * 8 + [cint]
        lib.fsg_scan_bwd.restype = cint
        lib.fsg_scan_step_fwd.argtypes = [i64] * 3 + [cint] + [ptr] * 8 + [cint] + [ptr] * 3 + [ptr] * 4 + [cint]
        lib.fsg_scan_step_fwd.restype = cint
        lib.fsg_scan_step_bwd.argtypes = ([i64] * 3 + [cint] + [ptr] * 8 + [cint] + [ptr] * 3 + [ptr] * 12 + [ptr] * 8
                                          + [cint])
        lib.fsg_scan_step_bwd.restype = cint
        lib.fsg_stream_block_fwd.argtypes = [i64] * 4 + [cint] + [ptr] * 11 + [ptr] * 3 + [cint]
        lib.fsg_stream_block_fwd.restype = cint
        lib.fsg_stream_block_bwd.argtypes = [i64] * 4 + [cint] + [ptr] * 11 + [ptr] * 15 + [cint]
        lib.fsg_stream_block_bwd.restype = cint
        lib.fsg_state_convert.argtypes = [i64, cint, cint, cint, ptr, ptr]
        lib.fsg_state_convert.restype = None
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


#: Storage dtypes of the streaming state the step kernels read and write (float32 arithmetic).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FMT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def state_convert(x: Tensor, dtype: torch.dtype, portable: bool = False) -> Tensor:
    """The step kernels' own conversion between float32 and a 16-bit state dtype (for tests:
    it must equal ``x.to(dtype)``); ``portable``: float16 through the integer routines used where
    the compiler has no F16C instructions."""
    if (x.dtype == torch.float32) == (dtype == torch.float32) or torch.float32 not in (x.dtype, dtype):
        raise ValueError(f"state_convert converts between float32 and a 16-bit dtype, got {x.dtype} -> {dtype}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    fmt = _FMT[dtype if x.dtype == torch.float32 else x.dtype]
    load_library().fsg_state_convert(x.numel(), fmt, int(x.dtype == torch.float32), int(portable), _p(x), _p(out))
    return out


def _scan_forward(u_, d_, A_, B_, C_, D_, z_, bias_, h0_, softplus: bool, dfac=None, zfac=None, last_out=None,
                  state_dtype=None):
    """Run the forward kernel on float32 contiguous inputs (``B_``, ``C_`` as (batch, L, n)).
    ``dfac`` / ``zfac``: ``(w (d_inner,), x (batch, L))`` giving ``delta`` / ``z`` as the rank-1
    product ``w[d]·x[b, t]`` instead of ``d_`` / ``z_`` (which are then None).
    A single step (L = 1) reads ``h0_`` in its dtype (float32, bfloat16 or float16)
    and writes ``last`` in the same dtype (``state_dtype`` when ``h0_`` is None); every other
    scan is float32 throughout. Returns ``(y, states, last)``."""
    lib = load_library()
    dfw, dfx = dfac if dfac is not None else (None, None)
    zfw, zfx = zfac if zfac is not None else (None, None)
    batch, dim, length = u_.shape
    n = A_.shape[1]
    nchunks = max(1, (length + CHUNK - 1) // CHUNK)
    out = torch.empty(batch, dim, length, dtype=torch.float32)
    # a single chunk (streaming): its start state is the initial state (h0, or zero: None), so
    # nothing needs storing
    alias = nchunks == 1
    if alias:
        states = h0_.view(batch, dim, 1, n) if h0_ is not None else None
    else:
        states = torch.empty(batch, dim, nchunks, n, dtype=torch.float32)
    step = length == 1  # one step of many sequences: streaming
    # the step kernels store the state as h0_'s dtype (float32, or 16 bits); the others float32
    sdt = h0_.dtype if (step and h0_ is not None) else (state_dtype if step and state_dtype else torch.float32)
    ok_out = (last_out is not None and last_out.dtype == sdt and last_out.is_contiguous()
              and tuple(last_out.shape) == (batch, dim, n) and last_out.device.type == "cpu")
    last = last_out if ok_out else torch.empty(batch, dim, n, dtype=sdt)
    if step:
        if lib.fsg_scan_step_fwd(batch, dim, n, _FMT[sdt], _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_), _p(z_),
                                 _p(bias_), int(softplus), _p(h0_), _p(out), _p(last), _p(dfw), _p(dfx), _p(zfw),
                                 _p(zfx), torch.get_num_threads()):
            raise MemoryError("fused selective scan step: out of memory")
    elif length > 0:
        if lib.fsg_scan_fwd(batch, dim, length, n, CHUNK, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_),
                            _p(z_), _p(bias_), int(softplus), _p(h0_), _p(out), None if alias else _p(states),
                            _p(last), _p(dfw), _p(dfx), _p(zfw), _p(zfx), torch.get_num_threads()):
            raise MemoryError("fused selective scan forward: out of memory for its work buffers")
    else:
        last = h0_.clone() if h0_ is not None else torch.zeros(batch, dim, n, dtype=torch.float32)
    return out, states, last


def _scan_backward(u_, d_, A_, B_, C_, D_, z_, bias_, states, softplus: bool, dout, dlast=None,
                   want_h0: bool = False, want_y: bool = False, dfac=None, zfac=None, hnew=None, hfrom=None):
    """Run the backward kernel. Returns ``(du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, y)`` with
    ``dB``, ``dC`` as (batch, L, n); ``dz``/``dh0``/``y`` None unless applicable/asked for. With
    factored ``dfac``/``zfac`` (see :func:`_scan_forward`), ``ddelta``/``dz`` are the pairs
    ``(dw, dx)`` of gradients of the factors. A single step reads ``states`` (= h0) in its dtype;
    ``hnew`` (single step only; may be ``states`` itself): receives the new state, rounded to its
    dtype, which must be ``states``' dtype. ``hfrom`` (single step only, no ``want_h0``, no
    ``hnew``, ``states`` None): the float32 new state ``h₁`` the forward wrote, read
    instead of ``h₀``: the kernel then needs no ``exp``, since every term of the backward that
    involves the old state does so as ``exp(Δ·A)·h₀ = h₁ − Δ·u·B``."""
    lib = load_library()
    dfw, dfx = dfac if dfac is not None else (None, None)
    zfw, zfx = zfac if zfac is not None else (None, None)
    batch, dim, length = u_.shape
    n = A_.shape[1]
    dout_ = dout.to(torch.float32).contiguous()
    dlast_ = None if dlast is None else dlast.to(torch.float32).contiguous()
    du = torch.empty_like(u_)
    ddelta = torch.empty_like(d_) if d_ is not None else None
    f32 = torch.float32  # explicit: the kernels read and write float32 whatever the default dtype
    ddw = torch.zeros(dim, dtype=f32) if dfx is not None else None
    ddx = torch.zeros(batch, length, dtype=f32) if dfx is not None else None
    dzw = torch.zeros(dim, dtype=f32) if zfx is not None else None
    dzx = torch.zeros(batch, length, dtype=f32) if zfx is not None else None
    dA = torch.zeros_like(A_)
    dB = torch.zeros(batch, length, n, dtype=f32)
    dC = torch.zeros(batch, length, n, dtype=f32)
    dD = torch.zeros(dim, dtype=f32)
    dz = torch.empty_like(u_) if z_ is not None else None
    dbias = torch.zeros(dim, dtype=f32)
    dh0 = torch.zeros(batch, dim, n, dtype=f32) if want_h0 else None
    y = torch.empty_like(u_) if want_y else None
    if hfrom is not None and (length != 1 or want_h0 or hnew is not None or states is not None
                              or hfrom.dtype != f32):
        raise ValueError("hfrom: a single step's float32 new state, without states, want_h0 or hnew")
    if length == 1:  # one step (streaming); `states` is h0 or None
        fmt = _FMT[states.dtype] if states is not None else 0
        rc = lib.fsg_scan_step_bwd(batch, dim, n, fmt, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_), _p(z_),
                                   _p(bias_), int(softplus), _p(states), _p(dout_), _p(dlast_), _p(du), _p(ddelta),
                                   _p(dA), _p(dB), _p(dC), _p(dD), _p(dz), _p(dbias), _p(dh0), _p(y), _p(hnew),
                                   _p(hfrom), _p(dfw), _p(dfx), _p(zfw), _p(zfx), _p(ddw), _p(ddx), _p(dzw), _p(dzx),
                                   torch.get_num_threads())
        if rc != 0:
            raise MemoryError("fused selective scan step backward: out of memory")
    elif length > 0:
        rc = lib.fsg_scan_bwd(batch, dim, length, n, CHUNK, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_),
                              _p(z_), _p(bias_), int(softplus), _p(states), _p(dout_), _p(dlast_),
                              _p(du), _p(ddelta), _p(dA), _p(dB), _p(dC), _p(dD), _p(dz), _p(dbias),
                              _p(dh0), _p(y), _p(dfw), _p(dfx), _p(zfw), _p(zfx), _p(ddw), _p(ddx), _p(dzw),
                              _p(dzx), torch.get_num_threads())
        if rc != 0:
            raise MemoryError("fused selective scan backward: out of memory for its per-thread buffers")
    elif want_h0 and dlast_ is not None:
        dh0 = dlast_.clone()
    if dfx is not None:
        ddelta = (ddw, ddx)
    if zfx is not None:
        dz = (dzw, dzx)
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, y


def _state_in(initial_state: Optional[Tensor], length: int, state_dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """The initial state as the kernels read it: for a single step in the state dtype (a 16-bit
    state is read as stored, never widened as a whole), for longer scans as float32."""
    if initial_state is None:
        return None
    if length == 1 and state_dtype is not None:
        return initial_state.detach().to(state_dtype).contiguous()
    return _f32(initial_state)


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, last_out,  # type: ignore[override]
                state_dtype=None):
        u_, d_, A_ = _f32(u), _f32(delta), _f32(A)
        B_ = B.detach().to(torch.float32).transpose(1, 2).contiguous()  # (batch, L, n)
        C_ = C.detach().to(torch.float32).transpose(1, 2).contiguous()
        D_, z_, bias_ = _f32(D), _f32(z), _f32(delta_bias)
        length = u.shape[2]
        h0_ = _state_in(initial_state, length, state_dtype)
        out, states, last = _scan_forward(u_, d_, A_, B_, C_, D_, z_, bias_, h0_, softplus, last_out=last_out[0],
                                          state_dtype=state_dtype)
        if state_dtype is not None and last.dtype != state_dtype:  # a scan of L != 1 tokens: round at the end
            buf = last_out[0]
            ok = buf is not None and buf.dtype == state_dtype and buf.shape == last.shape and buf.is_contiguous()
            last = buf.copy_(last) if ok else last.to(state_dtype)
        ctx.set_materialize_grads(False)  # an unused last state (streaming) gets no zero-filled gradient
        # a single float32 step whose initial state needs no gradient: the backward reads the new
        # state (no exp; see _scan_backward's hfrom), saved so that changing it in place is caught
        ctx.from_new = length == 1 and last.dtype == torch.float32 and not ctx.needs_input_grad[8]
        ctx.save_for_backward(u_, d_, A_, B_, C_, D_, z_, bias_, last if ctx.from_new else states)
        ctx.softplus = softplus
        ctx.flags = (D is not None, z is not None, delta_bias is not None, initial_state is not None)
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):  # type: ignore[override]
        u_, d_, A_, B_, C_, D_, z_, bias_, states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u_)
        has_D, has_z, has_bias, has_h0 = ctx.flags
        hfrom = states if ctx.from_new else None
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, _ = _scan_backward(
            u_, d_, A_, B_, C_, D_, z_, bias_, None if ctx.from_new else states, ctx.softplus, dout, dlast,
            want_h0=has_h0 and ctx.needs_input_grad[8], hfrom=hfrom)
        if dh0 is not None and dh0.dtype != ctx.h0_dtype:
            dh0 = dh0.to(ctx.h0_dtype)
        return (du, ddelta, dA, dB.transpose(1, 2), dC.transpose(1, 2), dD if has_D else None, dz,
                dbias if has_bias else None, dh0, None, None, None)


def _lowmem_forward(u, delta, A, B, C, D, z, bias, dfac, zfac):
    """:class:`fsg.ssm.lowmem.ScanKernels` ``forward`` with the C kernels (B, C to (batch, L, n))."""
    y, states, _ = _scan_forward(u, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D, z,
                                 bias, None, True, dfac=dfac, zfac=zfac)
    return y, states


def _lowmem_backward(u, delta, A, B, C, D, z, bias, states, dy, dfac, zfac):
    """:class:`fsg.ssm.lowmem.ScanKernels` ``backward`` with the C kernels."""
    du, ddelta, dA, dB, dC, dD, dz, dbias, _, y = _scan_backward(
        u, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D, z, bias, states, True, dy,
        want_y=True, dfac=dfac, zfac=zfac)
    return du, ddelta, dA, dB.transpose(1, 2), dC.transpose(1, 2), dD, dz, dbias, y


#: The C kernels for :class:`fsg.ssm.lowmem.MambaLowMemory`.
LOW_MEMORY_KERNELS = ScanKernels(_lowmem_forward, _lowmem_backward)


# ----------------------------------------------------------------------------------------------
# The streaming step of a Mamba block (Mamba.stream with low_memory=True)

#: The streaming step runs over the rows (weights) in slices: each slice's float32 activations
#: of shape (rows, d_inner, T_new) — and, for a scan of several tokens (the first call, [LRE
#: token, g⁽⁰⁾]), its float32 states, which the general kernels' work buffers and last state
#: hold — take at most about this many bytes. So no float32 copy of the state and no layer-sized
#: activation ever exists, forward or backward.
_SLICE_BYTES = 4 << 20


def _row_slices(batch: int, bytes_per_row: int):
    rows = max(1, _SLICE_BYTES // max(1, bytes_per_row))
    return [slice(b0, min(batch, b0 + rows)) for b0 in range(0, batch, rows)]


def _stream_slices(block, batch: int, t_new: int):
    return _row_slices(batch, 4 * block.d_inner * (1 if t_new == 1 else max(t_new, block.d_state)))


def _step_fwd_kernel(u_, d_, A_, B_, C_, D_, z_, bias_, dfac, zfac, h0, out, last) -> None:
    """One single-step forward kernel call; ``h0`` / ``last`` (None allowed, possibly the same
    tensor: an in-place update) in one state dtype, ``out`` None: no output computed."""
    batch, dim, _ = u_.shape
    sdt = (h0 if h0 is not None else last).dtype
    dfw, dfx = dfac or (None, None)
    zfw, zfx = zfac or (None, None)
    if load_library().fsg_scan_step_fwd(batch, dim, A_.shape[1], _FMT[sdt], _p(u_), _p(d_), _p(A_), _p(B_), _p(C_),
                                         _p(D_), _p(z_), _p(bias_), 1, _p(h0), _p(out), _p(last), _p(dfw), _p(dfx),
                                         _p(zfw), _p(zfx), torch.get_num_threads()):
        raise MemoryError("fused selective scan step: out of memory")


def _pre_scan_weights(block):
    """The parameters :meth:`fsg.ssm.mamba.Mamba.stream_pre_scan` uses, in its ``weights`` order."""
    return (block.in_proj.weight, block.conv1d.weight, block.conv1d.bias, block.x_proj.weight, block.dt_proj.weight)


def _stream_kernel_inputs(u, z, delta, Bt, Ct, scan_params):
    """The kernel inputs from :meth:`fsg.ssm.mamba.Mamba.stream_pre_scan`'s outputs (``factored``: ``z``
    and ``delta`` as ``(w, x)`` pairs) and ``scan_params`` = ``(A_log, D, dt_proj.bias)``:
    ``(u, delta, A, B, C, D, z, bias, dfac, zfac)``, float32 contiguous; ``delta`` / ``z`` None
    where given as factors."""
    A_log, D, bias = scan_params
    fac = lambda t: tuple(_f32(x) for x in t) if isinstance(t, tuple) else None  # noqa: E731
    dfac, zfac = fac(delta), fac(z)
    return (_f32(u), None if dfac else _f32(delta), (-torch.exp(A_log.detach().float())).contiguous(),
            Bt.detach().float().transpose(1, 2).contiguous(), Ct.detach().float().transpose(1, 2).contiguous(),
            _f32(D), None if zfac else _f32(z), _f32(bias), dfac, zfac)


def _scan_params(block):
    return block.A_log, block.D, block.dt_proj.bias


def _factored(block) -> bool:
    """d_model = dt_rank = 1 (FSG's slow-net): z and delta go to the kernels as rank-1 factors."""
    return block.d_model == 1 and block.dt_rank == 1


def _block_kernel_weights(block, weights=None, scan_params=None) -> tuple:
    """The fused block step's weights (``fsg_stream_block_fwd`` order, float32 contiguous):
    ``(cwT, conv_b, w_u, w_x, dfw, zfw, w_out, A, D, bias)``, ``weights`` / ``scan_params`` as
    in :func:`_stream_scan`."""
    w_in, conv_w, conv_b, w_x, w_dt = weights or _pre_scan_weights(block)
    A_log, D, bias = scan_params or _scan_params(block)
    d = block.d_inner
    f = lambda t: t.detach().float().contiguous()  # noqa: E731
    return (f(conv_w.reshape(d, -1).t()), f(conv_b), f(w_in[:d, 0]), f(w_x), f(w_dt[:, 0]),
            f(w_in[d:, 0]), f(block.out_proj.weight[0]), f(-torch.exp(A_log.detach().float())), f(D), f(bias))


def _fused_block(block, t_new: int) -> bool:
    """The whole step in one kernel (``fsg_stream_block_*``): one token, d_model = dt_rank = 1."""
    return t_new == 1 and _factored(block)


def _block_step_fwd(block, window: Tensor, h: Optional[Tensor], h_new: Optional[Tensor], want_out: bool,
                    weights=None, scan_params=None) -> Optional[Tensor]:
    """The forward of a one-token streaming step of a d_model = 1 block in one kernel call:
    returns ``out`` (B, 1, 1) or None; the new state goes into ``h_new`` (None: not written)."""
    batch = window.shape[0]
    win = _f32(window.reshape(batch, -1))
    out = torch.empty(batch, dtype=torch.float32) if want_out else None
    state = h if h is not None else h_new
    fmt = _FMT[state.dtype] if state is not None else 0
    kw = _block_kernel_weights(block, weights, scan_params)  # held: the kernel reads these pointers
    if load_library().fsg_stream_block_fwd(batch, block.d_inner, block.d_state, block.d_conv, fmt, _p(win),
                                           *(_p(t) for t in kw),
                                           _p(h), _p(out), _p(h_new), torch.get_num_threads()):
        raise MemoryError("fused streaming block step: out of memory")
    return None if out is None else out.view(batch, 1, 1).to(window.dtype)


def _block_step_bwd(block, window: Tensor, h0: Optional[Tensor], hnew: Optional[Tensor], dout: Tensor,
                    want_window: bool, hfrom: Optional[Tensor] = None) -> tuple:
    """The backward of :func:`_block_step_fwd` in one kernel call (``hnew``: receives the new
    state, may be ``h0``; ``hfrom``: the float32 new state the forward wrote, read instead of
    ``h0`` — the backward then computes no ``exp``, see :func:`_scan_backward`). Returns
    ``(d_window or None, [d in_proj.weight, d conv1d.weight, d conv1d.bias, d x_proj.weight,
    d dt_proj.weight, d dt_proj.bias, d A_log, d D, d out_proj.weight])``, float32, in the
    parameters' shapes."""
    batch, d, n, k = window.shape[0], block.d_inner, block.d_state, block.d_conv
    f32 = torch.float32
    win = _f32(window.reshape(batch, -1))
    kw = _block_kernel_weights(block)
    dout_ = _f32(dout.reshape(batch))
    dwin = torch.empty(batch, k, dtype=f32) if want_window else None
    dcwT, dw_x, dA = torch.empty(k, d, dtype=f32), torch.empty(1 + 2 * n, d, dtype=f32), torch.empty(d, n, dtype=f32)
    dconv_b, dw_u, ddfw, dzfw, dw_out, dD, dbias = (torch.empty(d, dtype=f32) for _ in range(7))
    if hfrom is not None:
        h0 = hnew = None
    state = h0 if h0 is not None else hnew
    fmt = _FMT[state.dtype] if state is not None else 0
    if load_library().fsg_stream_block_bwd(batch, d, n, k, fmt, _p(win), *(_p(t) for t in kw), _p(h0),
                                           _p(dout_), _p(hnew), _p(hfrom), _p(dwin), _p(dcwT),
                                           _p(dconv_b), _p(dw_u), _p(dw_x), _p(ddfw), _p(dzfw), _p(dw_out), _p(dA),
                                           _p(dD), _p(dbias), torch.get_num_threads()):
        raise MemoryError("fused streaming block step backward: out of memory")
    grads = [torch.cat([dw_u, dzfw]).unsqueeze(1), dcwT.t().reshape(block.conv1d.weight.shape), dconv_b, dw_x,
             ddfw.unsqueeze(1), dbias, dA * kw[7], dD, dw_out.unsqueeze(0)]  # A = -exp(A_log): dA_log = dA·A
    return (None if dwin is None else dwin.view(batch, k, 1)), grads


def _stream_scan(block, window: Tensor, h: Optional[Tensor], h_new: Optional[Tensor], weights=None,
                 scan_params=None, want_out: bool = True):
    """The forward of the streaming step without a graph, slice by slice. ``h`` the old state (or
    None), ``h_new`` the tensor the new state is written into (None: not written; it may be
    ``h``). Returns ``(out (B, T_new, d_model) or None, chunk_states)``, ``chunk_states`` the
    float32 chunk-start states a scan of more than :data:`CHUNK` tokens needs in its backward."""
    batch, t_new = window.shape[0], window.shape[1] - (block.d_conv - 1)
    if _fused_block(block, t_new):
        return _block_step_fwd(block, window, h, h_new, want_out, weights, scan_params), None
    weights = weights or _pre_scan_weights(block)
    scan_params = scan_params or _scan_params(block)
    out = torch.empty(batch, t_new, block.d_model, dtype=window.dtype) if want_out else None
    w_out = block.out_proj.weight.detach().float()
    chunk_states = []
    with torch.no_grad():
        for sl in _stream_slices(block, batch, t_new):
            pre = block.stream_pre_scan(window[sl], weights, factored=_factored(block))
            u_, d_, A_, B_, C_, D_, z_, bias_, dfac, zfac = _stream_kernel_inputs(*pre, scan_params)
            if t_new == 1:
                y = torch.empty(u_.shape, dtype=torch.float32) if want_out else None
                _step_fwd_kernel(u_, d_, A_, B_, C_, D_, z_, bias_, dfac, zfac, None if h is None else h[sl], y,
                                 None if h_new is None else h_new[sl])
            else:  # the general kernel (float32): the old rows widened, the last state rounded
                y, st, last = _scan_forward(u_, d_, A_, B_, C_, D_, z_, bias_, None if h is None else _f32(h[sl]), True,
                                            dfac=dfac, zfac=zfac)
                if (t_new + CHUNK - 1) // CHUNK > 1:
                    chunk_states.append(st)
                if h_new is not None:
                    h_new[sl].copy_(last)  # rounded to nearest even, as .to(h_new.dtype)
            if want_out:
                out[sl] = torch.matmul(y.transpose(1, 2), w_out.t()).to(out.dtype)  # (rows, T_new, d_model)
    return out, (torch.cat(chunk_states) if chunk_states else None)


def _advance(block, window: Tensor, h: Tensor, params: tuple) -> None:
    """:class:`fsg.ssm.lowmem.PendingAdvance`'s update: the step's new state written over ``h``
    (``params``: the snapshot of :func:`_pre_scan_weights` + :func:`_scan_params`)."""
    _stream_scan(block, window, h, h, params[:5], params[5:], want_out=False)


def _graph_backward(wg: Tensor, weights: list, wants: list, outs: tuple, grads: tuple, d_window: Optional[Tensor],
                    sl: slice, acc: list) -> None:
    """Back-propagate the kernel's gradients ``(du, dz, ddelta, dB, dC)`` through the graph of
    ``outs`` = :meth:`fsg.ssm.mamba.Mamba.stream_pre_scan` (``wg``: the slice of the window it
    ran on): ``d_window[sl]`` is set, the weights' gradients are added to ``acc``."""
    du, dz, ddelta, dB, dC = grads
    graph_grads = [du, dz, ddelta, dB.transpose(1, 2), dC.transpose(1, 2)]  # outs: u, z, delta, B, C
    inputs = [wg] + weights
    wanted = [t for t, w in zip(inputs, wants) if w]
    pairs = [(o, g) for o, g in zip(outs, graph_grads) if o is not None and o.requires_grad]
    if not (wanted and pairs):
        return
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    grads = [next(got) if w else None for w in wants]
    if grads[0] is not None:
        d_window[sl] = grads[0]
    for i, g in enumerate(grads[1:]):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g


class _MambaStream(torch.autograd.Function):
    """The streaming step of a Mamba block keeping only its input window for the backward pass
    (plus the old state, which the caller holds anyway, or, for a float32 state written out of
    place, the new one). A one-token step of a d_model = 1 block (FSG's slow-net) runs in one
    kernel each way (:func:`_block_step_fwd`, :func:`_block_step_bwd`): the projections, the scan
    step and ``out_proj`` forward; backward, the same recomputed, their gradients, and in place
    the new state written over the old. Otherwise the backward recomputes the cheap projections,
    runs the step's backward kernel (which also recomputes ``y`` for ``out_proj``'s gradient) and
    back-propagates through the projections, slice by slice of rows (:data:`_SLICE_BYTES`)."""

    @staticmethod
    def forward(ctx, window, block, box, w_in, conv_w, conv_b, w_x, w_dt, b_dt, A_log, D, w_out):  # type: ignore[override]
        h, h_new, pending = box
        t_new = window.shape[1] - (block.d_conv - 1)
        # the old state the backward needs: h itself, unless a scan of several tokens overwrites it
        h0 = h.clone() if (h is not None and h_new is h and pending is None) else h
        out, chunk_states = _stream_scan(block, window, h, None if pending is not None else h_new)
        # a float32 new state written out of place: the backward reads it, not h0 (no exp); saved,
        # so that changing it in place before the backward pass is an error, not a wrong gradient
        hfrom = (_fused_block(block, t_new) and pending is None and h_new is not None and h_new is not h
                 and h_new.dtype == torch.float32)
        ctx.save_for_backward(*((window, h_new) if hfrom else (window,)))
        ctx.block, ctx.h0, ctx.chunk_states, ctx.pending, ctx.t_new = block, None if hfrom else h0, chunk_states, \
            pending, t_new
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        window, *hfrom = ctx.saved_tensors
        block, pending, h0, t_new = ctx.block, ctx.pending, ctx.h0, ctx.t_new
        if pending is not None and pending.done:
            raise RuntimeError("the streamed Mamba state was already advanced (finish() was called, or this is a "
                               "second backward pass): the old state this backward pass needs is gone")
        weights = list(_pre_scan_weights(block))
        wants = [ctx.needs_input_grad[0]] + [w.requires_grad for w in weights]
        if _fused_block(block, t_new):  # the whole step (forward recomputed, backward) in one kernel
            d_window, grads = _block_step_bwd(block, window, h0, None if pending is None else pending.h, dout,
                                              wants[0], hfrom[0] if hfrom else None)
            acc = [g if (i > 4 or wants[i + 1]) else None for i, g in enumerate(grads)]
        else:
            d_window, acc = _sliced_backward(ctx, block, window, dout, wants)
        if pending is not None:
            pending.release()  # the new state is in place
        ctx.h0 = ctx.chunk_states = None
        cast = lambda g, p: None if g is None else g.to(p.dtype)  # noqa: E731
        params = weights + [block.dt_proj.bias, block.A_log, block.D, block.out_proj.weight]
        return (cast(d_window, window), None, None) + tuple(cast(g, p) for g, p in zip(acc, params))


def _sliced_backward(ctx, block, window: Tensor, dout: Tensor, wants: list):
    """:class:`_MambaStream`'s backward slice by slice of rows (:data:`_SLICE_BYTES`): the
    projections recomputed in torch, the scan's backward kernel, the projections' backward
    (written out for d_model = dt_rank = 1, else through autograd). Returns ``(d_window or None,
    the 9 parameters' gradients, None where not wanted)``."""
    pending, h0, t_new = ctx.pending, ctx.h0, ctx.t_new
    weights = list(_pre_scan_weights(block))
    scan_params = _scan_params(block)
    w_out = block.out_proj.weight.detach().float()
    acc = [None] * 9  # dw_in, dconv_w, dconv_b, dw_x, dw_dt, dbias, dA_log, dD, dw_out
    d_window = torch.zeros_like(window) if wants[0] else None
    n = block.d_state
    factored = _factored(block)
    for sl in _stream_slices(block, window.shape[0], t_new):
        if factored:  # the projections' backward written out (Mamba.stream_pre_scan_backward): no graph
            with torch.no_grad():
                outs = block.stream_pre_scan(window[sl], factored=True)
        else:
            with torch.enable_grad():
                wg = window[sl].detach().requires_grad_(wants[0])
                outs = block.stream_pre_scan(wg)  # u, z, delta, B, C
        u_, d_, A_, B_, C_, D_, z_, bias_, dfac, zfac = _stream_kernel_inputs(*outs, scan_params)
        dout_s = dout[sl].float()  # (rows, T, d_model)
        dy = torch.matmul(dout_s, w_out).transpose(1, 2).contiguous()  # (rows, d_inner, T): one GEMM
        if t_new == 1:
            states, hnew = (None if h0 is None else h0[sl]), (None if pending is None else pending.h[sl])
        elif ctx.chunk_states is not None:
            states, hnew = ctx.chunk_states[sl], None
        else:
            states, hnew = (None if h0 is None else _f32(h0[sl]).view(u_.shape[0], u_.shape[1], 1, n)), None
        du, ddelta, dA, dB, dC, dD, dz, dbias, _, y = _scan_backward(
            u_, d_, A_, B_, C_, D_, z_, bias_, states, True, dy, want_y=True, hnew=hnew, dfac=dfac, zfac=zfac)
        if factored:  # z = w_z ⊗ x: in_proj.weight[d_inner:, 0]; delta = w_dt ⊗ dlt: dt_proj.weight[:, 0]
            d_win, dw_u, dconv_w, dconv_b, dw_x = block.stream_pre_scan_backward(
                window[sl], du, dz[1], ddelta[1], dB.transpose(1, 2), dC.transpose(1, 2), want_window=wants[0])
            if d_win is not None:
                d_window[sl] = d_win
            dw_in = torch.cat([dw_u, dz[0]]).unsqueeze(1)
            for i, g in ((0, dw_in), (1, dconv_w.view_as(weights[1])), (2, dconv_b), (3, dw_x),
                         (4, ddelta[0].unsqueeze(1))):
                if weights[i].requires_grad:
                    acc[i] = g if acc[i] is None else acc[i] + g
        else:
            _graph_backward(wg, weights, wants, outs, (du, dz, ddelta, dB, dC), d_window, sl, acc)
        for i, g in ((5, dbias), (6, dA * A_), (7, dD),  # A = -exp(A_log): dA_log = dA·A
                     (8, torch.einsum("btm,bdt->md", dout_s, y))):
            acc[i] = g if acc[i] is None else acc[i] + g
    return d_window, acc


def mamba_stream(block, window: Tensor, h: Optional[Tensor], state_dtype: torch.dtype, in_place: bool = False,
                 state_buffer: Optional[Tensor] = None):
    """The ``"cpu"`` backend's ``mamba_stream`` op (see :func:`fsg.ssm.mamba_stream`): the step of
    :meth:`fsg.ssm.mamba.Mamba.stream` with the single-step kernels, the state read and written in
    ``state_dtype`` (float32, bfloat16 or float16; float32 arithmetic), only ``window`` kept for
    the backward pass, and with ``in_place`` a single copy of the state: the forward writes no new
    state, the backward kernel writes it over the old one after reading each row (``finish``
    does it instead if no backward pass comes). Without a graph to record (no grad, or nothing
    requiring grad) the step updates ``h`` in place at once. Forward and backward run over
    slices of rows (:data:`_SLICE_BYTES`), so no activation of the size of the layer exists.
    Returns ``(out, h_new, finish)``, or None where the kernels do not apply (not CPU, float64,
    unavailable, another state dtype, a non-contiguous state)."""
    params = list(block.parameters())
    if (any(t.device.type != "cpu" or t.dtype == torch.float64 for t in [window] + params) or not available()
            or state_dtype not in STATE_DTYPES):
        return None
    shape = (window.shape[0], block.d_inner, block.d_state)
    if h is not None and (h.device.type != "cpu" or h.dtype != state_dtype or not h.is_contiguous()
                          or tuple(h.shape) != shape):
        return None
    if in_place and h is not None:
        h_new = h
    elif (state_buffer is not None and state_buffer.dtype == state_dtype and state_buffer.is_contiguous()
          and tuple(state_buffer.shape) == shape and state_buffer.device.type == "cpu"
          and (h is None or state_buffer.data_ptr() != h.data_ptr())):
        h_new = state_buffer
    else:
        h_new = torch.empty(shape, dtype=state_dtype)
    t_new = window.shape[1] - (block.d_conv - 1)
    if torch.is_grad_enabled() and (window.requires_grad or any(p.requires_grad for p in params)):
        # a single step in place: the backward kernel writes the new state (pending until then)
        pending = (_lowmem.PendingAdvance(_advance, block, window.detach(), h,
                                          _pre_scan_weights(block) + _scan_params(block))
                   if (h_new is h and t_new == 1) else None)
        out = _MambaStream.apply(window, block, [h, h_new, pending], *_pre_scan_weights(block), block.dt_proj.bias,
                                 block.A_log, block.D, block.out_proj.weight)
        return out, h_new, pending
    out, _ = _stream_scan(block, window.detach(), h, h_new)
    return out, h_new, None


def mamba_low_memory(block, x: Tensor) -> Optional[Tensor]:
    """``block(x)`` through :class:`fsg.ssm.lowmem.MambaLowMemory` with the C kernels, or None
    where they do not apply (not CPU, float64, unavailable)."""
    tensors = [x] + list(block.parameters())
    if any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available():
        return None
    return _lowmem.mamba_low_memory(block, x, LOW_MEMORY_KERNELS)


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                         z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                         last_out: Optional[Tensor] = None):
    """Fused CPU selective scan; same signature and results as :func:`fsg.ssm.reference.selective_scan_ref`.

    ``last_out``: a float32 (batch, d_inner, d_state) buffer to write the last state into (reused
    across streaming steps instead of allocating — and page-faulting — a new one); it must not be
    referenced by anything still needed. Falls back to the reference for float64 inputs, non-CPU
    tensors, or when the kernel is not available (no compiler)."""
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    if (any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available()):
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  return_last_state=return_last_state, initial_state=initial_state)
    # the buffer travels inside a list: autograd must not treat it as an input
    y, last = _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), [last_out])
    return (y, last) if return_last_state else y


def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                        z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                        return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                        last_out: Optional[Tensor] = None, state_dtype: Optional[torch.dtype] = None):
    """The ``"cpu"`` backend's streaming step: :func:`selective_scan_fused` whose last state is
    stored as ``state_dtype`` (None: float32, as :func:`selective_scan_fused`; or bfloat16 /
    float16). A single step (L = 1) reads a 16-bit ``initial_state`` as stored, computes in
    float32 (``y`` from the unrounded new state) and writes the new state rounded to nearest
    even into ``last_out`` (if it is a free contiguous ``state_dtype`` buffer of the right shape)
    or a new tensor: no float32 copy of the state is made. A longer scan widens the initial state
    to float32 and rounds the last state at the end. Where the kernels do not apply (float64, not
    CPU, unavailable) the reference computes the same: the stored state widened to the compute
    dtype, the last state rounded to ``state_dtype``."""
    if state_dtype is None:
        return selective_scan_fused(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                    return_last_state=return_last_state, initial_state=initial_state, last_out=last_out)
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {', '.join(map(str, STATE_DTYPES))}, got {state_dtype}")
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    if (any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available()):
        y, last = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                     return_last_state=True, initial_state=initial_state)
        last = last.to(state_dtype)
        return (y, last) if return_last_state else y
    y, last = _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), [last_out],
                               state_dtype)
    return (y, last) if return_last_state else y


selective_scan_step.supports_state_dtype = True  # see fsg.ssm.selective_scan_step


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
        dx, dw, db = torch.empty_like(x_), torch.empty_like(w_), torch.empty(dim, dtype=torch.float32)
        if lib.fsg_conv_bwd(batch, dim, length, w_.shape[1], _p(x_), _p(w_), _p(b_ if ctx.has_bias else None),
                            _p(g), int(ctx.silu), _p(dx), _p(dw), _p(db), torch.get_num_threads()):
            raise MemoryError("fused causal conv backward: out of memory")
        return dx, dw, (db if ctx.has_bias else None), None


def causal_conv1d_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = False
                        ) -> Optional[Tensor]:
    """Causal depthwise conv (see :func:`fsg.ssm.reference.causal_conv1d`), followed by SiLU if ``silu``,
    with the compiled kernel (the backward recomputes the pre-activation from ``x``); None when
    the kernel does not apply (not CPU, float64, or unavailable)."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available():
        return None
    return _FusedCausalConv.apply(x, weight, bias, bool(silu))
