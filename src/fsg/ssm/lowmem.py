"""The low-memory Mamba block, shared by the backends whose scan kernels keep chunk states.

:class:`MambaLowMemory` runs a whole :class:`fsg.ssm.mamba.Mamba` block and keeps for the backward
pass only the block input ``x`` and the scan's chunk-boundary states (``L/chunk × d_inner ×
d_state``): the backward recomputes the cheap pre-scan part with a graph, runs the scan backward
(which recomputes the states chunk by chunk and, on the way, the scan output ``y`` that
``out_proj``'s gradient needs), then back-propagates through the recomputed pre-scan graph.
Compared with checkpointing the block (``torch.utils.checkpoint``), the scan's forward runs once
instead of twice. With d_model = dt_rank = 1 (FSG's slow-net) ``z = w_z ⊗ x`` and
``delta = w_dt ⊗ dlt`` are rank-1: the kernels take the factors, so neither ``(B, d_inner, T)``
tensor, nor its gradient, is ever written.

A backend provides its scan kernels as a :class:`ScanKernels`: ``forward`` and ``backward``
without autograd, ``B``/``C`` channel-first ``(batch, d_state, L)`` as the block makes them
(the CPU kernels' adapter transposes them to their ``(batch, L, d_state)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["ScanKernels", "MambaLowMemory", "mamba_low_memory", "rank1_factors", "PendingAdvance"]


@dataclass(frozen=True)
class ScanKernels:
    """A backend's scan without autograd, for :class:`MambaLowMemory`; every tensor float32.

    * ``forward(u, delta, A, B, C, D, z, delta_bias, dfac, zfac) -> (y, states)``: the scan with
      the softplus on ``delta + delta_bias``, no initial state; ``states`` whatever ``backward``
      needs (the chunk-boundary states).
    * ``backward(u, delta, A, B, C, D, z, delta_bias, states, dy, dfac, zfac) -> (du, ddelta, dA,
      dB, dC, dD, dz, dbias, y)``, ``y`` the recomputed, gated scan output; with factors
      ``ddelta`` / ``dz`` are the pairs ``(dw, dx)``.

    ``u``, ``delta``, ``z``, ``y`` (batch, d_inner, L); ``B``, ``C`` and their gradients
    (batch, d_state, L); ``dfac`` / ``zfac``: ``(w (d_inner,), x (batch, L))`` or None (then
    ``delta`` / ``z`` are given; with factors they are None).

    Optional keyword ``resets`` of both (bool (batch, L), see
    :func:`fsg.ssm.reference.selective_scan_ref`): the recurrence restarts at the marked steps
    (``h_{t-1}`` counts as 0). It is passed only when given: kernels without it (the CPU
    backend's) serve every call without resets."""

    forward: Callable
    backward: Callable


def rank1_factors(block, x: Tensor, dlt: Tensor):
    """The rank-1 factors ``(w_dt, dlt)`` of delta and ``(w_z, x)`` of z (d_model = dt_rank = 1),
    float32 contiguous."""
    batch, length = x.shape[0], x.shape[1]
    d = block.d_inner
    col = lambda t: t.detach().float().contiguous()  # noqa: E731
    dfac = (col(block.dt_proj.weight[:, 0]), col(dlt.reshape(batch, length)))
    zfac = (col(block.in_proj.weight[d:, 0]), col(x.reshape(batch, length)))
    return dfac, zfac


def _f32(t):
    return None if t is None else t.detach().float().contiguous()


class MambaLowMemory(torch.autograd.Function):
    """``block(x)`` keeping only ``x`` and the scan's chunk states (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, block, kernels, resets, w_in, conv_w, conv_b, w_x, w_dt, b_dt, A_log, D,  # type: ignore[override]
                w_out):
        factored = block.d_model == 1 and block.dt_rank == 1
        with torch.no_grad():
            A = -torch.exp(A_log.float())
            if factored:
                u, dlt, Bt, Ct = block.pre_scan_parts(x)
                z_ = delta_ = None
                dfac, zfac = rank1_factors(block, x, dlt)
            else:
                u, z, delta, Bt, Ct = block.pre_scan(x)
                z_, delta_, dfac, zfac = _f32(z), _f32(delta), None, None
            y, states = kernels.forward(_f32(u), delta_, A.contiguous(), _f32(Bt), _f32(Ct), _f32(D), z_, _f32(b_dt),
                                        dfac, zfac, **_reset_kw(resets))
            out = torch.matmul(w_out.to(y.dtype), y).to(x.dtype).transpose(1, 2)
        ctx.save_for_backward(x, states, *([] if resets is None else [resets]))  # as before without resets
        ctx.block, ctx.kernels, ctx.factored = block, kernels, factored
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x, states, *resets = ctx.saved_tensors
        resets = resets[0] if resets else None
        block = ctx.block
        reset_kw = _reset_kw(resets)
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
        scan_in = (A.contiguous(), _f32(Bt), _f32(Ct), _f32(block.D))
        if ctx.factored:
            dfac, zfac = rank1_factors(block, x, dlt.detach())
            du, (ddw, ddx), dA, dB, dC, dD, (dzw, dzx), dbias, y = ctx.kernels.backward(
                _f32(u), None, *scan_in, None, _f32(block.dt_proj.bias), states, dy, dfac, zfac, **reset_kw)
            outs, grads_out = [u, dlt, Bt, Ct], [du, ddx.view_as(dlt), dB, dC]
        else:
            du, ddelta, dA, dB, dC, dD, dz, dbias, y = ctx.kernels.backward(
                _f32(u), _f32(delta), *scan_in, _f32(z), _f32(block.dt_proj.bias), states, dy, None, None, **reset_kw)
            outs, grads_out = [u, z, delta, Bt, Ct], [du, dz, ddelta, dB, dC]
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
        cast = lambda g, p: None if g is None else g.to(p.dtype)  # noqa: E731
        return (cast(dx, x), None, None, None, cast(dw_in, block.in_proj.weight), cast(dconv_w, block.conv1d.weight),
                cast(dconv_b, block.conv1d.bias), cast(dw_x, block.x_proj.weight), cast(dw_dt, block.dt_proj.weight),
                cast(dbias, block.dt_proj.bias), cast(d_alog, block.A_log), cast(dD, block.D),
                cast(d_wout, block.out_proj.weight))


def _reset_kw(resets: Optional[Tensor]) -> dict:
    """The kernels' keyword arguments for ``resets``: none without resets (see :class:`ScanKernels`)."""
    return {} if resets is None else {"resets": resets}


def mamba_low_memory(block, x: Tensor, kernels: ScanKernels, resets: Optional[Tensor] = None) -> Tensor:
    """``block(x)`` through :class:`MambaLowMemory` with a backend's ``kernels``; ``resets`` (bool
    (batch, L) or None) restart the scan's recurrence at the marked tokens (only the scan's: the
    causal convolution still sees the tokens before a reset)."""
    return MambaLowMemory.apply(x, block, kernels, resets, block.in_proj.weight, block.conv1d.weight, block.conv1d.bias,
                                block.x_proj.weight, block.dt_proj.weight, block.dt_proj.bias, block.A_log, block.D,
                                block.out_proj.weight)


class PendingAdvance:
    """The deferred in-place update of a streamed state (a backend's ``mamba_stream`` with
    ``in_place``): the backward kernel writes the new state over the old one ``h`` once it has
    read it, then calls :meth:`release`; calling this object does the update instead if the
    backward pass has not run: ``advance(block, window, h, snapshot)``, ``snapshot`` the
    ``params`` as they were at the forward (a few kB, copied: a meta step may have changed them
    since). Idempotent; ``done`` tells whether the old state is gone."""

    def __init__(self, advance: Callable, block, window: Tensor, h: Tensor, params):
        self.advance, self.block, self.window, self.h = advance, block, window, h
        self.params = _snapshot(tuple(params))
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.advance(self.block, self.window, self.h, self.params)
            self.release()

    def release(self) -> None:
        self.done = True
        self.advance = self.block = self.window = self.h = self.params = None


_last_snapshot: list = [None, None, None]  # (params, their versions, copies): the layers of a step share one


def _snapshot(params: tuple) -> tuple:
    """Copies of ``params``, shared by every call until one of them changes (its version counter:
    an optimizer step updates it in place): a step's streamed layers share one slow-net, so one
    copy per step instead of one per layer. The cache holds the parameters themselves, so their
    identities stay theirs. (A change through ``.data`` bypasses the version counter and would not
    be seen; optimizers and ``load_state_dict`` update parameters in place, which it sees.)"""
    versions = tuple(p._version for p in params)
    held, held_versions, copies = _last_snapshot
    if held is None or len(held) != len(params) or any(a is not b for a, b in zip(held, params)) \
            or held_versions != versions:
        copies = tuple(p.detach().clone() for p in params)
        _last_snapshot[:] = [params, versions, copies]
    return copies
