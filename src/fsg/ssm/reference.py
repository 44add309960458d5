"""Reference selective scan and causal depthwise convolution, in plain PyTorch.

These are the definitions every backend of :mod:`fsg.ssm` is tested against, and the fallback
for any operation a backend does not implement. They run on any device and dtype and are
differentiable by autograd; the scan's recurrence is a Python loop over time (slow for long
sequences, memory ``∝ L × d_inner × d_state``).

This module imports nothing from the rest of :mod:`fsg`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["selective_scan_ref", "causal_conv1d", "check_scan_shapes", "check_conv_shapes", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan's compute dtype: float32 for half/bfloat16/float32 inputs, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_scan_shapes(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, resets=None) -> None:
    """Raise ValueError unless the arguments have the layouts of :func:`selective_scan_ref`."""
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
    if resets is not None and (tuple(resets.shape) != (batch, length) or resets.dtype != torch.bool):
        raise ValueError(
            f"resets must be a bool tensor of shape (batch, L) = {(batch, length)}, "
            f"got {resets.dtype} {tuple(resets.shape)}"
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
    resets: Optional[Tensor] = None,
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

    with ``h_{-1} = initial_state`` (zeros if None).

    ``resets`` (bool, ``(batch, L)``): ``resets[b, t]`` restarts the recurrence at step ``t``,
    i.e. ``h_{t-1}`` counts as 0 there (several sequences packed into one scan)::

        h_t[b,d,n] = (0 if resets[b,t] else exp(delta[b,d,t] * A[d,n])) * h_{t-1}[b,d,n]
                     + delta[b,d,t] * B[b,n,t] * u[b,d,t]

    so nothing (value or gradient) crosses a reset; with ``resets[b, 0]`` the initial state of
    sequence ``b`` is unused.  Returns ``y`` in the
    dtype of ``u`` and, if ``return_last_state``, also the final state
    ``h_{L-1}`` of shape ``(batch, d_inner, d_state)`` (in the compute dtype).

    Computation happens in float32 (half/bfloat16 are upcast; float64 stays
    float64).  The decay and input terms are built for all time steps at
    once; only the recurrence itself is a Python loop over time.
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, resets)
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
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
    if resets is not None:  # the decay into a restarting step is 0
        deltaA = deltaA.masked_fill(resets.t()[:, :, None, None], 0.0)
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


def check_conv_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> None:
    """Raise ValueError unless the arguments have the layouts of :func:`causal_conv1d`."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, channels, L), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(
            f"weight must have shape (channels={x.shape[1]}, d_conv>=1), got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must have shape (channels,) = {(x.shape[1],)}, got {tuple(bias.shape)}")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = False) -> Tensor:
    """Causal depthwise 1-D convolution over the last axis (``F.conv1d``), then SiLU if ``silu``.

    ``x``: ``(batch, channels, L)``; ``weight``: ``(channels, d_conv)``;
    ``bias``: ``(channels,)`` or None.  Returns ``(batch, channels, L)`` with::

        out[b, c, t] = bias[c] + sum_{k=0}^{d_conv-1} weight[c, k] * x[b, c, t - (d_conv-1) + k]

    where ``x`` at negative time indices is zero.  Works for any
    ``d_conv >= 1``, including ``d_conv > L``.  No shape checks (see
    :func:`check_conv_shapes`; the dispatcher :func:`fsg.ssm.causal_conv1d` checks).
    """
    channels, d_conv = weight.shape
    out = F.conv1d(F.pad(x, (d_conv - 1, 0)), weight.unsqueeze(1), bias, groups=channels)
    return F.silu(out) if silu else out
