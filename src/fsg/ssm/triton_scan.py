"""Selective scan (forward and backward) as Triton kernels, chunk-parallel along the sequence.

:func:`selective_scan_triton` has the signature and semantics of
:func:`fsg.ssm.reference.selective_scan_ref` (``mamba_ssm`` layouts) and is differentiable with
respect to every tensor input. With ``delta <- softplus(delta + delta_bias)`` (each part
optional), ``a_t = exp(delta_t A)`` and ``b_t = delta_t B_t u_t`` (per channel ``d``, state ``n``)::

    h_t = a_t h_{t-1} + b_t,   h_{-1} = initial_state (or 0)
    y_t = sum_n C_t h_t + D u_t,   y_t <- y_t silu(z_t)

The sequence is cut into chunks of ``T`` steps (``T`` = ``chunk``, a power of two, shrunk to the
next power of two >= L for short sequences). Forward, three launches:

1. ``_fwd_local_kernel`` (grid batch × chunks): each chunk's end state from a zero start,
   ``s_k = sum_t exp(A R_t) b_t`` with ``R_t = sum_{r>t} delta_r`` (suffix sums, never a
   difference of large prefix sums; a reduction, no scan), and ``S_k`` = the chunk's sum of
   ``delta`` (its decay is ``Q_k = exp(A S_k)``).
2. ``_combine_kernel`` (grid batch × d_state × channel blocks): ``e_k = Q_k e_{k-1} + s_k``, an
   associative scan over the chunks, giving every chunk's end state ``e_k`` (kept in
   ``states[:, :, k]``; ``e_{-1}`` = initial state; ``e_{K-1}`` = the last state).
3. ``_fwd_out_kernel`` (grid batch × chunks): each chunk rescanned from ``e_{k-1}`` → ``y``.

Only ``states`` (batch, d_inner, n_chunks, d_state) float32 is kept for the backward. With a
single chunk (L <= T, e.g. streaming L = 1) only launch 3 runs and writes the last state.

Backward, with ``g_t = C_t dy_t silu(z_t)`` and ``dh_t`` the gradient of ``h_t``::

    dh_t = g_t + a_{t+1} dh_{t+1},   dh_{L-1} = g_{L-1} + dlast

1. ``_bwd_local_kernel``: each chunk's gradient w.r.t. its start state ``e_{k-1}`` assuming
   nothing flows in from later chunks, ``r_k = sum_t exp(A S_t) g_t`` (inclusive prefix sums).
2. ``_combine_kernel`` reversed: ``E_k = r_k + Q_k E_{k+1}`` (``E_K = dlast``); ``E_{k+1}`` is
   the gradient flowing into chunk ``k``'s end state.
3. ``_bwd_main_kernel``: per chunk, recompute ``h_t`` from ``e_{k-1}`` (forward scan), then ``dh_t``
   by a reversed scan within the chunk seeded with ``E_{k+1}``, and::

       du_t     = delta_t sum_n dh_t B_t + D dy'_t          (dy' = dy silu(z))
       ddelta_t = sum_n dh_t (A a_t h_{t-1} + B_t u_t)      (then × softplus' of the raw delta)
       dA       = sum_t delta_t dh_t a_t h_{t-1},  dB_t = sum_d dh_t delta_t u_t,
       dC_t     = sum_d dy'_t h_t,  dz = dy y_pre silu'(z),  dh_{-1} = a_0 dh_0

   with ``a_t h_{t-1} = h_t - b_t`` (as ``mamba_ssm``'s CUDA kernel; never a division by
   ``a_t``). ``dA``, ``dD``, ``ddelta_bias`` (and factor gradients) are float32 per-program
   partial sums, reduced with ``torch.sum`` (deterministic; no atomics).

Resets (``resets``, bool (batch, L): several sequences packed one after the other into one
scan): ``a_t = 0`` at a marked step, i.e. ``h_t = b_t``, nothing crosses it either way. The
kernels get them behind a constexpr ``HAS_RESET`` (without resets none of it is compiled) as a
(T,) row per chunk, like the rows of B and C: ``_scan_states`` sets ``a_t = 0`` (the rescans,
``dh``, ``a_t h_{t-1} = h_t - b_t`` and ``dh_{-1}`` follow); ``_fwd_local_kernel`` counts only
the steps with no reset in ``(t, chunk end]``, ``_bwd_local_kernel`` only those with none in
``[chunk start, t]`` (counts of resets, never infinite deltas: ``R_t`` is a difference of sums);
both store ``S_k = +inf`` for a chunk with a reset, which ``_combine_kernel`` turns into
``Q_k = 0`` (also for ``A = 0``).

Tiling (as ``mamba_ssm``'s CUDA kernel): a program of the per-chunk kernels takes one
(sequence, chunk) and walks the channels in blocks of ``BLOCK_D`` (32 on a GPU: one warp); a
block's series are (T × BLOCK_D) tiles with the channels across the lanes and the chunk's time
steps in each thread's registers, so the scans over time are sequential in-thread recurrences (tiles
are loaded and stored through 1-D views, see :func:`_store_tc`, and their time offsets are
multiplied by an opaque runtime 1, ``ST``: otherwise Triton may lay the time axis, contiguous in
memory, across the lanes and every scan step becomes shuffles). Inside,
a loop over the ``d_state`` states (any d_state: no padding) carries the per-state tiles: for each
state only a (BLOCK_D,) state vector and (T,) rows of B, C; sums over states (``y``, ``du``,
``ddelta``) accumulate in registers, sums over channels (``dB``, ``dC``) are reductions across
the lanes, one partial per channel block. ``exp(delta A)`` is ``exp2(delta log2(e) A)``. The
combine kernels take one (sequence, state, channel block) and scan tiles of ``KC`` chunks.

Nothing of size L × d_inner × d_state is ever in memory. All arithmetic is float32; inputs may
be float32, float16 or bfloat16 (upcast on load), float64 goes to the reference. On a CPU
tensor the kernels run only under ``TRITON_INTERPRET=1`` (used by the tests).

The reversed scans over a chunk's steps are ``flip(scan(flip(x)))`` written out with ``tl.flip``
(the semantics of ``tl.associative_scan(..., reverse=True)``, with ``combine(later_total,
earlier)``, as tested upstream in Triton's ``test_scan2d`` for ``linear_recurrence``): Triton's
own reversed scan also reverses the lanes, which here hold independent channels, at a cost of
79 shuffles per state and chunk in the backward kernel (395 with Triton 3.6), while ``tl.flip``
of the in-register time axis compiles to nothing (``benchmarks/triton_compile.py --sass``).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fsg.ssm.lowmem import ScanKernels, mamba_low_memory

__all__ = ["selective_scan_triton", "scan_forward", "scan_backward", "CHUNK"]

#: Default steps per chunk: the time steps each thread keeps in registers on a GPU (memory for
#: the chunk states: L / CHUNK × d_inner × d_state floats).
CHUNK = 16
#: Time steps per thread in the per-chunk kernels on a GPU (the rest of T goes across warps).
_T_PER_THREAD = 16
#: Chunks per tile of the combine kernels on a GPU (16 per thread, 4 warps) and their channels.
_KC, _KC_BD = 64, 32
#: Software-pipelining stages of the combine kernels' loop over chunk tiles (Triton's
#: ``tl.range(num_stages=...)``): above 1, the loads of the next tiles are in flight (``cp.async``)
#: while a tile is scanned. The loop is sequential, with few programs for one long sequence
#: (batch × d_state × channel blocks), so load latency may dominate it; pipelining adds about a
#: quarter more instructions per tile (sm_90, Triton 3.6). 1 until measured on a GPU
#: (``benchmarks/gpu_profile.py`` sweeps 3; :func:`combine_stages` sets it for a block of code).
COMBINE_STAGES = 1


@contextlib.contextmanager
def combine_stages(stages: Optional[int]):
    """Within the block, the combine kernels use ``stages`` pipelining stages (None: unchanged);
    :data:`COMBINE_STAGES` is restored after it (the benchmarks' sweep and compile check)."""
    global COMBINE_STAGES
    previous = COMBINE_STAGES
    COMBINE_STAGES = previous if stages is None else int(stages)
    try:
        yield
    finally:
        COMBINE_STAGES = previous


# ---------------------------------------------------------------------------------------------
# Small jitted helpers. Per-channel series are (T, BLOCK_D) tiles (time on axis 0), B/C rows of
# one state are (T,) vectors, per-channel values of one state are (BLOCK_D,) vectors.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lin_comb(a1, b1, a2, b2):
    """Compose affine maps x -> a1 x + b1 then x -> a2 x + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adj_comb(f1, p1, g1, f2, p2, g2):
    """Reversed-scan combine for dh_t = g_t + a_{t+1} dh_{t+1}: (f1, p1, g1) sums a later segment,
    (f2, p2, g2) the earlier one. A segment [s, e] is (a_s, prod_{s<r<=e} a_r,
    sum_{s<=q<=e} prod_{s<r<=q} a_r g_q); a leaf is (a_t, 1, g_t)."""
    return f2, p2 * f1 * p1, g2 + p2 * f1 * g1


@triton.jit
def softplus_f32(x):
    """log(1 + exp(x)) like torch (x above 20 passes through), without cancellation."""
    e = tl.exp(-tl.abs(x))
    p = 1.0 + e
    lp = tl.where(p == 1.0, e, tl.log(p) * (e / tl.where(p == 1.0, 1.0, p - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def sigmoid_f32(x):
    """1 / (1 + exp(-x))."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _row(x, j, T: tl.constexpr):
    """x[j] of a (T, BLOCK_D) tile."""
    return tl.sum(tl.where((tl.arange(0, T) == j)[:, None], x, 0.0), axis=0)


@triton.jit
def _flat(x):
    """A (T, C) tile as a 1-D (T * C,) tensor, row-major (no data movement)."""
    return tl.reshape(x, (x.shape[0] * x.shape[1],))


@triton.jit
def _load_tc(ptr, rows, t, m):
    """Tile (T, C) of a row-major (rows, L) tensor at columns t; zero where m is False.

    The memory access is 1-D (see :func:`_store_tc`)."""
    v = tl.load(_flat(ptr + rows[None, :] + t[:, None]), mask=_flat(m), other=0.0).to(tl.float32)
    return tl.reshape(v, (t.shape[0], rows.shape[0]))


@triton.jit
def _store_tc(ptr, rows, t, x, m):
    """Store the (T, C) tile x into a row-major (rows, L) tensor at columns t where m is True.

    Loads and stores of tiles go through 1-D tensors so that Triton's layout does not depend on
    a tie: with both axes' memory strides unknown, the coalescing pass of Triton 3.6 puts the
    first axis (time) across the lanes and 3.9 the last (channels); a 1-D access has one layout
    (element i on lane i mod 32, i.e. the channels across the lanes, time in registers), and
    reshaping it back to (T, C) keeps it. Time across the lanes turns every scan and sum over time
    into shuffles (``benchmarks/triton_compile.py --sass`` counts them)."""
    tl.store(_flat(ptr + rows[None, :] + t[:, None]), _flat(x).to(ptr.dtype.element_ty), mask=_flat(m))


@triton.jit
def _load_series(ptr, wptr, xptr, rows, xrow, d, t, dmask, tmask, m, FAC: tl.constexpr):
    """A (T, BLOCK_D) tile of a (batch, d_inner, L) series, or of the rank-1 product w[d] x[b, t]."""
    if FAC:
        w = tl.load(wptr + d, mask=dmask, other=0.0).to(tl.float32)
        x = tl.load(xptr + xrow + t, mask=tmask, other=0.0).to(tl.float32)
        return x[:, None] * w[None, :]
    else:
        return _load_tc(ptr, rows, t, m)


@triton.jit
def _delta_tile(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, rows, xrow, d, t, dmask, tmask, m,
                DFAC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, delta): delta + bias before / after softplus; delta is 0 outside the valid tile."""
    raw = _load_series(delta_ptr, dfw_ptr, dfx_ptr, rows, xrow, d, t, dmask, tmask, m, DFAC)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    delta = raw
    if SOFTPLUS:
        delta = softplus_f32(raw)
    return raw, tl.where(m, delta, 0.0)


@triton.jit
def _gated_dy(dout_ptr, z_ptr, zfw_ptr, zfx_ptr, rows, xrow, d, t, dmask, tmask, m,
              HAS_Z: tl.constexpr, ZFAC: tl.constexpr):
    """(dout, z, sigmoid(z), dy' = dout silu(z)) on a (T, BLOCK_D) tile (z, sig = 0 without z)."""
    dout = _load_tc(dout_ptr, rows, t, m)
    if HAS_Z:
        z = _load_series(z_ptr, zfw_ptr, zfx_ptr, rows, xrow, d, t, dmask, tmask, m, ZFAC)
        sz = sigmoid_f32(z)
        return dout, z, sz, dout * z * sz
    else:
        return dout, dout * 0.0, dout * 0.0, dout


@triton.jit
def _state_rows(A_ptr, B_ptr, C_ptr, bidx, n, d, t, dmask, tmask, NS, L):
    """log2(e) A[d, n] (BLOCK_D,; so that exp(delta A) = exp2(delta An)) and the rows B[b, n, t],
    C[b, n, t] (T,) of state n."""
    An = tl.load(A_ptr + d * NS + n, mask=dmask, other=0.0).to(tl.float32) * 1.4426950408889634
    Bn = tl.load(B_ptr + (bidx * NS + n) * L + t, mask=tmask, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + (bidx * NS + n) * L + t, mask=tmask, other=0.0).to(tl.float32)
    return An, Bn, Cn


@triton.jit
def _scan_states(delta, du, An, Bn, h0, rs, HAS_RESET: tl.constexpr):
    """(a, b, h) of one state on a (T, BLOCK_D) tile: a_t = exp(delta_t A) = exp2(delta_t An),
    or 0 at a reset (HAS_RESET, rs_t True: h_{t-1} counts as 0), b_t = du_t B_t,
    h_t = a_t h_{t-1} + b_t from h0 (BLOCK_D,)."""
    a = tl.exp2(delta * An[None, :])
    if HAS_RESET:
        a = tl.where(rs[:, None], 0.0, a)
    b = du * Bn[:, None]
    pa, pb = tl.associative_scan((a, b), 0, _lin_comb)
    return a, b, pa * h0[None, :] + pb


@triton.jit
def _reset_steps(rs_ptr, bidx, t, tmask, L, HAS_RESET: tl.constexpr):
    """The resets of a chunk's steps t (T,; int1): resets[b, t] (HAS_RESET; False past the end),
    else a constant False."""
    if HAS_RESET:
        return tl.load(rs_ptr + bidx * L + t, mask=tmask, other=0) != 0
    else:
        return tl.full(t.shape, 0, tl.int1)


@triton.jit
def _reset_counts(rs, T: tl.constexpr, BD: tl.constexpr, SUFFIX: tl.constexpr):
    """A (T, BLOCK_D) tile counting a chunk's resets rs (T,) in (t, chunk end] (SUFFIX; 0: step t
    reaches the chunk's end state) or in [chunk start, t] (0: the chunk's start state reaches step
    t). Whole numbers, exact in float32 (a reset is never an infinite delta: no inf - inf)."""
    r = tl.broadcast_to(tl.where(rs, 1.0, 0.0)[:, None], (T, BD))
    if SUFFIX:
        return tl.flip(tl.cumsum(tl.flip(r, 0), axis=0), 0) - r
    else:
        return tl.cumsum(r, axis=0)


@triton.jit
def _chunk_decay_sum(S, rs, T: tl.constexpr, BD: tl.constexpr, HAS_RESET: tl.constexpr):
    """S_k (BLOCK_D,) as stored for the combine kernels: the chunk's sum of delta, or +inf if the
    chunk has a reset (rs (T,); its decay Q_k is then 0, see _chunk_decay)."""
    if HAS_RESET:
        return tl.where(_row(_reset_counts(rs, T, BD, False), T - 1, T) > 0.0, float("inf"), S)
    else:
        return S


@triton.jit
def _chunk_decay(S, An, HAS_RESET: tl.constexpr):
    """Q_k = exp(A S_k) = exp2(S_k An); 0 for S_k = +inf (a chunk with a reset; even for A = 0)."""
    Q = tl.exp2(S * An)
    if HAS_RESET:
        Q = tl.where(S == float("inf"), 0.0, Q)
    return Q


@triton.jit
def _chunk_steps(K, ST, T: tl.constexpr):
    """(bidx, k, t, tt) of a program of the per-chunk kernels (a 1-D grid of batch × K programs: a
    grid's second and third dimensions stop at 65,535, fewer chunks than 1.35M tokens have): its
    sequence bidx (int64) and chunk k, the chunk's time steps t (T,) and tt = t * ST, the time
    offsets of (T, BLOCK_D) tiles (ST = 1 but opaque: keeps time in registers, see _store_tc).
    The step mask is :func:`_steps_mask`'s."""
    pid = tl.program_id(0)
    bidx = (pid // K).to(tl.int64)
    k = pid % K
    t = k * T + tl.arange(0, T)
    return bidx, k, t, t * ST


@triton.jit
def _steps_mask(t, L, FULL: tl.constexpr):
    """t < L, or a constant True for a chunk known to be whole (FULL): then every mask built from it
    folds away. A mask of T steps costs a GPU thread T predicates, more than it has registers for:
    in a hot loop they are packed into and out of general registers (~60-100 instructions per
    state), so the per-chunk kernels run every chunk but a sequence's last one unmasked."""
    if FULL:
        return tl.full(t.shape, 1, tl.int1)
    else:
        return t < L


@triton.jit
def _channel_block(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, bidx, d0, tt, tmask, DIM, L, BD: tl.constexpr,
                   DFAC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(d, dmask, m, rows, raw, delta) of the channel block d0 .. d0 + BD - 1 of sequence bidx over
    a chunk's steps: the channels d and their mask, the (T, BLOCK_D) tile mask m, the offsets rows
    of the channels' rows of (batch, d_inner, L) series, and the delta tile (see _delta_tile)."""
    d = d0 + tl.arange(0, BD)
    dmask = d < DIM
    m = tmask[:, None] & dmask[None, :]
    rows = (bidx * DIM + d) * L
    raw, delta = _delta_tile(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, rows, bidx * L, d, tt, dmask, tmask, m,
                             DFAC, HAS_BIAS, SOFTPLUS)
    return d, dmask, m, rows, raw, delta


@triton.jit
def _state_ptr(st_ptr, bidx, d, k, n, ssb, ssd, ssk, ssn):
    """Pointers to st[b, d, k, n] (channels d, chunks k) of a states-like (batch, d_inner, n_chunks,
    d_state) tensor of strides ssb, ssd, ssk, ssn (the chunk offset in int64)."""
    return st_ptr + bidx * ssb + d * ssd + k.to(tl.int64) * ssk + n * ssn


@triton.jit
def _start_state(st_ptr, h0_ptr, bidx, k, n, d, dmask, DIM, NS, ssb, ssd, ssk, ssn, HAS_H0: tl.constexpr):
    """State n of the channels d before chunk k: states[b, d, k-1, n] (k > 0, st_ptr not None)
    or the initial state (k = 0)."""
    kk = k + 0 * d  # a tensor: the interpreter mishandles bool-tensor & bool-scalar
    h = tl.zeros((d.shape[0],), dtype=tl.float32)
    if st_ptr is not None:
        h += tl.load(_state_ptr(st_ptr, bidx, d, k - 1, n, ssb, ssd, ssk, ssn), mask=dmask & (kk > 0), other=0.0)
    if HAS_H0:
        h += tl.load(h0_ptr + (bidx * DIM + d) * NS + n, mask=dmask & (kk == 0), other=0.0).to(tl.float32)
    return h


@triton.jit
def _end_carry(dst_ptr, dlast_ptr, bidx, k, n, d, dmask, DIM, NS, K, ssb, ssd, ssk, ssn,
               HAS_DLAST: tl.constexpr):
    """Gradient flowing into chunk k's end state (state n, channels d): E_{k+1} = dst[b, d, k+1, n],
    or dlast for the last chunk (dst_ptr is None for a single chunk)."""
    kk = k + 1 + 0 * d
    E = tl.zeros((d.shape[0],), dtype=tl.float32)
    if dst_ptr is not None:
        E += tl.load(_state_ptr(dst_ptr, bidx, d, k + 1, n, ssb, ssd, ssk, ssn), mask=dmask & (kk < K), other=0.0)
    if HAS_DLAST:
        E += tl.load(dlast_ptr + (bidx * DIM + d) * NS + n, mask=dmask & (kk == K), other=0.0).to(tl.float32)
    return E


@triton.jit
def _adjoint(a, g, E):
    """dh_t = g_t + a_{t+1} dh_{t+1} within the chunk, dh_{T-1} = g_{T-1} + E; (T, BLOCK_D) tiles."""
    _, p, gs = tl.associative_scan((tl.flip(a, 0), a * 0.0 + 1.0, tl.flip(g, 0)), 0, _adj_comb)
    return tl.flip(gs, 0) + tl.flip(p, 0) * E[None, :]


@triton.jit
def _store_series_grad(g, g_ptr, wptr, xptr, pw_ptr, rows, xrow, d, t, dmask, tmask, m, FAC: tl.constexpr):
    """Store the (T, BLOCK_D) gradient g of a series; for a rank-1 series w[d] x[b, t] instead store
    this program's partial sum_t g x into pw_ptr[d] and return sum_d g w (its x-gradient part)."""
    if FAC:
        w = tl.load(wptr + d, mask=dmask, other=0.0).to(tl.float32)
        x = tl.load(xptr + xrow + t, mask=tmask, other=0.0).to(tl.float32)
        tl.store(pw_ptr + d, tl.sum(g * x[:, None], axis=0), mask=dmask)
        return tl.sum(g * w[None, :], axis=1)
    else:
        _store_tc(g_ptr, rows, t, g, m)
        return tl.sum(g, axis=1) * 0.0


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["ST"])
def _fwd_local_kernel(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, st_ptr, dsum_ptr, rs_ptr,
                      DIM, L, NS, K, ssb, ssd, ssk, ssn, ST, T: tl.constexpr, BD: tl.constexpr,
                      DFAC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr):
    """Chunk k's end state from a zero start, s = sum_t exp(A R_t) b_t, into states[:, :, k]; S_k
    into dsum[b, k, :]. With resets only the steps after the chunk's last reset count, and S_k =
    +inf if it has one (Q_k = 0)."""
    bidx, k, t, tt = _chunk_steps(K, ST, T)
    if (k + 1) * T <= L:
        _fwd_local_chunk(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, st_ptr, dsum_ptr, rs_ptr, DIM, L,
                         NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T, BD, DFAC, HAS_BIAS, SOFTPLUS, HAS_RESET, True)
    else:
        _fwd_local_chunk(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, st_ptr, dsum_ptr, rs_ptr, DIM, L,
                         NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T, BD, DFAC, HAS_BIAS, SOFTPLUS, HAS_RESET, False)


@triton.jit
def _fwd_local_chunk(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, st_ptr, dsum_ptr, rs_ptr, DIM, L,
                     NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T: tl.constexpr, BD: tl.constexpr,
                     DFAC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr,
                     FULL: tl.constexpr):
    """_fwd_local_kernel's work on its chunk (FULL: no step past the end, see _steps_mask)."""
    tmask = _steps_mask(t, L, FULL)
    rs = _reset_steps(rs_ptr, bidx, t, tmask, L, HAS_RESET)
    for d0 in range(0, DIM, BD):
        d, dmask, m, rows, _, delta = _channel_block(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, bidx, d0, tt, tmask, DIM,
                                                     L, BD, DFAC, HAS_BIAS, SOFTPLUS)
        u = _load_tc(u_ptr, rows, tt, m)
        suffix = tl.flip(tl.cumsum(tl.flip(delta, 0), axis=0), 0)  # sum_{r >= t}: exact near the chunk end
        rem = suffix - delta
        du = delta * u
        if HAS_RESET:  # b_t reaches the chunk's end only without a reset in (t, end]
            du = tl.where(_reset_counts(rs, T, BD, True) == 0.0, du, 0.0)
        tl.store(dsum_ptr + (bidx * K + k) * DIM + d, _chunk_decay_sum(_row(suffix, 0, T), rs, T, BD, HAS_RESET),
                 mask=dmask)
        for n in range(0, NS):
            An, Bn, Bn2 = _state_rows(A_ptr, B_ptr, B_ptr, bidx, n, d, t, dmask, tmask, NS, L)
            s = tl.sum(tl.exp2(rem * An[None, :]) * du * Bn[:, None], axis=0)
            tl.store(_state_ptr(st_ptr, bidx, d, k, n, ssb, ssd, ssk, ssn), s, mask=dmask)


@triton.jit
def _combine_kernel(st_ptr, dsum_ptr, A_ptr, c_ptr, DIM, NS, K, ssb, ssd, ssk, ssn,
                    KC: tl.constexpr, BD: tl.constexpr, HAS_C: tl.constexpr, REVERSE: tl.constexpr,
                    STAGES: tl.constexpr, HAS_RESET: tl.constexpr):
    """In place on states-like st (state n, channels d), with Q_k = exp(A S_k) (0 for S_k = +inf
    with HAS_RESET: a chunk with a reset) and c the carry:
    forward, st[k] <- Q_k st[k-1] + st[k] for k = 0.. K-1 (st[-1] = c or 0);
    REVERSE, st[k] <- st[k] + Q_k st[k+1] for k = K-1 .. 1 (st[K] = c or 0)."""
    bidx = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    dmask = d < DIM
    An = tl.load(A_ptr + d * NS + n, mask=dmask, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e) A
    carry = tl.zeros((BD,), dtype=tl.float32)
    if HAS_C:
        carry += tl.load(c_ptr + (bidx * DIM + d) * NS + n, mask=dmask, other=0.0).to(tl.float32)
    ntiles = tl.cdiv(K, KC)
    for i in tl.range(0, ntiles, num_stages=STAGES):  # STAGES > 1: the next tiles' loads in flight
        if REVERSE:  # the tile's chunks in reversed order: a forward scan over it runs backwards in k
            kk = (ntiles - 1 - i) * KC + (KC - 1 - tl.arange(0, KC))
            km = (kk < K) & (kk >= 1)
        else:
            kk = i * KC + tl.arange(0, KC)
            km = kk < K
        m = km[:, None] & dmask[None, :]
        ptr = _state_ptr(st_ptr, bidx, d[None, :], kk[:, None], n, ssb, ssd, ssk, ssn)
        s = tl.load(ptr, mask=m, other=0.0)
        S = tl.load(dsum_ptr + (bidx * K + kk[:, None]) * DIM + d[None, :], mask=m, other=0.0)
        pq, ps = tl.associative_scan((_chunk_decay(S, An[None, :], HAS_RESET), s), 0, _lin_comb)
        e = ps + pq * carry[None, :]
        tl.store(ptr, e, mask=m)
        carry = _row(e, KC - 1, KC)


@triton.jit(do_not_specialize=["ST"])
def _fwd_out_kernel(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr,
                    z_ptr, zfw_ptr, zfx_ptr, h0_ptr, st_ptr, y_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, ST,
                    T: tl.constexpr, BD: tl.constexpr, DFAC: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ZFAC: tl.constexpr,
                    HAS_H0: tl.constexpr, WRITE_LAST: tl.constexpr, HAS_RESET: tl.constexpr):
    """y of chunk k, rescanned from the state before it; with WRITE_LAST also states[:, :, k]."""
    bidx, k, t, tt = _chunk_steps(K, ST, T)
    if (k + 1) * T <= L:
        _fwd_out_chunk(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, zfw_ptr,
                       zfx_ptr, h0_ptr, st_ptr, y_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T, BD,
                       DFAC, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, ZFAC, HAS_H0, WRITE_LAST, HAS_RESET, True)
    else:
        _fwd_out_chunk(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, zfw_ptr,
                       zfx_ptr, h0_ptr, st_ptr, y_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T, BD,
                       DFAC, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, ZFAC, HAS_H0, WRITE_LAST, HAS_RESET, False)


@triton.jit
def _fwd_out_chunk(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, zfw_ptr, zfx_ptr,
                   h0_ptr, st_ptr, y_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T: tl.constexpr,
                   BD: tl.constexpr, DFAC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ZFAC: tl.constexpr, HAS_H0: tl.constexpr,
                   WRITE_LAST: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr):
    """_fwd_out_kernel's work on its chunk (FULL: see _steps_mask)."""
    tmask = _steps_mask(t, L, FULL)
    rs = _reset_steps(rs_ptr, bidx, t, tmask, L, HAS_RESET)
    for d0 in range(0, DIM, BD):
        d, dmask, m, rows, _, delta = _channel_block(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, bidx, d0, tt, tmask, DIM,
                                                     L, BD, DFAC, HAS_BIAS, SOFTPLUS)
        u = _load_tc(u_ptr, rows, tt, m)
        du = delta * u
        y = tl.zeros((T, BD), dtype=tl.float32)
        for n in range(0, NS):
            An, Bn, Cn = _state_rows(A_ptr, B_ptr, C_ptr, bidx, n, d, t, dmask, tmask, NS, L)
            h0 = _start_state(st_ptr, h0_ptr, bidx, k, n, d, dmask, DIM, NS, ssb, ssd, ssk, ssn, HAS_H0)
            a, b, h = _scan_states(delta, du, An, Bn, h0, rs, HAS_RESET)
            y += h * Cn[:, None]
            if WRITE_LAST:
                tl.store(_state_ptr(st_ptr, bidx, d, k, n, ssb, ssd, ssk, ssn), _row(h, T - 1, T), mask=dmask)
        if HAS_D:
            y += tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :] * u
        if HAS_Z:
            z = _load_series(z_ptr, zfw_ptr, zfx_ptr, rows, bidx * L, d, tt, dmask, tmask, m, ZFAC)
            y *= z * sigmoid_f32(z)
        _store_tc(y_ptr, rows, tt, y, m)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["ST"])
def _bwd_local_kernel(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, C_ptr, z_ptr, zfw_ptr, zfx_ptr,
                      dout_ptr, dst_ptr, dsum_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, ST,
                      T: tl.constexpr, BD: tl.constexpr, DFAC: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, ZFAC: tl.constexpr, HAS_RESET: tl.constexpr):
    """Gradient w.r.t. chunk k's start state from inside it, r = sum_t exp(A S_t) C_t dy'_t, into
    dst[:, :, k]; S_k into dsum[b, k, :]. With resets only the steps before the chunk's first reset
    count, and S_k = +inf if it has one (Q_k = 0)."""
    bidx, k, t, tt = _chunk_steps(K, ST, T)
    if (k + 1) * T <= L:
        _bwd_local_chunk(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, C_ptr, z_ptr, zfw_ptr, zfx_ptr, dout_ptr,
                         dst_ptr, dsum_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T, BD, DFAC,
                         HAS_BIAS, SOFTPLUS, HAS_Z, ZFAC, HAS_RESET, True)
    else:
        _bwd_local_chunk(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, C_ptr, z_ptr, zfw_ptr, zfx_ptr, dout_ptr,
                         dst_ptr, dsum_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T, BD, DFAC,
                         HAS_BIAS, SOFTPLUS, HAS_Z, ZFAC, HAS_RESET, False)


@triton.jit
def _bwd_local_chunk(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, C_ptr, z_ptr, zfw_ptr, zfx_ptr, dout_ptr, dst_ptr,
                     dsum_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, bidx, k, t, tt, T: tl.constexpr,
                     BD: tl.constexpr, DFAC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_Z: tl.constexpr, ZFAC: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr):
    """_bwd_local_kernel's work on its chunk (FULL: see _steps_mask)."""
    tmask = _steps_mask(t, L, FULL)
    rs = _reset_steps(rs_ptr, bidx, t, tmask, L, HAS_RESET)
    for d0 in range(0, DIM, BD):
        d, dmask, m, rows, _, delta = _channel_block(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, bidx, d0, tt, tmask, DIM,
                                                     L, BD, DFAC, HAS_BIAS, SOFTPLUS)
        _, _, _, dyp = _gated_dy(dout_ptr, z_ptr, zfw_ptr, zfx_ptr, rows, bidx * L, d, tt, dmask, tmask, m,
                                 HAS_Z, ZFAC)
        S = tl.cumsum(delta, axis=0)
        if HAS_RESET:  # the start state reaches step t only without a reset in [start, t]
            dyp = tl.where(_reset_counts(rs, T, BD, False) == 0.0, dyp, 0.0)
        tl.store(dsum_ptr + (bidx * K + k) * DIM + d, _chunk_decay_sum(_row(S, T - 1, T), rs, T, BD, HAS_RESET),
                 mask=dmask)
        for n in range(0, NS):
            An, Cn2, Cn = _state_rows(A_ptr, C_ptr, C_ptr, bidx, n, d, t, dmask, tmask, NS, L)
            r = tl.sum(tl.exp2(S * An[None, :]) * dyp * Cn[:, None], axis=0)
            tl.store(_state_ptr(dst_ptr, bidx, d, k, n, ssb, ssd, ssk, ssn), r, mask=dmask)


@triton.jit(do_not_specialize=["ST", "NS"])
def _bwd_main_kernel(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr,
                     z_ptr, zfw_ptr, zfx_ptr, h0_ptr, st_ptr, dst_ptr, dlast_ptr, dout_ptr,
                     du_ptr, ddelta_ptr, ddx_ptr, dz_ptr, dzx_ptr, dB_ptr, dC_ptr, dh0_ptr, y_ptr,
                     pA_ptr, pv_ptr, rs_ptr, DIM, L, NS, K, ssb, ssd, ssk, ssn, ST,
                     T: tl.constexpr, BD: tl.constexpr, DFAC: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ZFAC: tl.constexpr,
                     HAS_H0: tl.constexpr, HAS_DLAST: tl.constexpr, WANT_H0: tl.constexpr, WANT_Y: tl.constexpr,
                     HAS_RESET: tl.constexpr):
    """Backward through chunk k (see the module docstring), channel block by channel block. Per
    block j: dB, dC go to the partials dB[j], dC[j] (batch, d_state, L) and the factors'
    x-gradients to ddx[j], dzx[j] (batch, L); per program p: pA[p] (d_state, d_inner) = dA and
    pv[p] (4, d_inner) = (dD, ddelta_bias, dw_delta, dw_z). Resets (HAS_RESET) enter through
    a_t = 0 only (see _scan_states): h, dh, dh0 and every gradient follow."""
    bidx, k, t, tt = _chunk_steps(K, ST, T)
    prow = bidx * K + k
    for d0 in range(0, DIM, BD):
        jrow = (d0 // BD) * (tl.num_programs(0) // K) + bidx  # this channel block's row of the (block, batch) partials
        if (k + 1) * T <= L:
            _bwd_channels(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, zfw_ptr,
                          zfx_ptr, h0_ptr, st_ptr, dst_ptr, dlast_ptr, dout_ptr, du_ptr, ddelta_ptr, dz_ptr, dh0_ptr,
                          y_ptr, pA_ptr + prow * NS * DIM, pv_ptr + prow * 4 * DIM, dB_ptr + jrow * NS * L,
                          dC_ptr + jrow * NS * L, ddx_ptr, dzx_ptr, rs_ptr, jrow, bidx, k, t, tt, d0, DIM, L, NS,
                          K, ssb, ssd, ssk, ssn, T, BD, DFAC, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, ZFAC, HAS_H0,
                          HAS_DLAST, WANT_H0, WANT_Y, HAS_RESET, True)
        else:
            _bwd_channels(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, zfw_ptr,
                          zfx_ptr, h0_ptr, st_ptr, dst_ptr, dlast_ptr, dout_ptr, du_ptr, ddelta_ptr, dz_ptr, dh0_ptr,
                          y_ptr, pA_ptr + prow * NS * DIM, pv_ptr + prow * 4 * DIM, dB_ptr + jrow * NS * L,
                          dC_ptr + jrow * NS * L, ddx_ptr, dzx_ptr, rs_ptr, jrow, bidx, k, t, tt, d0, DIM, L, NS,
                          K, ssb, ssd, ssk, ssn, T, BD, DFAC, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, ZFAC, HAS_H0,
                          HAS_DLAST, WANT_H0, WANT_Y, HAS_RESET, False)


@triton.jit
def _bwd_channels(u_ptr, delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, zfw_ptr, zfx_ptr,
                  h0_ptr, st_ptr, dst_ptr, dlast_ptr, dout_ptr, du_ptr, ddelta_ptr, dz_ptr, dh0_ptr, y_ptr,
                  pA_ptr, pv_ptr, dB_ptr, dC_ptr, ddx_ptr, dzx_ptr, rs_ptr, jrow, bidx, k, t, tt, d0, DIM, L, NS,
                  K, ssb, ssd, ssk, ssn, T: tl.constexpr, BD: tl.constexpr, DFAC: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                  ZFAC: tl.constexpr, HAS_H0: tl.constexpr, HAS_DLAST: tl.constexpr, WANT_H0: tl.constexpr,
                  WANT_Y: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr):
    """Backward of chunk k for the channels d = d0 .. d0 + BD - 1: per state n, recompute h, get dh,
    store the rows n of this block's dB, dC partials, this program's dA row n and dh0; then the
    per-channel outputs (FULL: see _steps_mask)."""
    tmask = _steps_mask(t, L, FULL)
    rs = _reset_steps(rs_ptr, bidx, t, tmask, L, HAS_RESET)
    # live across the loop over states: delta, du, dyp and the three sums (u, the raw delta, dout
    # and z are loaded again after it: keeping them would spill registers on a GPU)
    d, dmask, m, rows, _, delta = _channel_block(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, bidx, d0, tt, tmask, DIM, L,
                                                 BD, DFAC, HAS_BIAS, SOFTPLUS)
    du = delta * _load_tc(u_ptr, rows, tt, m)
    _, _, _, dyp = _gated_dy(dout_ptr, z_ptr, zfw_ptr, zfx_ptr, rows, bidx * L, d, tt, dmask, tmask, m, HAS_Z, ZFAC)
    ddA = tl.zeros((T, d.shape[0]), dtype=tl.float32)  # sum_n log2(e) A dh a h_prev
    dhB = tl.zeros((T, d.shape[0]), dtype=tl.float32)  # sum_n dh B
    yp = tl.zeros((T, d.shape[0]), dtype=tl.float32)  # sum_n C h (only needed for dz and y)
    for n in range(0, NS):
        An, Bn, Cn = _state_rows(A_ptr, B_ptr, C_ptr, bidx, n, d, t, dmask, tmask, NS, L)
        h0 = _start_state(st_ptr, h0_ptr, bidx, k, n, d, dmask, DIM, NS, ssb, ssd, ssk, ssn, HAS_H0)
        a, b, h = _scan_states(delta, du, An, Bn, h0, rs, HAS_RESET)
        if HAS_Z or WANT_Y:
            yp += h * Cn[:, None]
        tl.store(dC_ptr + n * L + t, tl.sum(h * dyp, axis=1), mask=tmask)
        ah = h - b  # a_t h_{t-1}
        dh = _adjoint(a, Cn[:, None] * dyp, _end_carry(dst_ptr, dlast_ptr, bidx, k, n, d, dmask, DIM, NS, K,
                                                        ssb, ssd, ssk, ssn, HAS_DLAST))
        tl.store(dB_ptr + n * L + t, tl.sum(dh * du, axis=1), mask=tmask)
        tl.store(pA_ptr + n * DIM + d, tl.sum(dh * ah * delta, axis=0), mask=dmask)
        if WANT_H0:
            tl.store(dh0_ptr + (bidx * DIM + d) * NS + n, _row(a * dh, 0, T), mask=dmask & ((k + 0 * d) == 0))
        ddA += dh * ah * An[None, :]
        dhB += dh * Bn[:, None]
    _bwd_outputs(delta, dyp, ddA, dhB, yp, u_ptr, delta_ptr, bias_ptr, dout_ptr, z_ptr, D_ptr, du_ptr, ddelta_ptr,
                 dz_ptr, y_ptr, dfw_ptr, dfx_ptr, zfw_ptr, zfx_ptr, pv_ptr, ddx_ptr, dzx_ptr, jrow, rows, bidx, d, tt, dmask,
                 tmask, m, DIM, L, DFAC, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, ZFAC, WANT_Y)


@triton.jit
def _bwd_outputs(delta, dyp, ddA, dhB, yp, u_ptr, delta_ptr, bias_ptr, dout_ptr, z_ptr, D_ptr, du_ptr, ddelta_ptr,
                 dz_ptr, y_ptr, dfw_ptr, dfx_ptr, zfw_ptr, zfx_ptr, pv_ptr, ddx_ptr, dzx_ptr, jrow, rows, bidx, d, t,
                 dmask, tmask, m, DIM, L, DFAC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ZFAC: tl.constexpr, WANT_Y: tl.constexpr):
    """du, ddelta (or its factor partials), dz (likewise), y and pv = (dD, ddelta_bias, dw_delta,
    dw_z) for the channels d, from the sums over states ddA, dhB, yp (u, the raw delta, dout and z
    are loaded again here)."""
    u = _load_tc(u_ptr, rows, t, m)
    raw, _ = _delta_tile(delta_ptr, dfw_ptr, dfx_ptr, bias_ptr, rows, bidx * L, d, t, dmask, tmask, m, DFAC, HAS_BIAS,
                         False)
    dout, z, sz, _ = _gated_dy(dout_ptr, z_ptr, zfw_ptr, zfx_ptr, rows, bidx * L, d, t, dmask, tmask, m, HAS_Z, ZFAC)
    Dv = tl.zeros((d.shape[0],), dtype=tl.float32)
    if HAS_D:
        Dv += tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    _store_tc(du_ptr, rows, t, delta * dhB + Dv[None, :] * dyp, m)
    ddelta = ddA * 0.6931471805599453 + u * dhB  # ln(2): An = log2(e) A
    if SOFTPLUS:
        ddelta *= tl.where(raw > 20.0, 1.0, sigmoid_f32(raw))
    ddelta = tl.where(m, ddelta, 0.0)
    px = _store_series_grad(ddelta, ddelta_ptr, dfw_ptr, dfx_ptr, pv_ptr + 2 * DIM, rows, bidx * L, d, t, dmask,
                            tmask, m, DFAC)
    if DFAC:
        tl.store(ddx_ptr + jrow * L + t, px, mask=tmask)
    if HAS_Z or WANT_Y:  # the ungated output y_pre, for dz = dout y_pre silu'(z) and y
        y = yp + Dv[None, :] * u
        if HAS_Z:
            dz = tl.where(m, dout * y * sz * (1.0 + z * (1.0 - sz)), 0.0)
            pz = _store_series_grad(dz, dz_ptr, zfw_ptr, zfx_ptr, pv_ptr + 3 * DIM, rows, bidx * L, d, t, dmask,
                                    tmask, m, ZFAC)
            if ZFAC:
                tl.store(dzx_ptr + jrow * L + t, pz, mask=tmask)
            y *= z * sz
        if WANT_Y:
            _store_tc(y_ptr, rows, t, y, m)
    tl.store(pv_ptr + d, tl.sum(dyp * u, axis=0), mask=dmask)
    tl.store(pv_ptr + DIM + d, tl.sum(ddelta, axis=0), mask=dmask)


# ---------------------------------------------------------------------------------------------
# Python side
# ---------------------------------------------------------------------------------------------


def _chunk_len(length: int, chunk: int) -> int:
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    return max(1, min(chunk, triton.next_power_of_2(max(length, 1))))


def gpu_tiling(device: torch.device) -> bool:
    """Whether launches on ``device`` get the GPU tiling (channel blocks of one warp) rather than
    the interpreter's (all channels at once): on CUDA tensors. ``benchmarks/triton_compile.py``
    replaces it to compile the GPU tiling from CPU tensors."""
    return device.type == "cuda"


def _tiles(dim: int, T: int, device: torch.device, block_d: Optional[int] = None,
           num_warps: Optional[int] = None) -> Tuple[int, int]:
    """(BLOCK_D, num_warps) of the per-chunk kernels. On a GPU: _T_PER_THREAD time steps per thread
    (more go across warps, with a slower cross-warp scan), BLOCK_D = 32 channels across the lanes
    of a warp by default (sums over channels stay within a warp); under the interpreter all
    channels (up to 64) at once. ``num_warps`` overrides the warps (a power of two; fewer than
    BLOCK_D / 32 puts several channels on a lane: fewer shuffles per channel in the backward's sums
    over channels, more registers per tile)."""
    along_t = max(1, T // _T_PER_THREAD)
    if block_d is None:
        block_d = 32 if gpu_tiling(device) else 64
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two, got {block_d}")
    block_d = min(block_d, triton.next_power_of_2(dim))
    if num_warps is not None:
        if num_warps < 1 or num_warps & (num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {num_warps}")
        return block_d, num_warps
    return block_d, max(1, block_d // 32) * along_t


def _scan_sizes(u: Tensor, A: Tensor, chunk: int, block_d: Optional[int], num_warps: Optional[int] = None):
    """(batch, d_inner, L, d_state, T, K, BLOCK_D, num_warps) of a scan of u (batch, d_inner, L) with
    A (d_inner, d_state): the chunk length T (:func:`_chunk_len`), the number of chunks K and the
    tiling of the per-chunk kernels (:func:`_tiles`)."""
    batch, dim, length = u.shape
    T = _chunk_len(length, chunk)
    bd, warps = _tiles(dim, T, u.device, block_d, num_warps)
    return batch, dim, length, A.shape[1], T, triton.cdiv(length, T), bd, warps


def _combine(st: Tensor, dsum: Tensor, A: Tensor, carry: Optional[Tensor], reverse: bool, resets: bool) -> None:
    """Launch _combine_kernel on st (a (batch, d_inner, n_chunks, d_state) view), one program per
    (sequence, state, channel block); ``resets``: dsum may hold +inf (chunks with a reset)."""
    batch, dim, nchunks, ns = st.shape
    kc = min(_KC, triton.next_power_of_2(nchunks))
    bd = min(_KC_BD if gpu_tiling(st.device) else 64, triton.next_power_of_2(dim))
    warps = max(1, bd // 32) * max(1, kc // _T_PER_THREAD)
    _combine_kernel[(batch, ns, triton.cdiv(dim, bd))](st, dsum, A, carry, dim, ns, nchunks, *st.stride(), KC=kc,
                                                       BD=bd, HAS_C=carry is not None, REVERSE=reverse,
                                                       STAGES=COMBINE_STAGES, HAS_RESET=resets, num_warps=warps)


def _states_buffer(batch: int, dim: int, nchunks: int, ns: int, device) -> Tensor:
    """A (batch, d_inner, n_chunks, d_state) float32 view of (batch, n_chunks, d_state, d_inner)
    memory (channel-contiguous for the kernels)."""
    return torch.empty(batch, nchunks, ns, dim, dtype=torch.float32, device=device).permute(0, 3, 1, 2)


def on_device(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().contiguous()


def _fac(fac) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    return (None, None) if fac is None else (_c(fac[0]), _c(fac[1]))


def _resets(resets: Optional[Tensor], batch: int, length: int) -> Optional[Tensor]:
    """``resets`` (bool (batch, L)) as the kernels read it: contiguous uint8 (1: a reset); a
    contiguous bool tensor is reinterpreted in place (a view: no copy, no kernel launch)."""
    if resets is None:
        return None
    if tuple(resets.shape) != (batch, length):
        raise ValueError(f"resets must have shape (batch, L) = {(batch, length)}, got {tuple(resets.shape)}")
    resets = resets.detach().contiguous()
    return resets.view(torch.uint8) if resets.dtype == torch.bool else resets.to(torch.uint8)


def scan_forward(u: Tensor, delta: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                 z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                 initial_state: Optional[Tensor] = None, dfac=None, zfac=None, chunk: int = CHUNK,
                 last_out: Optional[Tensor] = None, block_d: Optional[int] = None, num_warps: Optional[int] = None,
                 resets: Optional[Tensor] = None):
    """Forward scan, no autograd. Returns ``(y, states, last)``.

    Layouts as :func:`selective_scan_triton` (``B``, ``C``: (batch, d_state, L)). ``dfac`` /
    ``zfac``: ``(w (d_inner,), x (batch, L))`` give ``delta`` / ``z`` as the rank-1 product
    ``w[d] x[b, t]`` (``delta`` / ``z`` are then None; bias and softplus still apply to delta).
    ``y`` has u's dtype; ``states`` (batch, d_inner, n_chunks, d_state) float32 (a strided view)
    holds the state at the end of every chunk of ``_chunk_len(L, chunk)`` steps (pass it to
    :func:`scan_backward`); ``last`` = ``states[:, :, -1]`` (a view; or ``last_out``, a float32
    (batch, d_inner, d_state) buffer the last state is written into). ``block_d``: channels per
    inner step, ``num_warps``: warps per program (powers of two; default: see :func:`_tiles`).
    ``resets``: bool (batch, L) or None, the steps where the recurrence restarts
    (:func:`selective_scan_triton`)."""
    batch, dim, length, ns, T, K, bd, warps = _scan_sizes(u, A, chunk, block_d, num_warps)
    dev = u.device
    u, delta, A, B, C, D, z, bias, h0 = map(_c, (u, delta, A, B, C, D, z, delta_bias, initial_state))
    rs = _resets(resets, batch, length)
    (dfw, dfx), (zfw, zfx) = _fac(dfac), _fac(zfac)
    y = torch.empty(batch, dim, length, dtype=u.dtype, device=dev)
    if length == 0:
        last = h0.float().clone() if h0 is not None else torch.zeros(batch, dim, ns, device=dev)
        return y, _states_buffer(batch, dim, 0, ns, dev), (last if last_out is None else last_out.copy_(last))
    if K == 1 and last_out is not None and last_out.is_contiguous() and last_out.dtype == torch.float32:
        states = last_out.view(batch, dim, 1, ns)  # streaming: the kernel writes the state in place
    else:
        states = _states_buffer(batch, dim, K, ns, dev)
    flags = dict(T=T, BD=bd, DFAC=dfac is not None, HAS_BIAS=bias is not None, SOFTPLUS=bool(delta_softplus),
                 HAS_RESET=rs is not None, num_warps=warps)
    with on_device(dev):
        if K > 1:  # chunk end states: local ends, then their combination (launches 1 and 2)
            dsum = torch.empty(batch, K, dim, dtype=torch.float32, device=dev)
            _fwd_local_kernel[(batch * K,)](u, delta, dfw, dfx, bias, A, B, states, dsum, rs, dim, length, ns, K,
                                          *states.stride(), 1, **flags)
            _combine(states, dsum, A, h0, reverse=False, resets=rs is not None)
        _fwd_out_kernel[(batch * K,)](u, delta, dfw, dfx, bias, A, B, C, D, z, zfw, zfx, h0, states, y, rs, dim,
                                    length, ns, K, *states.stride(), 1, HAS_D=D is not None,
                                    HAS_Z=z is not None or zfac is not None, ZFAC=zfac is not None,
                                    HAS_H0=h0 is not None, WRITE_LAST=K == 1, **flags)
    last = states[:, :, K - 1]
    if last_out is not None:
        last = last_out if states.data_ptr() == last_out.data_ptr() else last_out.copy_(last)
    return y, states, last


def scan_backward(u: Tensor, delta: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                  initial_state: Optional[Tensor], states: Optional[Tensor], dout: Tensor,
                  dlast: Optional[Tensor] = None, want_h0: bool = False, want_y: bool = False, dfac=None, zfac=None,
                  chunk: int = CHUNK, block_d: Optional[int] = None, num_warps: Optional[int] = None,
                  resets: Optional[Tensor] = None):
    """Backward scan, no autograd; the inputs and tiling of :func:`scan_forward`, its ``states``
    (unused, may be None, for a single chunk), the gradients ``dout`` of ``y`` and ``dlast`` (or
    None) of the last state, and the ``resets`` of the forward.

    Returns ``(du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, y)``: ``du``, ``ddelta``, ``dz`` in the
    dtypes of ``u``, ``delta``, ``z``; ``dB``, ``dC`` (batch, d_state, L), ``dA``, ``dD``,
    ``dbias``, ``dh0`` float32. With factors, ``ddelta`` / ``dz`` are the float32 pairs
    ``(dw, dx)`` of gradients of the factors. ``dz`` is None without z; ``dh0`` unless ``want_h0``
    and ``y`` (float32, recomputed, gated) unless ``want_y`` are None."""
    batch, dim, length, ns, T, K, bd, warps = _scan_sizes(u, A, chunk, block_d, num_warps)
    dev = u.device
    nblk = triton.cdiv(dim, bd)
    u, delta, A, B, C, D, z, bias, h0, dout, dlast = map(
        _c, (u, delta, A, B, C, D, z, delta_bias, initial_state, dout, dlast))
    rs = _resets(resets, batch, length)
    (dfw, dfx), (zfw, zfx) = _fac(dfac), _fac(zfac)
    f32 = dict(dtype=torch.float32, device=dev)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta) if delta is not None else None
    dz = torch.empty_like(z) if z is not None else None
    ddx = torch.empty(nblk, batch, length, **f32) if dfac is not None else None  # partials per channel block
    dzx = torch.empty(nblk, batch, length, **f32) if zfac is not None else None
    dB, dC = torch.empty(nblk, batch, ns, length, **f32), torch.empty(nblk, batch, ns, length, **f32)
    dh0 = torch.zeros(batch, dim, ns, **f32) if want_h0 else None
    y = torch.empty(batch, dim, length, **f32) if want_y else None
    pA, pv = torch.empty(batch * K, ns, dim, **f32), torch.zeros(batch * K, 4, dim, **f32)  # per-program partials
    flags = dict(T=T, BD=bd, DFAC=dfac is not None, HAS_BIAS=bias is not None, SOFTPLUS=bool(delta_softplus),
                 HAS_Z=z is not None or zfac is not None, ZFAC=zfac is not None, HAS_RESET=rs is not None,
                 num_warps=warps)
    if length == 0 and want_h0 and dlast is not None:
        dh0 = dlast.float().clone()
    st = states if K > 1 else None
    dst = torch.empty_like(states) if K > 1 else None  # E_k per chunk (only with several chunks)
    with on_device(dev):
        if K > 1:
            dsum = torch.empty(batch, K, dim, **f32)
            _bwd_local_kernel[(batch * K,)](delta, dfw, dfx, bias, A, C, z, zfw, zfx, dout, dst, dsum, rs, dim, length,
                                          ns, K, *dst.stride(), 1, **flags)
            _combine(dst, dsum, A, dlast, reverse=True, resets=rs is not None)
        if length > 0:
            _bwd_main_kernel[(batch * K,)](
                u, delta, dfw, dfx, bias, A, B, C, D, z, zfw, zfx, h0, st, dst, dlast, dout,
                du, ddelta, ddx, dz, dzx, dB, dC, dh0, y, pA, pv, rs, dim, length, ns, K,
                *(st.stride() if st is not None else (0, 0, 0, 0)), 1, HAS_D=D is not None, HAS_H0=h0 is not None,
                HAS_DLAST=dlast is not None, WANT_H0=want_h0, WANT_Y=want_y, **flags)
    dD, dbias, ddw, dzw = pv.sum(0).unbind(0)
    if dfac is not None:
        ddelta = (ddw, ddx.sum(0))
    if zfac is not None:
        dz = (dzw, dzx.sum(0))
    return du, ddelta, pA.sum(0).t(), dB.sum(0), dC.sum(0), dD, dz, dbias, dh0, y


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state,  # type: ignore[override]
                softplus, chunk, block_d, num_warps, last_out, resets):
        y, states, last = scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state,
                                       chunk=chunk, last_out=last_out[0], block_d=block_d, num_warps=num_warps,
                                       resets=resets)
        ctx.set_materialize_grads(False)
        # one chunk (streaming): the backward starts from initial_state; states may be last_out
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                              states if states.shape[2] > 1 else None, resets)
        ctx.softplus, ctx.chunk, ctx.block_d, ctx.num_warps = softplus, chunk, block_d, num_warps
        return y, (last if last_out[0] is not None else last.clone())

    @staticmethod
    def backward(ctx, dy, dlast):  # type: ignore[override]
        u, delta, A, B, C, D, z, bias, h0, states, resets = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, _ = scan_backward(
            u, delta, A, B, C, D, z, bias, ctx.softplus, h0, states, dy, dlast,
            want_h0=h0 is not None and ctx.needs_input_grad[8], chunk=ctx.chunk, block_d=ctx.block_d,
            num_warps=ctx.num_warps, resets=resets)
        cast = lambda g, x: None if x is None or g is None else g.to(x.dtype)  # noqa: E731
        return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, bias), cast(dh0, h0),
                None, None, None, None, None, None)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                          z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = False, return_last_state: bool = False,
                          initial_state: Optional[Tensor] = None, last_out: Optional[Tensor] = None,
                          chunk: int = CHUNK, block_d: Optional[int] = None, num_warps: Optional[int] = None,
                          resets: Optional[Tensor] = None):
    """Selective scan with the Triton kernels; signature and results of
    :func:`fsg.ssm.reference.selective_scan_ref` (``y`` in u's dtype, the last state float32),
    differentiable w.r.t. every tensor input. ``last_out``: a float32 (batch, d_inner, d_state)
    buffer to receive the last state (streaming; it must not be needed by anything else).
    ``chunk``, ``block_d``, ``num_warps``: tiling (powers of two; see :func:`scan_forward`). float64
    inputs go to the reference.

    ``resets`` (bool (batch, L) or None): the recurrence restarts at the marked steps, ``h_t = b_t``
    there (``a_t = 0``), so several sequences packed one after the other scan in one launch, each
    from a zero state: a chunk's end state sums only its steps after its last reset, its
    gradient w.r.t. its start state only its steps before its first reset, and the decay ``Q_k``
    of a chunk with a reset is 0 (its ``S_k`` is stored as +inf)."""
    from fsg.ssm.reference import check_scan_shapes, selective_scan_ref

    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, resets)
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    if any(t.dtype == torch.float64 for t in tensors):
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  return_last_state=return_last_state, initial_state=initial_state, resets=resets)
    # the buffer travels inside a list: autograd must not treat it as an input
    y, last = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), int(chunk),
                                block_d, num_warps, [last_out], resets)
    return (y, last) if return_last_state else y


