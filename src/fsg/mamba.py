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

The scan is reached through :func:`selective_scan`, a dispatcher with the
signature and tensor layouts of ``mamba_ssm``'s ``selective_scan_fn``.  On
CUDA it uses ``mamba_ssm``'s kernel when that package is importable;
otherwise it calls the selected CPU implementation: ``"auto"`` (default: the
fused, memory-bounded compiled kernel of :mod:`fsg.scan_cpu` when it can be
built here, else the reference), ``"fused"`` (that kernel; it falls back to
the reference itself for float64 inputs or without a compiler), ``"ref"``
(:func:`selective_scan_ref`), or another one registered with
:func:`register_scan_impl`, selected with :func:`set_scan_impl` or
:func:`use_scan_impl`.  Parameter names match ``mamba_ssm.Mamba`` so state
dicts can be exchanged.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

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


# ---------------------------------------------------------------------------
# Reference selective scan
# ---------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, d_inner, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (d_inner={dim}, d_state), got {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, dstate, length):
            raise ValueError(
                f"{name} must have shape (batch, d_state, L) = {(batch, dstate, length)}, got {tuple(t.shape)}"
            )
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must have shape (d_inner,) = {(dim,)}, got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must have shape (d_inner,) = {(dim,)}, got {tuple(delta_bias.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, dstate):
        raise ValueError(
            f"initial_state must have shape (batch, d_inner, d_state) = {(batch, dim, dstate)}, "
            f"got {tuple(initial_state.shape)}"
        )


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
):
    """Reference selective scan, plain PyTorch, differentiable by autograd.

    Shapes (``mamba_ssm`` layout): ``u, delta, z``: ``(batch, d_inner, L)``;
    ``A``: ``(d_inner, d_state)``; ``B, C``: ``(batch, d_state, L)``;
    ``D, delta_bias``: ``(d_inner,)``; ``initial_state``:
    ``(batch, d_inner, d_state)``.

    With ``delta <- delta + delta_bias`` and then ``delta <- softplus(delta)``
    when requested, it computes, for every batch ``b``, channel ``d``,
    state ``n``::

        h_t[b,d,n] = exp(delta[b,d,t] * A[d,n]) * h_{t-1}[b,d,n]
                     + delta[b,d,t] * B[b,n,t] * u[b,d,t]
        y[b,d,t]   = sum_n C[b,n,t] * h_t[b,d,n]  (+ D[d] * u[b,d,t])
        y          <- y * silu(z)                 (if z is given)

    with ``h_{-1} = initial_state`` (zeros if None).  Returns ``y`` in the
    dtype of ``u`` and, if ``return_last_state``, also the final state
    ``h_{L-1}`` of shape ``(batch, d_inner, d_state)`` (in the compute dtype).

    Computation happens in float32 (half/bfloat16 are upcast; float64 stays
    float64).  The decay and input terms are built for all time steps at
    once; only the recurrence itself is a Python loop over time.
    """
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    ct = _compute_dtype(dtype_in)
    batch, dim, length = u.shape
    dstate = A.shape[1]

    u = u.to(ct)
    delta = delta.to(ct)
    A = A.to(ct)
    B = B.to(ct)
    C = C.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    # Time-major (L, batch, d_inner, d_state) so each step reads a contiguous slice.
    delta_t = delta.permute(2, 0, 1)  # (L, b, d)
    deltaA = torch.exp(delta_t[..., None] * A)  # (L, b, d, n)
    deltaB_u = (delta_t * u.permute(2, 0, 1))[..., None] * B.permute(2, 0, 1)[:, :, None, :]  # (L, b, d, n)

    if initial_state is None:
        h = u.new_zeros(batch, dim, dstate)
    else:
        h = initial_state.to(ct)

    hs = []
    for dA_t, dBu_t in zip(deltaA.unbind(0), deltaB_u.unbind(0)):
        h = dA_t * h + dBu_t
        hs.append(h)

    if length > 0:
        H = torch.stack(hs, dim=0)  # (L, b, d, n)
        y = torch.einsum("lbdn,bnl->bdl", H, C)
    else:
        y = u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------

ScanFn = Callable[..., object]

def _selective_scan_fused(*args, **kwargs):
    from .scan_cpu import selective_scan_fused

    return selective_scan_fused(*args, **kwargs)


def _selective_scan_auto(*args, **kwargs):
    """The fused CPU kernel when it can be built here, else the reference."""
    from . import scan_cpu

    fn = scan_cpu.selective_scan_fused if scan_cpu.available() else selective_scan_ref
    return fn(*args, **kwargs)


_SCAN_IMPLS: Dict[str, ScanFn] = {
    "ref": selective_scan_ref,
    "fused": _selective_scan_fused,
    "auto": _selective_scan_auto,
}
_current_impl: str = "auto"

_CUDA_FN_UNSET = object()
_cuda_selective_scan_fn = _CUDA_FN_UNSET


