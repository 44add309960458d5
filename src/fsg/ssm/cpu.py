"""The ``"cpu"`` backend of :mod:`fsg.ssm`: fused, memory-bounded selective scan, causal conv and
low-memory Mamba block for the CPU (compiled C, loaded with ctypes).

(Formerly ``fsg.scan_cpu``; that name is still importable and is this very module.)

:func:`selective_scan_fused` has the signature and semantics of
:func:`fsg.ssm.reference.selective_scan_ref`. The kernel (``csrc/selective_scan.c``) scans every
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

from .reference import check_scan_shapes, selective_scan_ref

__all__ = ["selective_scan_fused", "causal_conv1d_fused", "mamba_low_memory", "available", "load_library", "CHUNK", "build_error"]

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
            if lib.fsg_scan_version() != 10:
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
        lib.fsg_scan_step_fwd.argtypes = [i64] * 3 + [ptr] * 8 + [cint] + [ptr] * 3 + [cint]
        lib.fsg_scan_step_fwd.restype = cint
        lib.fsg_scan_step_bwd.argtypes = [i64] * 3 + [ptr] * 8 + [cint] + [ptr] * 3 + [ptr] * 10 + [cint]
        lib.fsg_scan_step_bwd.restype = cint
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


def _scan_forward(u_, d_, A_, B_, C_, D_, z_, bias_, h0_, softplus: bool, dfac=None, zfac=None, last_out=None):
    """Run the forward kernel on float32 contiguous inputs (``B_``, ``C_`` as (batch, L, n)).
    ``dfac`` / ``zfac``: ``(w (d_inner,), x (batch, L))`` giving ``delta`` / ``z`` as the rank-1
    product ``w[d]·x[b, t]`` instead of ``d_`` / ``z_`` (which are then None).
    Returns ``(y, states, last)``."""
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
    ok_out = (last_out is not None and last_out.dtype == torch.float32 and last_out.is_contiguous()
              and tuple(last_out.shape) == (batch, dim, n) and last_out.device.type == "cpu")
    last = last_out if ok_out else torch.empty(batch, dim, n, dtype=torch.float32)
    if length == 1 and dfac is None and zfac is None:  # one step of many sequences: streaming
        if lib.fsg_scan_step_fwd(batch, dim, n, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_), _p(z_), _p(bias_),
                                 int(softplus), _p(h0_), _p(out), _p(last), torch.get_num_threads()):
            raise MemoryError("fused selective scan step: out of memory")
    elif length > 0:
        if lib.fsg_scan_fwd(batch, dim, length, n, CHUNK, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_),
                            _p(z_), _p(bias_), int(softplus), _p(h0_), _p(out), None if alias else _p(states),
                            _p(last), _p(dfw), _p(dfx), _p(zfw), _p(zfx), torch.get_num_threads()):
            raise MemoryError("fused selective scan forward: out of memory for its work buffers")
    else:
        last = h0_.clone() if h0_ is not None else torch.zeros(batch, dim, n)
    return out, states, last


def _scan_backward(u_, d_, A_, B_, C_, D_, z_, bias_, states, softplus: bool, dout, dlast=None,
                   want_h0: bool = False, want_y: bool = False, dfac=None, zfac=None):
    """Run the backward kernel. Returns ``(du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, y)`` with
    ``dB``, ``dC`` as (batch, L, n); ``dz``/``dh0``/``y`` None unless applicable/asked for. With
    factored ``dfac``/``zfac`` (see :func:`_scan_forward`), ``ddelta``/``dz`` are the pairs
    ``(dw, dx)`` of gradients of the factors."""
    lib = load_library()
    dfw, dfx = dfac if dfac is not None else (None, None)
    zfw, zfx = zfac if zfac is not None else (None, None)
    batch, dim, length = u_.shape
    n = A_.shape[1]
    dout_ = dout.to(torch.float32).contiguous()
    dlast_ = None if dlast is None else dlast.to(torch.float32).contiguous()
    du = torch.empty_like(u_)
    ddelta = torch.empty_like(d_) if d_ is not None else None
    ddw = torch.zeros(dim) if dfx is not None else None
    ddx = torch.zeros(batch, length) if dfx is not None else None
    dzw = torch.zeros(dim) if zfx is not None else None
    dzx = torch.zeros(batch, length) if zfx is not None else None
    dA = torch.zeros_like(A_)
    dB = torch.zeros(batch, length, n)
    dC = torch.zeros(batch, length, n)
    dD = torch.zeros(dim)
    dz = torch.empty_like(u_) if z_ is not None else None
    dbias = torch.zeros(dim)
    dh0 = torch.zeros(batch, dim, n) if want_h0 else None
    y = torch.empty_like(u_) if want_y else None
    if length == 1 and dfx is None and zfx is None:  # one step (streaming); `states` is h0 or None
        rc = lib.fsg_scan_step_bwd(batch, dim, n, _p(u_), _p(d_), _p(A_), _p(B_), _p(C_), _p(D_), _p(z_), _p(bias_),
                                   int(softplus), _p(states), _p(dout_), _p(dlast_), _p(du), _p(ddelta), _p(dA),
                                   _p(dB), _p(dC), _p(dD), _p(dz), _p(dbias), _p(dh0), _p(y), torch.get_num_threads())
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


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, last_out):  # type: ignore[override]
        u_, d_, A_ = _f32(u), _f32(delta), _f32(A)
        B_ = B.detach().to(torch.float32).transpose(1, 2).contiguous()  # (batch, L, n)
        C_ = C.detach().to(torch.float32).transpose(1, 2).contiguous()
        D_, z_, bias_, h0_ = _f32(D), _f32(z), _f32(delta_bias), _f32(initial_state)
        out, states, last = _scan_forward(u_, d_, A_, B_, C_, D_, z_, bias_, h0_, softplus, last_out=last_out[0])
        ctx.set_materialize_grads(False)  # an unused last state (streaming) gets no zero-filled gradient
        ctx.save_for_backward(u_, d_, A_, B_, C_, D_, z_, bias_, states)
        ctx.softplus = softplus
        ctx.flags = (D is not None, z is not None, delta_bias is not None, initial_state is not None)
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):  # type: ignore[override]
        u_, d_, A_, B_, C_, D_, z_, bias_, states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u_)
        has_D, has_z, has_bias, has_h0 = ctx.flags
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, _ = _scan_backward(
            u_, d_, A_, B_, C_, D_, z_, bias_, states, ctx.softplus, dout, dlast,
            want_h0=has_h0 and ctx.needs_input_grad[8])
        return (du, ddelta, dA, dB.transpose(1, 2), dC.transpose(1, 2), dD if has_D else None, dz,
                dbias if has_bias else None, dh0, None, None)


class _MambaLowMemory(torch.autograd.Function):
    """A whole Mamba block whose backward recomputes everything but the scan's chunk states.

    Forward (no graph): projections, conv, scan, output projection; saved: the block input
    ``x`` and the scan's chunk-boundary states (``L/CHUNK × d_inner × d_state``). Backward:
    recompute the cheap pre-scan part with a graph, run the scan backward (which recomputes the
    states chunk by chunk and, on the way, the scan output ``y`` needed for ``out_proj``'s
    gradient), then back-propagate through the recomputed pre-scan graph. Compared with
    checkpointing the block, the scan's forward runs once instead of twice.
    """

    @staticmethod
    def forward(ctx, x, block, w_in, conv_w, conv_b, w_x, w_dt, b_dt, A_log, D, w_out):  # type: ignore[override]
        # d_model = dt_rank = 1: z = w_z ⊗ x and delta = w_dt ⊗ dlt are rank-1; the kernels take the
        # factors, so neither (B, d_inner, T) tensor (nor its gradient) is ever written
        factored = block.d_model == 1 and block.dt_rank == 1
        with torch.no_grad():
            A = -torch.exp(A_log.float())
            if factored:
                u, dlt, Bt, Ct = block.pre_scan_parts(x)
                z_ = delta_ = None
                dfac, zfac = _factors(block, x, dlt)
            else:
                u, z, delta, Bt, Ct = block.pre_scan(x)
                z_, delta_, dfac, zfac = _f32(z), _f32(delta), None, None
            B_ = Bt.float().transpose(1, 2).contiguous()
            C_ = Ct.float().transpose(1, 2).contiguous()
            y, states, _ = _scan_forward(_f32(u), delta_, A.contiguous(), B_, C_, _f32(D), z_, _f32(b_dt), None,
                                         True, dfac=dfac, zfac=zfac)
            out = torch.matmul(w_out.to(y.dtype), y).to(x.dtype).transpose(1, 2)
        ctx.save_for_backward(x, states)
        ctx.block, ctx.factored = block, factored
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x, states = ctx.saved_tensors
        block = ctx.block
        d = block.d_inner
        pre_params = [block.in_proj.weight, block.conv1d.weight, block.conv1d.bias, block.x_proj.weight]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            if ctx.factored:
                u, dlt, Bt, Ct = block.pre_scan_parts(xg)
            else:
                u, z, delta, Bt, Ct = block.pre_scan(xg)
        A = -torch.exp(block.A_log.detach().float())
        w_out = block.out_proj.weight.detach().float()
        dout_t = dout.transpose(1, 2).float()  # (B, d_model, T)
        dy = torch.matmul(w_out.t(), dout_t)  # (B, d_inner, T)
        B_ = Bt.detach().float().transpose(1, 2).contiguous()
        C_ = Ct.detach().float().transpose(1, 2).contiguous()
        common = dict(want_y=True)
        if ctx.factored:
            dfac, zfac = _factors(block, x, dlt.detach())
            du, (ddw, ddx), dA, dB, dC, dD, (dzw, dzx), dbias, _, y = _scan_backward(
                _f32(u), None, A.contiguous(), B_, C_, _f32(block.D), None, _f32(block.dt_proj.bias), states, True,
                dy, dfac=dfac, zfac=zfac, **common)
            outs, grads_out = [u, dlt, Bt, Ct], [du, ddx.view_as(dlt), dB.transpose(1, 2), dC.transpose(1, 2)]
        else:
            du, ddelta, dA, dB, dC, dD, dz, dbias, _, y = _scan_backward(
                _f32(u), _f32(delta), A.contiguous(), B_, C_, _f32(block.D), _f32(z), _f32(block.dt_proj.bias),
                states, True, dy, **common)
            outs, grads_out = [u, z, delta, Bt, Ct], [du, dz, ddelta, dB.transpose(1, 2), dC.transpose(1, 2)]
        inputs = [xg] + pre_params + ([] if ctx.factored else [block.dt_proj.weight])
        grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
        dx, dw_in, dconv_w, dconv_b, dw_x = grads[:5]
        if ctx.factored:
            dx = dx + dzx.view_as(dx)  # z = w_z ⊗ x
            dw_in = dw_in.clone()
            dw_in[d:, 0] += dzw
            dw_dt = ddw.view_as(block.dt_proj.weight)
        else:
            dw_dt = grads[5]
        d_wout = torch.einsum("bmt,bdt->md", dout_t, y)
        d_alog = dA * A  # A = -exp(A_log)
        cast = lambda g, p: None if g is None else g.to(p.dtype)
        return (cast(dx, x), None, cast(dw_in, block.in_proj.weight), cast(dconv_w, block.conv1d.weight),
                cast(dconv_b, block.conv1d.bias), cast(dw_x, block.x_proj.weight), cast(dw_dt, block.dt_proj.weight),
                cast(dbias, block.dt_proj.bias), cast(d_alog, block.A_log), cast(dD, block.D),
                cast(d_wout, block.out_proj.weight))


def _factors(block, x: Tensor, dlt: Tensor):
    """The rank-1 factors ``(w_dt, dlt)`` of delta and ``(w_z, x)`` of z (d_model = dt_rank = 1)."""
    batch, length = x.shape[0], x.shape[1]
    d = block.d_inner
    dfac = (block.dt_proj.weight.detach()[:, 0].float().contiguous(), dlt.detach().float().reshape(batch, length).contiguous())
    zfac = (block.in_proj.weight.detach()[d:, 0].float().contiguous(), x.detach().float().reshape(batch, length).contiguous())
    return dfac, zfac


def mamba_low_memory(block, x: Tensor) -> Optional[Tensor]:
    """``block(x)`` through :class:`_MambaLowMemory`, or None where the fused kernels do not
    apply (not CPU, float64, unavailable)."""
    tensors = [x] + list(block.parameters())
    if any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available():
        return None
    return _MambaLowMemory.apply(x, block, block.in_proj.weight, block.conv1d.weight, block.conv1d.bias,
                                 block.x_proj.weight, block.dt_proj.weight, block.dt_proj.bias, block.A_log, block.D,
                                 block.out_proj.weight)


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
    """Causal depthwise conv (see :func:`fsg.ssm.reference.causal_conv1d`), followed by SiLU if ``silu``,
    with the compiled kernel (the backward recomputes the pre-activation from ``x``); None when
    the kernel does not apply (not CPU, float64, or unavailable)."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors) or not available():
        return None
    return _FusedCausalConv.apply(x, weight, bias, bool(silu))
