"""The Mamba block (Gu & Dao, 2023) in plain PyTorch.

The block maps ``x`` of shape ``(B, T, d_model)`` to the same shape.  With
``d_inner = expand * d_model``:

1. ``(u, z) = in_proj(x)``, a bias-free linear map ``d_model -> 2 * d_inner``.
2. ``u <- SiLU(causal_conv1d(u))``: a depthwise convolution over time with
   kernel ``d_conv`` and bias, left padded with ``d_conv - 1`` zeros so that
   position ``t`` only sees positions ``<= t``.
3. ``(delta, B_t, C_t) = x_proj(u)``, a bias-free map
   ``d_inner -> dt_rank + 2 * d_state``.
4. ``Delta = softplus(dt_proj(delta))`` with ``dt_proj: dt_rank -> d_inner``.
5. ``A = -exp(A_log)`` of shape ``(d_inner, d_state)`` and a skip ``D``.
6. The selective scan, for every channel ``d`` and state ``n``::

       h_t[d, n] = exp(Delta_t[d] * A[d, n]) * h_{t-1}[d, n]
                   + Delta_t[d] * B_t[n] * u_t[d]
       y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]

   with ``h_0 = 0`` (or a given initial state).
7. ``out = out_proj(y * SiLU(z))``, a bias-free map ``d_inner -> d_model``.

There is no normalisation and no residual connection around the block.

The scan (:func:`selective_scan`, with the signature and tensor layouts of
``mamba_ssm``'s ``selective_scan_fn``), the causal convolution, the low-memory
forward and the streaming step are dispatched through the backends of
:mod:`fsg.ssm` (``"auto"`` by default: the C kernels on the CPU, ``mamba_ssm``
or Triton on CUDA; :func:`fsg.ssm.set_backend` / :func:`fsg.ssm.use_backend`
choose another, :func:`fsg.ssm.register_backend` adds one).  The old
selection functions :func:`set_scan_impl`, :func:`use_scan_impl`,
:func:`get_scan_impl` and :func:`register_scan_impl` are deprecated aliases
(old names ``"ref"`` = ``"reference"``, ``"fused"`` = ``"cpu"``).  Parameter
names match ``mamba_ssm.Mamba`` so state dicts can be exchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fsg.ssm as _ssm
from fsg.ssm.backends import Backend, causal_conv1d, selective_scan, selective_scan_step
from fsg.ssm.reference import check_scan_shapes, compute_dtype, selective_scan_ref

__all__ = [
    "selective_scan_ref",
    "selective_scan",
    "register_scan_impl",
    "set_scan_impl",
    "get_scan_impl",
    "use_scan_impl",
    "causal_conv1d",
    "Mamba",
]

# old private names, kept for code that imported them
_compute_dtype = compute_dtype
_check_scan_shapes = check_scan_shapes


def _causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    return causal_conv1d(x, weight, bias, silu=silu)


# ---------------------------------------------------------------------------
# Deprecated selection API (aliases of fsg.ssm's backend selection)
# ---------------------------------------------------------------------------

ScanFn = Callable[..., object]
_OLD_TO_NEW = {"ref": "reference", "fused": "cpu"}
_NEW_TO_OLD = {v: k for k, v in _OLD_TO_NEW.items()}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"fsg.mamba.{old} is deprecated; use fsg.ssm.{new}", DeprecationWarning, stacklevel=3)


def register_scan_impl(name: str, fn: ScanFn) -> None:
    """Deprecated: :func:`fsg.ssm.register_backend`. Registers ``fn`` (the signature of
    :func:`selective_scan_ref`) as the scan of a backend ``name`` for any device; for an existing
    backend (``"ref"``/``"reference"``, ``"fused"``/``"cpu"``, ...) it replaces only its scan."""
    _deprecated("register_scan_impl", "register_backend")
    if not isinstance(name, str) or not name:
        raise ValueError(f"scan implementation name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"scan implementation {name!r} must be callable, got {type(fn).__name__}")
    name = _OLD_TO_NEW.get(name, name)
    if name in _ssm.list_backends():
        _ssm.register_backend(dataclasses.replace(_ssm.get_backend(name), selective_scan=fn))
    else:
        _ssm.register_backend(Backend(name, devices=None, selective_scan=fn))


def set_scan_impl(name: str) -> None:
    """Deprecated: :func:`fsg.ssm.set_backend` (``"ref"`` = ``"reference"``, ``"fused"`` = ``"cpu"``)."""
    _deprecated("set_scan_impl", "set_backend")
    new = _OLD_TO_NEW.get(name, name)
    if new != _ssm.AUTO and new not in _ssm.list_backends():
        known = ", ".join(repr(k) for k in sorted({_ssm.AUTO, *_OLD_TO_NEW, *_ssm.list_backends()}))
        raise ValueError(f"unknown scan implementation {name!r}; known: {known}")
    _ssm.set_backend(new)


def get_scan_impl() -> str:
    """Deprecated: :func:`fsg.ssm.current_backend`, with the old names ``"ref"`` and ``"fused"``."""
    current = _ssm.current_backend()
    return _NEW_TO_OLD.get(current, current)


@contextlib.contextmanager
def use_scan_impl(name: str) -> Iterator[None]:
    """Deprecated: :func:`fsg.ssm.use_backend` (old names accepted)."""
    previous = _ssm.current_backend()
    set_scan_impl(name)
    try:
        yield
    finally:
        _ssm.set_backend(previous)


# ---------------------------------------------------------------------------
# The Mamba block
# ---------------------------------------------------------------------------


class _Rank1Project(torch.autograd.Function):
    """``w ⊗ x``: (out,) × (B, 1, T) → (B, out, T). The backward reads the (B, out, T) gradient
    once per input as matrix-vector products, instead of materialising ``grad * x``."""

    @staticmethod
    def forward(ctx, w, x):  # type: ignore[override]
        ctx.save_for_backward(w, x)
        return w.view(1, -1, 1) * x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, x = ctx.saved_tensors
        dw = dx = None
        if ctx.needs_input_grad[0]:
            if grad.shape[2] == 1:  # one token per sequence (streaming): one GEMV, not B tiny ones
                dw = torch.matmul(x.reshape(1, -1), grad.reshape(grad.shape[0], -1)).t()  # (out, 1)
            else:
                dw = torch.matmul(grad, x.transpose(1, 2)).sum(0)  # (out, 1)
        if ctx.needs_input_grad[1]:
            dx = torch.matmul(w.t(), grad)  # (B, 1, T)
        return dw, dx


def _project(weight: Tensor, x: Tensor) -> Tensor:
    """``weight @ x`` for ``weight`` (out, in) and channel-first ``x`` (B, in, T). A rank-1
    product (``in == 1``: d_model = 1, dt_rank = 1) is a broadcast multiply, which writes the
    (B, out, T) result once instead of going through a copying batched matmul."""
    if weight.shape[1] == 1:
        return _Rank1Project.apply(weight, x)
    return torch.matmul(weight, x)


class _CopyLater:
    """``finish`` of an in-place :meth:`Mamba.stream` computed out of place: copies the new state
    over the old one (once; later calls do nothing)."""

    def __init__(self, h: Tensor, h_new: Tensor):
        self.h, self.h_new = h, h_new

    def __call__(self) -> None:
        if self.h_new is not None:
            self.h.copy_(self.h_new)
            self.h_new = None


def _check_pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Mamba(nn.Module):
    """Mamba block (Gu & Dao 2023): ``(B, T, d_model) -> (B, T, d_model)``.

    With ``d_inner = expand * d_model``::

        u, z  = in_proj(x)                              # d_model -> 2 d_inner, no bias
        u     = silu(causal_conv1d(u, conv1d.weight, conv1d.bias))
        dlt, Bt, Ct = x_proj(u)                         # d_inner -> dt_rank + 2 d_state, no bias
        Delta = softplus(dt_proj.weight @ dlt + dt_proj.bias)
        A     = -exp(A_log)                             # (d_inner, d_state)
        h_t   = exp(Delta_t A) * h_{t-1} + Delta_t Bt_t u_t
        y_t   = Ct_t . h_t + D * u_t
        out   = out_proj(y * silu(z))                   # d_inner -> d_model, no bias

    No normalisation, no residual.  ``dt_rank="auto"`` means
    ``ceil(d_model / 16)``.  ``dt_proj.weight ~ U(+-dt_rank^-0.5)``;
    ``dt_proj.bias = dt + log(-expm1(-dt))`` (the inverse softplus of ``dt``)
    with ``dt = exp(U(log dt_min, log dt_max)).clamp(min=dt_init_floor)``;
    ``A_log[d, :] = log(1..d_state)``; ``D = 1``.  Parameter names follow
    ``mamba_ssm.Mamba`` (``conv1d`` is an ``nn.Conv1d`` of weight shape
    ``(d_inner, 1, d_conv)``).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_pos_int("d_model", d_model)
        _check_pos_int("d_state", d_state)
        _check_pos_int("d_conv", d_conv)
        _check_pos_int("expand", expand)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        else:
            _check_pos_int("dt_rank", dt_rank)
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        if not dt_init_floor > 0:
            raise ValueError(f"dt_init_floor must be positive, got {dt_init_floor!r}")

        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False, **factory)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1, bias=True, **factory
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)

        # dt_proj init: weight uniform(+-dt_rank^-0.5); softplus(bias) log-uniform in [dt_min, dt_max].
        dt_init_std = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(
            torch.rand(d_inner, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real init: A[d, n] = -(n + 1).
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner, device=device, dtype=torch.float32))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **factory)

    def forward(self, x: Tensor, low_memory: bool = False, resets: Optional[Tensor] = None) -> Tensor:
        """``x``: ``(B, T, d_model)`` -> ``(B, T, d_model)``.

        ``low_memory=True`` keeps (almost) nothing of the block's activations for the backward
        pass (:func:`fsg.ssm.mamba_low_memory`): with the ``"cpu"`` backend only ``x`` and the
        scan's chunk-boundary states are kept and the backward recomputes the rest without
        re-running the scan's forward (:func:`fsg.ssm.cpu.mamba_low_memory`); with a backend
        without that operation the block is checkpointed (``torch.utils.checkpoint``:
        recomputed in the backward pass). Same values and gradients.

        ``resets`` (B, T) bool: sequences packed one after another in a row; the scan state
        restarts (``h_{t-1} = 0``) at each True token (see :func:`fsg.ssm.selective_scan`). The
        causal convolution is not reset: a packed sequence is independent of what precedes it
        when ``d_conv - 1`` zero tokens precede it (:func:`pack_sequences` lays them out). Runs on
        the backend's own kernels where :func:`fsg.ssm.supports_resets`, else on the reference scan.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        if resets is not None and (resets.dtype != torch.bool or tuple(resets.shape) != tuple(x.shape[:2])):
            raise ValueError(f"resets must be a bool tensor of shape (B, T) = {tuple(x.shape[:2])}, got "
                             f"{resets.dtype} {tuple(resets.shape)}")
        if low_memory and torch.is_grad_enabled():
            return _ssm.mamba_low_memory(self, x, resets=resets)
        return self.plain_forward(x, resets)

    def stream(self, x: Tensor, state: Optional[tuple] = None, state_buffer: Optional[Tensor] = None,
               state_dtype: Optional[torch.dtype] = None, low_memory: bool = False, in_place: bool = False):
        """Continue the block's recurrence by the tokens ``x`` (B, T_new, d_model).

        ``state`` = ``(x_hist, h)`` from the previous call (None to start): ``x_hist`` the last
        ``d_conv − 1`` input tokens (B, d_conv−1, d_model), ``h`` the scan state
        (B, d_inner, d_state). Returns ``(y, new_state)`` where ``y`` (B, T_new, d_model) equals
        the last ``T_new`` outputs of ``forward`` on the whole sequence seen so far. The causal
        convolution is evaluated on the window ``[x_hist, x]``; only the new positions enter the
        projections and the scan (from ``h``). Gradients flow into the new tokens' computation;
        ``state`` enters as a constant. ``state_buffer``: a free (B, d_inner, d_state) tensor of
        the state's dtype the backend may write the new scan state into (see ``last_out`` of
        :func:`fsg.ssm.selective_scan_step`).

        ``state_dtype`` (None: the given state's dtype, else float32 — the compute dtype): the
        dtype ``h`` is stored in, ``torch.bfloat16`` or ``torch.float16`` to halve it. The
        arithmetic stays float32: the old state is read as stored (a state of another dtype is
        first converted), ``y`` comes from the unrounded new state, and the new state is rounded
        to nearest even once per call (see :func:`fsg.ssm.selective_scan_step`).

        ``low_memory``: keep nothing of the step's activations for the backward pass but the
        window (the cheap projections are recomputed there; with the ``"cpu"`` backend, through
        :func:`fsg.ssm.mamba_stream`; other backends keep the activations).

        ``in_place``: keep a single copy of the scan state: the new state is written over the old
        ``h`` (``new_state[1]`` shares its memory) once the backward pass through this call no
        longer needs the old one — the ``"cpu"`` backend's low-memory step writes it from its backward kernel;
        elsewhere it is copied in later. Returns ``(y, new_state, finish)``: ``finish()`` (None
        when nothing is pending, e.g. the first call) completes the update if the backward pass
        has not (idempotent); call it after the backward pass and before the state is used again.
        Finishing before the backward pass makes that backward pass fail.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        k = self.d_conv - 1
        if state is None:
            x_hist = x.new_zeros(x.shape[0], k, self.d_model)
            h = None
        else:
            x_hist, h = (s.detach() for s in state)
        window = torch.cat([x_hist, x], dim=1)  # zeros before the stream start = the causal padding
        new_hist = window[:, window.shape[1] - k:].detach()
        param_dtype = compute_dtype(self.A_log.dtype)
        if (state_dtype is None and not low_memory and not in_place
                and (h is None or h.dtype not in (torch.bfloat16, torch.float16))):
            u, z, delta, Bt, Ct = self.stream_pre_scan(window)
            y, h_new = selective_scan_step(
                u, delta, -torch.exp(self.A_log.to(param_dtype)), Bt, Ct, D=self.D.to(param_dtype), z=z,
                delta_bias=self.dt_proj.bias.to(param_dtype), delta_softplus=True, return_last_state=True,
                initial_state=h, last_out=state_buffer,
            )
            out = torch.matmul(y.to(x.dtype).transpose(1, 2), self.out_proj.weight.t())  # (B, T_new, d_model)
            return out, (new_hist, h_new.detach())
        if state_dtype is None:
            state_dtype = h.dtype if h is not None else param_dtype
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float16, param_dtype):
            raise ValueError(f"state_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {state_dtype}")
        if h is not None and h.dtype != state_dtype:
            h = h.to(state_dtype)  # e.g. a float32 checkpoint continued in 16 bits: converted once
        finish = None
        res = _ssm.mamba_stream(self, window, h, state_dtype, in_place=in_place, state_buffer=state_buffer) \
            if low_memory else None
        if res is not None:
            out, h_new, finish = res
        else:
            u, z, delta, Bt, Ct = self.stream_pre_scan(window)
            y, h_new = selective_scan_step(
                u, delta, -torch.exp(self.A_log.to(param_dtype)), Bt, Ct, D=self.D.to(param_dtype), z=z,
                delta_bias=self.dt_proj.bias.to(param_dtype), delta_softplus=True, return_last_state=True,
                initial_state=h, last_out=None if in_place else state_buffer, state_dtype=state_dtype,
            )
            out = torch.matmul(y.to(x.dtype).transpose(1, 2), self.out_proj.weight.t())
            h_new = h_new.detach()
            if in_place and h is not None:  # copied over the old state once the backward pass is done
                finish, h_new = _CopyLater(h, h_new), h
        new_state = (new_hist, h_new)
        return (out, new_state, finish) if in_place else (out, new_state)

    def stream_pre_scan(self, window: Tensor, weights: Optional[tuple] = None, factored: bool = False):
        """Steps 1-4 of :meth:`stream` for the new positions of ``window`` = ``[x_hist, x]``
        (B, d_conv − 1 + T_new, d_model), channel-first: ``(u, z, delta, B, C)``, each
        (B, ·, T_new) (``delta`` without the ``dt_proj`` bias). ``weights``: ``(in_proj.weight,
        conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight)`` to use instead of the
        block's own. ``factored`` (d_model = dt_rank = 1): ``z`` and ``delta`` are returned as
        their rank-1 factors ``(w (d_inner,), x (B, T_new))``, ``z = w_z ⊗ x`` and
        ``delta = w_dt ⊗ dlt``, not multiplied out."""
        batch = window.shape[0]
        d, r, n = self.d_inner, self.dt_rank, self.d_state
        k = self.d_conv - 1
        x = window[:, k:]
        w_in, conv_w, conv_b, w_x, w_dt = weights or (self.in_proj.weight, self.conv1d.weight, self.conv1d.bias,
                                                      self.x_proj.weight, self.dt_proj.weight)
        conv_w = conv_w.squeeze(1)  # (d_inner, d_conv)
        if self.d_model == 1:
            # d_model = 1: the conv output at new position t is b + w_u ⊙ (W_conv @ window_t), a
            # small GEMM over the sliding windows — no (B, d_inner, window) tensor
            windows = window.reshape(batch, -1).unfold(1, self.d_conv, 1)  # (B, t_new, d_conv)
            s = torch.matmul(windows, conv_w.t())  # (B, t_new, d_inner)
            u = F.silu(conv_b + w_in[:d, 0] * s).transpose(1, 2).contiguous()  # (B, d_inner, t_new)
        else:
            u = _project(w_in[:d], window.transpose(1, 2))
            u = causal_conv1d(u, conv_w, conv_b, silu=True)[..., k:]
        # (B, T_new, d_inner) @ (d_inner, r + 2n): one GEMM over all B·T_new tokens (a batched
        # matmul of the weight with (B, d_inner, T_new) would be B tiny GEMVs for T_new = 1)
        x_dbl = torch.matmul(u.transpose(1, 2), w_x.t()).transpose(1, 2)
        dlt, Bt, Ct = torch.split(x_dbl, [r, n, n], dim=1)
        if factored:
            if self.d_model != 1 or r != 1:
                raise ValueError("factored=True needs d_model = dt_rank = 1")
            return u, (w_in[d:, 0], x[..., 0]), (w_dt[:, 0], dlt[:, 0]), Bt, Ct
        z = _project(w_in[d:], x.transpose(1, 2))
        delta = _project(w_dt, dlt)
        return u, z, delta, Bt, Ct

    def stream_pre_scan_backward(self, window: Tensor, du: Tensor, dzx: Tensor, ddlt: Tensor, dB: Tensor,
                                 dC: Tensor, weights: Optional[tuple] = None, want_window: bool = True):
        """The vector-Jacobian product of :meth:`stream_pre_scan` with ``factored=True``
        (d_model = dt_rank = 1), written out — no autograd graph, one pass of recomputation.

        With ``s = W_conv · window_t`` (the sliding windows of length ``d_conv``), the
        pre-activation ``a = b_conv + w_u ⊙ s``, ``u = silu(a)`` and ``[dlt, B, C] = W_x u``:

        * ``g = [ddlt, dB, dC]`` (per token, ``1 + 2·d_state``): ``dW_x = Σ g uᵀ``;
        * ``ū = du + W_xᵀ g``, ``ā = ū ⊙ silu'(a)``, ``silu'(a) = σ(a)(1 + a(1 − σ(a)))``;
        * ``db_conv = Σ ā``, ``dw_u = Σ ā ⊙ s`` (``in_proj.weight[:d_inner, 0]``),
          ``dW_conv = Σ (w_u ⊙ ā) windowᵀ``;
        * ``d window`` = the overlap-add of ``W_convᵀ (w_u ⊙ ā)`` over the windows, plus ``dzx``
          at the new positions (``z``'s factor ``x`` is the input itself).

        ``du`` (B, d_inner, T), ``dzx`` / ``ddlt`` (B, T), ``dB`` / ``dC`` (B, d_state, T): the
        gradients of the five outputs (``z`` and ``delta`` through their ``x`` factors; their
        ``w`` factors' gradients are the caller's). Returns ``(d_window or None, dw_u (d_inner,),
        dconv_w (d_inner, d_conv), dconv_b (d_inner,), dx_proj_w (1 + 2·d_state, d_inner))``,
        float32 (float64 for a float64 window).
        """
        if self.d_model != 1 or self.dt_rank != 1:
            raise ValueError("stream_pre_scan_backward needs d_model = dt_rank = 1")
        dtype = torch.float64 if window.dtype == torch.float64 else torch.float32
        f32 = lambda t: t.detach().to(dtype)  # noqa: E731
        batch, d, k = window.shape[0], self.d_inner, self.d_conv
        w_in, conv_w, conv_b, w_x, _ = weights or (self.in_proj.weight, self.conv1d.weight, self.conv1d.bias,
                                                   self.x_proj.weight, self.dt_proj.weight)
        w_u, conv_w, conv_b, w_x = f32(w_in[:d, 0]), f32(conv_w).reshape(d, k), f32(conv_b), f32(w_x)
        windows = f32(window).reshape(batch, -1).unfold(1, k, 1)  # (B, T, d_conv)
        t_new = windows.shape[1]
        s = torch.matmul(windows, conv_w.t())  # (B, T, d_inner)
        a = torch.addcmul(conv_b, w_u, s)
        sig = torch.sigmoid(a)
        u = a * sig
        g = torch.cat([f32(ddlt).reshape(batch, t_new, 1), f32(dB).transpose(1, 2), f32(dC).transpose(1, 2)], dim=2)
        tokens = batch * t_new
        dw_x = torch.matmul(g.reshape(tokens, -1).t(), u.reshape(tokens, d))
        ubar = torch.matmul(g, w_x).add_(f32(du).transpose(1, 2))  # (B, T, d_inner)
        # silu'(a) = σ(1 + a(1 − σ)), folded into ubar in place: ā
        abar = ubar.mul_(sig.mul_(torch.sub(1.0, sig).mul_(a).add_(1.0)))
        dconv_b = abar.reshape(tokens, d).sum(0)
        dw_u = torch.mul(abar, s).reshape(tokens, d).sum(0)
        ds = abar.mul_(w_u)
        dconv_w = torch.matmul(ds.reshape(tokens, d).t(), windows.reshape(tokens, k))
        d_window = None
        if want_window:
            dwin = torch.matmul(ds, conv_w)  # (B, T, d_conv)
            d_window = torch.zeros(batch, t_new + k - 1, dtype=dtype)
            for j in range(k):
                d_window[:, j:j + t_new] += dwin[..., j]
            d_window[:, k - 1:] += f32(dzx).reshape(batch, t_new)
            d_window = d_window.unsqueeze(-1)
        return d_window, dw_u, dconv_w, dconv_b, dw_x

    def pre_scan_parts(self, x: Tensor):
        """Steps 1-3, channel-first: ``(u, dlt, B, C)``; ``u`` after the conv and SiLU, ``dlt``
        the dt_rank-dimensional input of ``dt_proj``."""
        # Everything runs channel-first, (B, channels, T), so that no large tensor is transposed:
        # each projection is a matmul of the weight with a (B, in, T) tensor.
        d, r, n = self.d_inner, self.dt_rank, self.d_state
        xt = x.transpose(1, 2)  # (B, d_model, T)
        u = _project(self.in_proj.weight[:d], xt)  # (B, d_inner, T)
        u = causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, silu=True)
        x_dbl = torch.matmul(self.x_proj.weight, u)  # (B, dt_rank + 2 d_state, T)
        dlt, Bt, Ct = torch.split(x_dbl, [r, n, n], dim=1)
        return u, dlt, Bt, Ct

    def pre_scan(self, x: Tensor):
        """Steps 1-4, channel-first: ``(u, z, delta, B, C)`` for the scan (``delta`` without the
        ``dt_proj`` bias, which the scan adds before its softplus)."""
        u, dlt, Bt, Ct = self.pre_scan_parts(x)
        z = _project(self.in_proj.weight[self.d_inner:], x.transpose(1, 2))
        delta = _project(self.dt_proj.weight, dlt)  # (B, d_inner, T)
        return u, z, delta, Bt, Ct

    def plain_forward(self, x: Tensor, resets: Optional[Tensor] = None) -> Tensor:
        """The block on ``x`` (B, T, d_model) with autograd keeping every activation (what
        ``forward`` runs without ``low_memory``, and what a checkpointed block recomputes);
        ``resets``: see :meth:`forward`."""
        u, z, delta, Bt, Ct = self.pre_scan(x)
        param_dtype = compute_dtype(self.A_log.dtype)
        A = -torch.exp(self.A_log.to(param_dtype))
        y = selective_scan(
            u,
            delta,
            A,
            Bt,
            Ct,
            D=self.D.to(param_dtype),
            z=z,
            delta_bias=self.dt_proj.bias.to(param_dtype),
            delta_softplus=True,
            **({} if resets is None else {"resets": resets}),
        )  # (B, d_inner, T), already multiplied by silu(z)
        return torch.matmul(self.out_proj.weight, y.to(x.dtype)).transpose(1, 2)

    # old private names
    _pre_scan_parts = pre_scan_parts
    _pre_scan = pre_scan
    _forward = plain_forward

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"d_conv={self.d_conv}, dt_rank={self.dt_rank}"
        )
