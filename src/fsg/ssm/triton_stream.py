"""The one-token streaming step of a d_model = 1 Mamba block (FSG's slow-net, layout ``stream``) as
one Triton kernel each way: the ``"triton"`` backend's ``mamba_stream`` op.

Per sequence ``b`` (a weight of the trained network), from its window ``w`` (the last ``d_conv``
inputs, the new one last), the carried state ``h0`` (d_inner × d_state, stored in float32,
bfloat16 or float16) and the block's weights, all arithmetic float32::

    s = W_conv w,  a = b_conv + w_u ⊙ s,  u = silu(a),  [dlt, B, C] = W_x u,
    δ = softplus(w_dt·dlt + b_dt),  z = w_z·w[K−1],
    h = exp(δ A) ⊙ h0 + (δ ⊙ u) Bᵀ,  y = h C + D ⊙ u,  out = w_out · (y ⊙ silu(z))

and the backward, with ``dy = dout·w_out`` and ``dy' = dy ⊙ silu(z)``, ``dh = dy' Cᵀ`` (the state
is a constant: truncated back-propagation, no gradient into ``h0``)::

    dC = hᵀ dy',  du = D ⊙ dy' + δ ⊙ (dh B),  dδ = Σ_n dh ⊙ (A ⊙ exp(δA) ⊙ h0 + u Bᵀ),
    dA = Σ_b dh ⊙ δ ⊙ exp(δA) ⊙ h0,  dB = dhᵀ (δ ⊙ u),  dz = dy ⊙ y ⊙ silu'(z),
    then back through softplus, W_x, silu, the conv and the window (as
    :meth:`fsg.ssm.mamba.Mamba.stream_pre_scan_backward`).

A program takes ``rows`` sequences in turn, each as (d_inner, d_state) tiles (the state's own
layout: coalesced loads); the weight gradients are the program's partial sums, one row of a
(programs, parameters) buffer summed by one ``torch.sum`` (deterministic, no atomics) and laid out
as the block's parameters, so every gradient is a view of that sum. No (batch × d_inner) tensor is
written: only the window is kept for the backward pass. With ``in_place`` the forward writes no
state and the backward kernel writes the new state over the old one after reading it (one copy
of the state; :class:`fsg.ssm.lowmem.PendingAdvance` does it if no backward pass comes). The
backward recomputes the forward from the same jitted code; the state it writes equals the one
the forward would write up to float rounding (the CPU kernels' equality is bit for bit).

On a CPU tensor the kernels run only under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fsg.ssm.lowmem import PendingAdvance
from fsg.ssm.triton_scan import on_device, sigmoid_f32, softplus_f32

__all__ = ["mamba_stream_triton", "stream_block_forward", "stream_block_backward"]

#: Programs a launch aims at (a few per SM of a large GPU); each takes ceil(batch / this) rows.
_PROGRAMS = 512
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634


@triton.jit
def _weights(cw_ptr, cb_ptr, wi_ptr, wx_ptr, wdt_ptr, alog_ptr, D_ptr, bias_ptr, wo_ptr, DIM, NS, KW,
             DP: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr):
    """The block's weights as tiles: channel vectors (DP,), ``cw`` (KP, DP) = W_conv[d, k]
    transposed, ``WB`` / ``WC`` (DP, NP) = W_x rows 1..N / N+1..2N transposed, ``An`` (DP, NP) =
    log2(e) A with A = −exp(A_log); zero outside the block's sizes."""
    d = tl.arange(0, DP)
    n = tl.arange(0, NP)
    k = tl.arange(0, KP)
    dm, nm, km = d < DIM, n < NS, k < KW
    dn = dm[:, None] & nm[None, :]
    cw = tl.load(cw_ptr + d[None, :] * KW + k[:, None], mask=dm[None, :] & km[:, None], other=0.0).to(tl.float32)
    WB = tl.load(wx_ptr + (1 + n[None, :]) * DIM + d[:, None], mask=dn, other=0.0).to(tl.float32)
    WC = tl.load(wx_ptr + (1 + NS + n[None, :]) * DIM + d[:, None], mask=dn, other=0.0).to(tl.float32)
    An = -tl.exp(tl.load(alog_ptr + d[:, None] * NS + n[None, :], mask=dn, other=0.0).to(tl.float32)) * 1.4426950408889634
    return (cw, _vec(cb_ptr, d, dm), _vec(wi_ptr, d, dm), _vec(wi_ptr + DIM, d, dm), _vec(wx_ptr, d, dm), WB, WC,
            _vec(wdt_ptr, d, dm), An, _vec(D_ptr, d, dm), _vec(bias_ptr, d, dm), _vec(wo_ptr, d, dm))