def _lowmem_forward(u, delta, A, B, C, D, z, bias, dfac, zfac, resets=None):
    """:class:`fsg.ssm.lowmem.ScanKernels` ``forward`` with the Triton kernels."""
    y, states, _ = scan_forward(u, delta, A, B, C, D, z, bias, True, None, dfac=dfac, zfac=zfac, resets=resets)
    return y, states


def _lowmem_backward(u, delta, A, B, C, D, z, bias, states, dy, dfac, zfac, resets=None):
    """:class:`fsg.ssm.lowmem.ScanKernels` ``backward`` with the Triton kernels."""
    du, ddelta, dA, dB, dC, dD, dz, dbias, _, y = scan_backward(u, delta, A, B, C, D, z, bias, True, None, states, dy,
                                                               want_y=True, dfac=dfac, zfac=zfac, resets=resets)
    return du, ddelta, dA, dB, dC, dD, dz, dbias, y


#: The Triton kernels for :class:`fsg.ssm.lowmem.MambaLowMemory`.
LOW_MEMORY_KERNELS = ScanKernels(_lowmem_forward, _lowmem_backward)


def mamba_low_memory_triton(block, x: Tensor, resets: Optional[Tensor] = None) -> Optional[Tensor]:
    """The ``"triton"`` backend's ``mamba_low_memory`` op: ``block(x)`` keeping only ``x`` and the
    scan's chunk states (:class:`fsg.ssm.lowmem.MambaLowMemory`; the scan's forward runs once, not
    twice as in a checkpointed block), or None for float64 (the reference then checkpoints; with
    ``resets`` the caller must pass them on). ``resets``: bool (batch, L) or None, where the scan's
    recurrence restarts (see :func:`selective_scan_triton`; the convolution is not reset)."""
    if any(t.dtype == torch.float64 for t in [x, *block.parameters()]):
        return None
    return mamba_low_memory(block, x, LOW_MEMORY_KERNELS, resets)