def _get_cuda_scan_fn():
    """mamba_ssm's CUDA ``selective_scan_fn`` or None; imported lazily once."""
    global _cuda_selective_scan_fn
    if _cuda_selective_scan_fn is _CUDA_FN_UNSET:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception:  # not installed, or built against another CUDA/torch
            selective_scan_fn = None
        _cuda_selective_scan_fn = selective_scan_fn
    return _cuda_selective_scan_fn


def register_scan_impl(name: str, fn: ScanFn) -> None:
    """Register a CPU scan ``fn`` (same signature as :func:`selective_scan_ref`) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"scan implementation name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"scan implementation {name!r} must be callable, got {type(fn).__name__}")
    _SCAN_IMPLS[name] = fn


def set_scan_impl(name: str) -> None:
    """Make the registered implementation ``name`` the one :func:`selective_scan` calls."""
    global _current_impl
    if name not in _SCAN_IMPLS:
        known = ", ".join(repr(k) for k in sorted(_SCAN_IMPLS))
        raise ValueError(f"unknown scan implementation {name!r}; known: {known}")
    _current_impl = name


def get_scan_impl() -> str:
    """Name of the currently selected CPU scan implementation."""
    return _current_impl


@contextlib.contextmanager
def use_scan_impl(name: str) -> Iterator[None]:
    """Context manager selecting scan implementation ``name``, restoring the previous one on exit."""
    previous = get_scan_impl()
    set_scan_impl(name)
    try:
        yield
    finally:
        set_scan_impl(previous)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
):
    """Selective scan dispatcher; same signature and semantics as :func:`selective_scan_ref`.

    Uses ``mamba_ssm``'s CUDA ``selective_scan_fn`` when the inputs are on
    CUDA, it is importable, the dtypes are ones it supports and no
    ``initial_state`` is given; otherwise the registered implementation
    selected by :func:`set_scan_impl` (default ``"auto"``).
    """
    if (
        u.is_cuda
        and initial_state is None
        and u.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and A.dtype == torch.float32
    ):
        fn = _get_cuda_scan_fn()
        if fn is not None:
            return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    impl = _SCAN_IMPLS[_current_impl]
    return impl(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
        initial_state=initial_state,
    )


# ---------------------------------------------------------------------------
# Causal depthwise convolution
# ---------------------------------------------------------------------------


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Causal depthwise 1-D convolution over the last axis.

    ``x``: ``(batch, channels, L)``; ``weight``: ``(channels, d_conv)``;
    ``bias``: ``(channels,)`` or None.  Returns ``(batch, channels, L)`` with::

        out[b, c, t] = bias[c] + sum_{k=0}^{d_conv-1} weight[c, k] * x[b, c, t - (d_conv-1) + k]

    where ``x`` at negative time indices is zero.  Works for any
    ``d_conv >= 1``, including ``d_conv > L``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, channels, L), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(
            f"weight must have shape (channels={x.shape[1]}, d_conv>=1), got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must have shape (channels,) = {(x.shape[1],)}, got {tuple(bias.shape)}")
    return _causal_conv1d(x, weight, bias, silu=False)


def _causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """``causal_conv1d``, then SiLU if ``silu``; the compiled kernel where it applies."""
    if _current_impl != "ref":
        from .scan_cpu import causal_conv1d_fused

        out = causal_conv1d_fused(x, weight, bias, silu=silu)
        if out is not None:
            return out
    channels, d_conv = weight.shape
    out = F.conv1d(F.pad(x, (d_conv - 1, 0)), weight.unsqueeze(1), bias, groups=channels)
    return F.silu(out) if silu else out


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

    def forward(self, x: Tensor, low_memory: bool = False) -> Tensor:
        """``x``: ``(B, T, d_model)`` -> ``(B, T, d_model)``.

        ``low_memory=True`` keeps (almost) nothing of the block's activations for the backward
        pass: with the fused CPU kernels only ``x`` and the scan's chunk-boundary states are
        kept and the backward recomputes the rest without re-running the scan's forward
        (:func:`fsg.scan_cpu.mamba_low_memory`); elsewhere the block is checkpointed
        (``torch.utils.checkpoint``: recomputed in the backward pass). Same values and gradients.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        if low_memory and torch.is_grad_enabled():
            if _current_impl != "ref":
                from .scan_cpu import mamba_low_memory

                out = mamba_low_memory(self, x)
                if out is not None:
                    return out
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def stream(self, x: Tensor, state: Optional[tuple] = None, state_buffer: Optional[Tensor] = None):
        """Continue the block's recurrence by the tokens ``x`` (B, T_new, d_model).

        ``state`` = ``(x_hist, h)`` from the previous call (None to start): ``x_hist`` the last
        ``d_conv − 1`` input tokens (B, d_conv−1, d_model), ``h`` the scan state
        (B, d_inner, d_state). Returns ``(y, new_state)`` where ``y`` (B, T_new, d_model) equals
        the last ``T_new`` outputs of ``forward`` on the whole sequence seen so far. The causal
        convolution is evaluated on the window ``[x_hist, x]``; only the new positions enter the
        projections and the scan (from ``h``). Gradients flow into the new tokens' computation;
        ``state`` enters as a constant. ``state_buffer``: a free (B, d_inner, d_state) float32
        tensor the fused kernel may write the new scan state into (see ``last_out`` of
        :func:`fsg.scan_cpu.selective_scan_fused`).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        batch, t_new, _ = x.shape
        k = self.d_conv - 1
        if state is None:
            x_hist = x.new_zeros(batch, k, self.d_model)
            h = None
        else:
            x_hist, h = (s.detach() for s in state)
        window = torch.cat([x_hist, x], dim=1)  # zeros before the stream start = the causal padding
        d, r, n = self.d_inner, self.dt_rank, self.d_state
        w_in = self.in_proj.weight
        conv_w = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
        if self.d_model == 1:
            # d_model = 1: the conv output at new position t is b + w_u ⊙ (W_conv @ window_t), a
            # small GEMM over the sliding windows — no (B, d_inner, window) tensor
            windows = window.view(batch, -1).unfold(1, self.d_conv, 1)  # (B, t_new, d_conv)
            s = torch.matmul(windows, conv_w.t())  # (B, t_new, d_inner)
            u = F.silu(self.conv1d.bias + w_in[:d, 0] * s).transpose(1, 2).contiguous()  # (B, d_inner, t_new)
        else:
            u = _project(w_in[:d], window.transpose(1, 2))
            u = _causal_conv1d(u, conv_w, self.conv1d.bias, silu=True)[..., k:]
        z = _project(w_in[d:], x.transpose(1, 2))
        # (B, T_new, d_inner) @ (d_inner, r + 2n): one GEMM over all B·T_new tokens (a batched
        # matmul of the weight with (B, d_inner, T_new) would be B tiny GEMVs for T_new = 1)
        x_dbl = torch.matmul(u.transpose(1, 2), self.x_proj.weight.t()).transpose(1, 2)
        dlt, Bt, Ct = torch.split(x_dbl, [r, n, n], dim=1)
        delta = _project(self.dt_proj.weight, dlt)
        param_dtype = _compute_dtype(self.A_log.dtype)
        scan = selective_scan
        extra = {}
        if state_buffer is not None and _current_impl != "ref" and x.device.type == "cpu":
            from .scan_cpu import selective_scan_fused

            scan, extra = selective_scan_fused, {"last_out": state_buffer}
        y, h_new = scan(
            u, delta, -torch.exp(self.A_log.to(param_dtype)), Bt, Ct, D=self.D.to(param_dtype), z=z,
            delta_bias=self.dt_proj.bias.to(param_dtype), delta_softplus=True, return_last_state=True,
            initial_state=h, **extra,
        )
        out = torch.matmul(y.to(x.dtype).transpose(1, 2), self.out_proj.weight.t())  # (B, T_new, d_model)
        return out, (window[:, window.shape[1] - k:].detach(), h_new.detach())

    def _pre_scan_parts(self, x: Tensor):
        """Steps 1-3, channel-first: ``(u, dlt, B, C)``; ``u`` after the conv and SiLU, ``dlt``
        the dt_rank-dimensional input of ``dt_proj``."""
        # Everything runs channel-first, (B, channels, T), so that no large tensor is transposed:
        # each projection is a matmul of the weight with a (B, in, T) tensor.
        d, r, n = self.d_inner, self.dt_rank, self.d_state
        xt = x.transpose(1, 2)  # (B, d_model, T)
        u = _project(self.in_proj.weight[:d], xt)  # (B, d_inner, T)
        u = _causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, silu=True)
        x_dbl = torch.matmul(self.x_proj.weight, u)  # (B, dt_rank + 2 d_state, T)
        dlt, Bt, Ct = torch.split(x_dbl, [r, n, n], dim=1)
        return u, dlt, Bt, Ct

    def _pre_scan(self, x: Tensor):
        """Steps 1-4, channel-first: ``(u, z, delta, B, C)`` for the scan (``delta`` without the
        ``dt_proj`` bias, which the scan adds before its softplus)."""
        u, dlt, Bt, Ct = self._pre_scan_parts(x)
        z = _project(self.in_proj.weight[self.d_inner:], x.transpose(1, 2))
        delta = _project(self.dt_proj.weight, dlt)  # (B, d_inner, T)
        return u, z, delta, Bt, Ct

    def _forward(self, x: Tensor) -> Tensor:
        u, z, delta, Bt, Ct = self._pre_scan(x)
        param_dtype = _compute_dtype(self.A_log.dtype)
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
        )  # (B, d_inner, T), already multiplied by silu(z)
        return torch.matmul(self.out_proj.weight, y.to(x.dtype)).transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"d_conv={self.d_conv}, dt_rank={self.dt_rank}"
        )