@triton.jit
def _vec(p, d, dm):
    return tl.load(p + d, mask=dm, other=0.0).to(tl.float32)


@triton.jit
def _state_off(b, d, n, sb, sd, sn):
    """Offsets of the (DP, NP) tile of sequence b in a (batch, d_inner, d_state) state of strides sb, sd, sn."""
    return b * sb + d[:, None].to(tl.int64) * sd + n[None, :] * sn


@triton.jit
def _row_forward(w, h0, cw, cb, wu, wz, wdt_x, WB, WC, dfw, An, Dv, bias, wo, KW, KP: tl.constexpr):
    """One sequence's step from its window ``w`` (KP,) and old state ``h0`` (DP, NP): the
    intermediates the backward needs and the new state ``h``, the ungated ``yp`` and gated ``yg``."""
    s = tl.sum(cw * w[:, None], axis=0)  # (DP,)
    a = cb + wu * s
    sg = sigmoid_f32(a)
    u = a * sg
    dlt = tl.sum(wdt_x * u, axis=0)
    Bv = tl.sum(WB * u[:, None], axis=0)  # (NP,)
    Cv = tl.sum(WC * u[:, None], axis=0)
    raw = dfw * dlt + bias
    delta = softplus_f32(raw)
    x = tl.sum(tl.where(tl.arange(0, KP) == KW - 1, w, 0.0), axis=0)  # the new input w[K-1]
    z = wz * x
    ea = tl.exp2(delta[:, None] * An)
    eah0 = ea * h0
    h = eah0 + (delta * u)[:, None] * Bv[None, :]
    yp = tl.sum(h * Cv[None, :], axis=1) + Dv * u
    yg = yp * z * sigmoid_f32(z)
    return s, a, sg, u, dlt, Bv, Cv, raw, delta, x, z, eah0, h, yp, yg


@triton.jit
def _row_backward(g, a, sg, u, Bv, Cv, raw, delta, z, eah0, h, yp, wo, WB, WC, wdt_x, dfw, An, Dv, dm, dn):
    """One sequence's gradients from its output gradient ``g`` and :func:`_row_forward`'s
    intermediates: ``dy'`` and ``dz`` (DP,), ``dh ⊙ δ`` (DP, NP), ``dB``, ``dC`` (NP,), the
    gradient of the raw delta (before the softplus, DP,), ``d dlt`` and ``ā`` (the gradient of
    the conv's pre-activation, DP,)."""
    dy = g * wo
    sz = sigmoid_f32(z)
    dyp = dy * z * sz
    dz = dy * yp * sz * (1.0 + z * (1.0 - sz))
    dh = dyp[:, None] * Cv[None, :]  # (DP, NP)
    dC = tl.sum(tl.where(dn, h * dyp[:, None], 0.0), axis=0)
    dhd = dh * delta[:, None]
    dB = tl.sum(dhd * u[:, None], axis=0)
    du = Dv * dyp + tl.sum(dhd * Bv[None, :], axis=1)
    ddelta = tl.sum(dh * (An * 0.6931471805599453 * eah0 + u[:, None] * Bv[None, :]), axis=1)  # ln 2: An = log2(e) A
    draw = tl.where(dm, ddelta * tl.where(raw > 20.0, 1.0, sigmoid_f32(raw)), 0.0)
    ddlt = tl.sum(draw * dfw, axis=0)
    ubar = du + ddlt * wdt_x + tl.sum(WB * dB[None, :], axis=1) + tl.sum(WC * dC[None, :], axis=1)
    abar = tl.where(dm, ubar * sg * (1.0 + a * (1.0 - sg)), 0.0)
    return dyp, dz, dhd, dB, dC, draw, ddlt, abar


@triton.jit
def _stream_fwd_kernel(win_ptr, cw_ptr, cb_ptr, wi_ptr, wx_ptr, wdt_ptr, alog_ptr, D_ptr, bias_ptr, wo_ptr,
                       h0_ptr, out_ptr, hnew_ptr, NB, DIM, NS, KW, ROWS, hsb, hsd, hsn, osb, osd, osn,
                       DP: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, HAS_H0: tl.constexpr,
                       WANT_OUT: tl.constexpr, WRITE: tl.constexpr):
    """Rows ``pid·ROWS ..`` of the step: ``out[b]`` (WANT_OUT) and the new state into ``hnew``
    (WRITE; may be ``h0``: each row's state is read before it is written). States (batch,
    d_inner, d_state) of strides (hsb, hsd, hsn) / (osb, osd, osn)."""
    cw, cb, wu, wz, wdt_x, WB, WC, dfw, An, Dv, bias, wo = _weights(
        cw_ptr, cb_ptr, wi_ptr, wx_ptr, wdt_ptr, alog_ptr, D_ptr, bias_ptr, wo_ptr, DIM, NS, KW, DP, NP, KP)
    d, n, k = tl.arange(0, DP), tl.arange(0, NP), tl.arange(0, KP)
    dn = (d < DIM)[:, None] & (n < NS)[None, :]
    for r in range(0, ROWS):
        b = (tl.program_id(0) * ROWS + r).to(tl.int64)
        if b < NB:
            w = tl.load(win_ptr + b * KW + k, mask=k < KW, other=0.0).to(tl.float32)
            h0 = tl.zeros((DP, NP), dtype=tl.float32)
            if HAS_H0:
                h0 += tl.load(h0_ptr + _state_off(b, d, n, hsb, hsd, hsn), mask=dn, other=0.0).to(tl.float32)
            _, _, _, _, _, _, _, _, _, _, _, _, h, _, yg = _row_forward(w, h0, cw, cb, wu, wz, wdt_x, WB, WC, dfw,
                                                                         An, Dv, bias, wo, KW, KP)
            if WANT_OUT:
                tl.store(out_ptr + b, tl.sum(wo * yg, axis=0))
            if WRITE:
                tl.store(hnew_ptr + _state_off(b, d, n, osb, osd, osn), h.to(hnew_ptr.dtype.element_ty), mask=dn)


@triton.jit
def _stream_bwd_kernel(win_ptr, cw_ptr, cb_ptr, wi_ptr, wx_ptr, wdt_ptr, alog_ptr, D_ptr, bias_ptr, wo_ptr,
                       h0_ptr, dout_ptr, hnew_ptr, dwin_ptr, part_ptr, NB, DIM, NS, KW, ROWS, TOT,
                       hsb, hsd, hsn, osb, osd, osn,
                       DP: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, HAS_H0: tl.constexpr,
                       WRITE: tl.constexpr, WANT_WIN: tl.constexpr):
    """Backward of rows ``pid·ROWS ..`` (see the module docstring): ``dwin[b]`` (WANT_WIN), the
    new state into ``hnew`` (WRITE; may be ``h0``) and this program's partial weight gradients,
    row ``pid`` of ``part`` (programs, TOT) in the parameters' layouts (see :func:`_store_partials`)."""
    cw, cb, wu, wz, wdt_x, WB, WC, dfw, An, Dv, bias, wo = _weights(
        cw_ptr, cb_ptr, wi_ptr, wx_ptr, wdt_ptr, alog_ptr, D_ptr, bias_ptr, wo_ptr, DIM, NS, KW, DP, NP, KP)
    d, n, k = tl.arange(0, DP), tl.arange(0, NP), tl.arange(0, KP)
    dm, nm, km = d < DIM, n < NS, k < KW
    dn = dm[:, None] & nm[None, :]
    zero_dn = tl.zeros((DP, NP), dtype=tl.float32)
    zero_d = tl.zeros((DP,), dtype=tl.float32)
    gA, gWB, gWC = zero_dn, zero_dn, zero_dn  # Σ dh δ e^{δA} h0,  Σ u dBᵀ,  Σ u dCᵀ
    gcw = tl.zeros((KP, DP), dtype=tl.float32)
    gwu, gwz, gcb, gwdt, gdfw, gbias, gD, gwo = zero_d, zero_d, zero_d, zero_d, zero_d, zero_d, zero_d, zero_d
    for r in range(0, ROWS):
        b = (tl.program_id(0) * ROWS + r).to(tl.int64)
        if b < NB:
            w = tl.load(win_ptr + b * KW + k, mask=km, other=0.0).to(tl.float32)
            h0 = tl.zeros((DP, NP), dtype=tl.float32)
            if HAS_H0:
                h0 += tl.load(h0_ptr + _state_off(b, d, n, hsb, hsd, hsn), mask=dn, other=0.0).to(tl.float32)
            s, a, sg, u, dlt, Bv, Cv, raw, delta, x, z, eah0, h, yp, yg = _row_forward(
                w, h0, cw, cb, wu, wz, wdt_x, WB, WC, dfw, An, Dv, bias, wo, KW, KP)
            g = tl.load(dout_ptr + b).to(tl.float32)
            dyp, dz, dhd, dB, dC, draw, ddlt, abar = _row_backward(g, a, sg, u, Bv, Cv, raw, delta, z, eah0, h, yp,
                                                                   wo, WB, WC, wdt_x, dfw, An, Dv, dm, dn)
            ds = abar * wu
            gA += dhd * eah0
            gWB += u[:, None] * dB[None, :]
            gWC += u[:, None] * dC[None, :]
            gcw += w[:, None] * ds[None, :]
            gwu += abar * s
            gwz += dz * x
            gcb += abar
            gwdt += ddlt * u
            gdfw += draw * dlt
            gbias += draw
            gD += dyp * u
            gwo += g * yg
            if WANT_WIN:
                dzx = tl.sum(tl.where(dm, dz * wz, 0.0), axis=0)
                dw = tl.sum(cw * ds[None, :], axis=1) + tl.where(k == KW - 1, dzx, 0.0)
                tl.store(dwin_ptr + b * KW + k, dw, mask=km)
            if WRITE:
                tl.store(hnew_ptr + _state_off(b, d, n, osb, osd, osn), h.to(hnew_ptr.dtype.element_ty), mask=dn)
    _store_partials(part_ptr + tl.program_id(0).to(tl.int64) * TOT, d, n, k, dm, dn, km, DIM, NS, KW, An, gA,
                    gWB, gWC, gcw, gwu, gwz, gcb, gwdt, gdfw, gbias, gD, gwo)


@triton.jit
def _store_partials(p, d, n, k, dm, dn, km, DIM, NS, KW, An, gA, gWB, gWC, gcw, gwu, gwz, gcb, gwdt, gdfw, gbias, gD,
                    gwo):
    """A program's partial gradients in :func:`_params`' order and layouts: conv1d weight (d, k),
    conv1d bias, in_proj (w_u, w_z), x_proj (dlt row, B rows, C rows), dt_proj weight, A_log
    (dA·A), D, dt_proj bias, out_proj."""
    R = 1 + 2 * NS
    tl.store(p + d[None, :] * KW + k[:, None], gcw, mask=dm[None, :] & km[:, None])
    o = DIM * KW
    tl.store(p + o + d, gcb, mask=dm)
    tl.store(p + o + DIM + d, gwu, mask=dm)
    tl.store(p + o + 2 * DIM + d, gwz, mask=dm)
    o += 3 * DIM
    tl.store(p + o + d, gwdt, mask=dm)
    tl.store(p + o + (1 + n[None, :]) * DIM + d[:, None], gWB, mask=dn)
    tl.store(p + o + (1 + NS + n[None, :]) * DIM + d[:, None], gWC, mask=dn)
    o += R * DIM
    tl.store(p + o + d, gdfw, mask=dm)
    o += DIM
    tl.store(p + o + d[:, None] * NS + n[None, :], gA * An * 0.6931471805599453, mask=dn)  # dA_log = dA·A
    o += DIM * NS
    tl.store(p + o + d, gD, mask=dm)
    tl.store(p + o + DIM + d, gbias, mask=dm)
    tl.store(p + o + 2 * DIM + d, gwo, mask=dm)


def _params(block) -> tuple:
    """The parameters the kernels read, in their argument order (each contiguous: nn.Linear /
    Conv1d weights are): conv1d.weight (d, 1, k), conv1d.bias, in_proj.weight (w_u; w_z),
    x_proj.weight, dt_proj.weight, A_log, D, dt_proj.bias, out_proj.weight."""
    return (block.conv1d.weight, block.conv1d.bias, block.in_proj.weight, block.x_proj.weight, block.dt_proj.weight,
            block.A_log, block.D, block.dt_proj.bias, block.out_proj.weight)


def _strides(h: Optional[Tensor]) -> tuple:
    return (0, 0, 0) if h is None else h.stride()


def _launch_shape(block, batch: int):
    dim, ns, kw = block.d_inner, block.d_state, block.d_conv
    rows = max(1, triton.cdiv(batch, _PROGRAMS))
    consts = dict(DP=triton.next_power_of_2(dim), NP=triton.next_power_of_2(ns), KP=triton.next_power_of_2(kw),
                  num_warps=8)
    return (triton.cdiv(batch, rows),), rows, consts


def stream_block_forward(block, window: Tensor, h: Optional[Tensor], h_new: Optional[Tensor], want_out: bool = True,
                         params: Optional[tuple] = None) -> Optional[Tensor]:
    """The forward of the one-token step, no autograd: ``out`` (B, 1, 1) (or None) from the
    window (B, d_conv, 1) float32 and the old state ``h`` (B, d_inner, d_state; None: zeros); the
    new state is written into ``h_new`` (None: not written; may be ``h``). ``params``: the
    tensors of :func:`_params` to use instead of the block's (a snapshot)."""
    batch = window.shape[0]
    win = window.detach().reshape(batch, -1).contiguous()
    grid, rows, consts = _launch_shape(block, batch)
    out = torch.empty(batch, dtype=torch.float32, device=win.device) if want_out else None
    ps = [p.detach() for p in (params or _params(block))]
    with on_device(win.device):
        _stream_fwd_kernel[grid](win, *ps, h, out, h_new, batch, block.d_inner, block.d_state, block.d_conv, rows,
                                 *_strides(h), *_strides(h_new), HAS_H0=h is not None, WANT_OUT=want_out,
                                 WRITE=h_new is not None, **consts)
    return None if out is None else out.view(batch, 1, 1)


def stream_block_backward(block, window: Tensor, h0: Optional[Tensor], h_new: Optional[Tensor], dout: Tensor,
                          want_window: bool):
    """The backward of :func:`stream_block_forward` from ``dout`` (B, 1, 1): ``(d_window (B,
    d_conv, 1) or None, [the gradients of the block's parameters in :func:`_params`'
    order])``, float32, each a view of one summed buffer; the new
    state is written into ``h_new`` (None: not written; may be ``h0``)."""
    batch = window.shape[0]
    win = window.detach().reshape(batch, -1).contiguous()
    grid, rows, consts = _launch_shape(block, batch)
    params = _params(block)
    tot = sum(p.numel() for p in params)
    part = torch.empty(grid[0], tot, dtype=torch.float32, device=win.device)
    dwin = torch.empty(batch, block.d_conv, dtype=torch.float32, device=win.device) if want_window else None
    g = dout.detach().reshape(batch).float().contiguous()
    with on_device(win.device):
        _stream_bwd_kernel[grid](win, *(p.detach() for p in params), h0, g, h_new, dwin, part, batch,
                                 block.d_inner, block.d_state, block.d_conv, rows, tot, *_strides(h0),
                                 *_strides(h_new), HAS_H0=h0 is not None,
                                 WRITE=h_new is not None, WANT_WIN=want_window, **consts)
    grads = [gr.view_as(p) for gr, p in zip(part.sum(0).split([p.numel() for p in params]), params)]
    return (None if dwin is None else dwin.view(batch, block.d_conv, 1)), grads


class _StreamStep(torch.autograd.Function):
    """The one-token step with only the window (and the old state, the caller's) kept."""

    @staticmethod
    def forward(ctx, window, block, box, *params):  # type: ignore[override]
        h, h_new, pending = box
        out = stream_block_forward(block, window, h, None if pending is not None else h_new)
        # saved: an in-place change of the old state before the backward pass is then an error
        ctx.save_for_backward(window, *(() if h is None else (h,)))
        ctx.block, ctx.pending = block, pending
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        window, *h = ctx.saved_tensors
        block, pending = ctx.block, ctx.pending
        if pending is not None and pending.done:
            raise RuntimeError("the streamed Mamba state was already advanced (finish() was called, or this is a "
                               "second backward pass): the old state this backward pass needs is gone")
        h0 = h[0] if h else None
        d_window, grads = stream_block_backward(block, window, h0, None if pending is None else pending.h, dout,
                                                ctx.needs_input_grad[0])
        if pending is not None:
            pending.release()  # the new state is in place
        return (d_window, None, None) + tuple(gr.to(p.dtype) for gr, p in zip(grads, _params(block)))


def _advance(block, window: Tensor, h: Tensor, params: tuple) -> None:
    """:class:`fsg.ssm.lowmem.PendingAdvance`'s update: the step's new state written over ``h``."""
    stream_block_forward(block, window, h, h, want_out=False, params=params)


def mamba_stream_triton(block, window: Tensor, h: Optional[Tensor], state_dtype: torch.dtype, in_place: bool = False,
                        state_buffer: Optional[Tensor] = None):
    """The ``"triton"`` backend's ``mamba_stream`` op (see :func:`fsg.ssm.mamba_stream`) for one new
    token of a d_model = dt_rank = 1 block (FSG's slow-net) in float32 with a float32, bfloat16
    or float16 state: ``(out, h_new, finish)``, or None where it does not apply (several new
    tokens, another block shape, float64, a state of another dtype or shape: the caller then runs
    the ordinary path; the state may have any strides). Only ``window`` (and the caller's old state) is kept for the
    backward pass. ``in_place``: ``h_new`` is ``h``, written by the backward kernel (or
    ``finish()``); else the forward writes it into ``state_buffer`` (if suitable) or a new tensor.
    Without a graph to record the step writes ``h_new`` at once."""
    params = _params(block)
    shape = (window.shape[0], block.d_inner, block.d_state)
    if (window.shape[1] != block.d_conv or block.d_model != 1 or block.dt_rank != 1
            or state_dtype not in _STATE_DTYPES or window.dtype != torch.float32
            or any(p.dtype != torch.float32 or p.device != window.device or not p.is_contiguous() for p in params)):
        return None
    if h is not None and (h.dtype != state_dtype or h.device != window.device or tuple(h.shape) != shape):
        return None
    if in_place and h is not None:
        h_new = h
    elif (state_buffer is not None and state_buffer.dtype == state_dtype and state_buffer.is_contiguous()
          and tuple(state_buffer.shape) == shape and state_buffer.device == window.device
          and (h is None or state_buffer.data_ptr() != h.data_ptr())):
        h_new = state_buffer
    else:
        h_new = torch.empty(shape, dtype=state_dtype, device=window.device)
    if torch.is_grad_enabled() and (window.requires_grad or any(p.requires_grad for p in params)):
        pending = PendingAdvance(_advance, block, window.detach(), h, params) if h_new is h else None
        out = _StreamStep.apply(window, block, [h, h_new, pending], *params)
        return out, h_new, pending
    return stream_block_forward(block, window, h, h_new), h_new, None
