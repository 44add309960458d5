"""The streaming slow-net's carried state in 16 bits (FSG ``state_dtype``; ``Mamba.stream``'s
``state_dtype`` / ``low_memory`` / ``in_place``; the step kernels' storage formats): rounding
semantics against float32, the C kernels against the reference, the in-place single-copy update,
FSG training and exact resume."""

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch

import fsg
from fsg import ssm
from fsg.ssm.mamba import Mamba
from fsg.ssm import cpu
from fsg.ssm.reference import selective_scan_ref

from conftest import finish_after_a_meta_step, make_mlp, make_task

needs_kernel = pytest.mark.skipif(not cpu.available(), reason=f"fused kernels unavailable: {cpu.build_error()}")

pytestmark = pytest.mark.usefixtures("one_thread")

HALF = [torch.bfloat16, torch.float16]
#: unit roundoff of the 16-bit types (8 and 11 significant bits)
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def step_inputs(batch=40, dim=12, dstate=16, length=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"u": r(batch, dim, length), "delta": 0.5 * r(batch, dim, length), "A": -torch.rand(dim, dstate, generator=g) * 3,
            "B": r(batch, dstate, length), "C": r(batch, dstate, length), "D": r(dim), "z": r(batch, dim, length),
            "delta_bias": 0.1 * r(dim)}


def run_step(backend, inp, h0, state_dtype, gy):
    """(y, last, gradients of every input) of one streaming step through fsg.ssm.selective_scan_step."""
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    with ssm.use_backend(backend):
        y, last = ssm.selective_scan_step(**leaves, delta_softplus=True, return_last_state=True, initial_state=h0,
                                          state_dtype=state_dtype)
    grads = torch.autograd.grad((y * gy).sum(), [leaves[k] for k in NAMES])
    return y.detach(), last, dict(zip(NAMES, grads))


def backends():
    return ["cpu", "reference"] if cpu.available() else ["reference"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# the conversions


@needs_kernel
@pytest.mark.parametrize("dtype,portable", [(torch.bfloat16, False), (torch.float16, False), (torch.float16, True)])
def test_kernel_conversions_are_torchs(dtype, portable):
    """float32 → 16 bits rounds to nearest even exactly as ``.to(dtype)`` (normals, ties, float16
    subnormals, overflow to inf, signed zeros); 16 bits → float32 is exact for every bit pattern."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * 10.0 ** torch.randint(-12, 8, (200_000,), generator=g).float()
    ties = torch.arange(0, 1 << 16, dtype=torch.int32) << 16 | (1 << 15)  # exactly halfway between two bfloat16
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, -70000.0, 6.1e-5,
                            5.96e-8, 2.98e-8, 2.9802323e-8, 1e-30, 3.4e38, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11])
    x = torch.cat([x, special, ties.view(torch.float32)])
    x = x[x.isfinite() | x.isinf()]
    got = cpu.state_convert(x, dtype, portable)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), x.to(dtype).view(torch.int16))
    assert cpu.state_convert(torch.tensor([float("nan")]), dtype, portable).isnan().all()
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    back, ref = cpu.state_convert(every, torch.float32, portable), every.float()
    nan = ref.isnan()
    assert torch.equal(back[~nan], ref[~nan]) and back[nan].isnan().all()


# ----------------------------------------------------------------------------------------------
# one step: 16-bit storage against float32


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("length", [1, 3])
def test_16bit_step_is_the_float32_step_from_the_stored_state_rounded(backend, dtype, length):
    """The arithmetic is float32: from a 16-bit state the step gives exactly what a float32 step
    gives from the widened state — same y, same gradients (the backward reads the very state the
    forward read) — and stores that step's new state rounded to nearest even."""
    inp = step_inputs(length=length, seed=length)
    h16 = torch.randn(40, 12, 16, generator=torch.Generator().manual_seed(9)).to(dtype)
    gy = torch.randn(40, 12, length, generator=torch.Generator().manual_seed(5))
    y, last, g = run_step(backend, inp, h16, dtype, gy)
    # the float32 state requiring grad: the kernel's backward reads the old state (as the 16-bit
    # step's does) rather than the new one (see test_float32_step_backward_from_the_new_state)
    y32, last32, g32 = run_step(backend, inp, h16.float().requires_grad_(), None, gy)
    assert last.dtype == dtype and last32.dtype == torch.float32
    assert torch.equal(last, last32.to(dtype))
    assert torch.equal(y, y32)
    for k in NAMES:
        assert torch.equal(g[k], g32[k]), k


@needs_kernel
@pytest.mark.parametrize("with_state", [True, False])
def test_float32_step_backward_from_the_new_state(with_state):
    """A float32 step whose old state needs no gradient (streaming) back-propagates from the new
    state h₁ the forward wrote, since exp(Δ·A)·h₀ = h₁ − Δ·u·B: no exp, h₀ not read. Against the
    float64 reference (≤ 1e-6 relatively: float32 rounding, plus the cancellation in h₁ − Δ·u·B)
    and against the kernel's backward from h₀ (forced by h₀ requiring grad); and a new state
    changed in place before the backward pass is an error, not a wrong gradient."""
    inp = step_inputs(seed=7, dstate=17)
    h0 = torch.randn(40, 12, 17, generator=torch.Generator().manual_seed(8)) if with_state else None
    gy = torch.randn(40, 12, 1, generator=torch.Generator().manual_seed(5))
    y, last, g = run_step("cpu", inp, h0, None, gy)
    ref = run_step("reference", {k: v.double() for k, v in inp.items()}, None if h0 is None else h0.double(), None,
                   gy.double())
    assert rel(y, ref[0]) <= 1e-6 and rel(last, ref[1]) <= 1e-6
    for k in NAMES:
        assert rel(g[k], ref[2][k]) <= 1e-6, (k, rel(g[k], ref[2][k]))
    if h0 is not None:
        old = run_step("cpu", inp, h0.clone().requires_grad_(), None, gy)[2]
        for k in NAMES:
            assert rel(g[k], old[k]) <= 1e-6, (k, rel(g[k], old[k]))
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    with ssm.use_backend("cpu"):
        y, last = ssm.selective_scan_step(**leaves, delta_softplus=True, return_last_state=True, initial_state=h0)
    last.mul_(2)  # e.g. a caller reusing the buffer too early
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", HALF)
def test_16bit_step_against_float32_state_within_the_rounding_bound(backend, dtype):
    """Against the float32 step from the unrounded float32 state h: the old state differs by at
    most eps·|h| (eps = 2^-8 bfloat16, 2^-11 float16), the decay exp(Δ·A) ≤ 1 carries that into
    the new state, which is rounded once more: |h16' − h32'| ≤ eps·(|h32'| + |h|) per element;
    y = silu(z)·(Σ_n C_n h_n' + D u) then differs by at most eps·|silu(z)|·Σ_n |C_n|·(|h32'_n| + |h_n|);
    the gradients (which depend on the state through h' and the decay) by a few eps relatively."""
    eps = EPS[dtype]
    inp = step_inputs(seed=3)
    h32 = torch.randn(40, 12, 16, generator=torch.Generator().manual_seed(4))
    gy = torch.randn(40, 12, 1, generator=torch.Generator().manual_seed(5))
    y, last, g = run_step(backend, inp, h32.to(dtype), dtype, gy)
    y32, last32, g32 = run_step(backend, inp, h32, None, gy)
    tiny = 1e-6  # float32 noise of the two computations
    bound = eps * (last32.abs() + h32.abs()) + tiny
    assert ((last.float() - last32).abs() <= bound).all()
    # and the new state is within one 16-bit ulp of the float32 new state wherever the old rounding is
    # negligible beside it (no cancellation in h' = a·h + Δ·B·u)
    ulp = 2 * eps * last32.abs()
    safe = h32.abs() * eps < 0.05 * ulp
    assert ((last.float() - last32).abs() <= ulp + tiny)[safe].all()
    z = inp["z"]
    gate = (z * torch.sigmoid(z)).abs()[..., 0]
    ybound = eps * gate * torch.einsum("bn,bdn->bd", inp["C"][..., 0].abs(), last32.abs() + h32.abs()) + tiny
    assert ((y - y32).abs()[..., 0] <= ybound).all()
    for k in NAMES:
        assert rel(g[k], g32[k]) <= 4 * eps, (k, rel(g[k], g32[k]))


@needs_kernel
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("length", [1, 3])
def test_16bit_step_c_kernels_against_the_reference(dtype, length):
    """Same stored state: the C kernels and the reference agree in float32 tolerance; the stored new
    states are equal or one 16-bit ulp apart (their float32 values differ in the last bits; plus
    float32 noise where the new state is a cancellation, |h'| ≪ |h|)."""
    inp = step_inputs(batch=300, dim=20, length=length, seed=11)
    h = torch.randn(300, 20, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    gy = torch.randn(300, 20, length, generator=torch.Generator().manual_seed(5))
    y, last, g = run_step("cpu", inp, h, dtype, gy)
    yr, lastr, gr = run_step("reference", inp, h, dtype, gy)
    assert rel(y, yr) <= 1e-5
    for k in NAMES:
        assert rel(g[k], gr[k]) <= 1e-5, k
    assert last.dtype == lastr.dtype == dtype
    if dtype == torch.float32:
        assert rel(last.detach(), lastr.detach()) <= 1e-5
        return
    diff = (last.detach().float() - lastr.detach().float()).abs()
    ulp = 2 * EPS[dtype] * torch.maximum(last.detach().float().abs(), lastr.detach().float().abs())
    assert (diff <= ulp + 1e-6).all()
    assert (diff == 0).float().mean() > 0.99


def test_backend_without_16bit_support_emulates_the_semantics():
    """A user backend whose step op knows nothing of state_dtype: the dispatcher widens the stored
    state and rounds the new one — the reference's numbers."""
    ssm.register_backend(ssm.Backend("plain-user", selective_scan=selective_scan_ref))
    try:
        inp = step_inputs(seed=1)
        h = torch.randn(40, 12, 16).to(torch.bfloat16)
        gy = torch.randn(40, 12, 1)
        y, last, g = run_step("plain-user", inp, h, torch.bfloat16, gy)
        yr, lastr, gr = run_step("reference", inp, h, torch.bfloat16, gy)
        assert torch.equal(y, yr) and torch.equal(last, lastr)
    finally:
        ssm.unregister_backend("plain-user")


def test_compute_dtype_state_is_the_plain_step_and_keeps_last_out():
    """state_dtype equal to the compute dtype (float32, e.g. FSG's float32 stream on a backend
    without the low-memory step) is the plain step: a backend's op gets ``last_out`` (the spare
    state buffer) and no state_dtype, whether it supports 16-bit states or not."""
    seen = []

    def op(u, delta, A, B, C, last_out=None, **kw):
        seen.append((last_out, "state_dtype" in kw))
        return selective_scan_ref(u, delta, A, B, C, **kw)

    ssm.register_backend(ssm.Backend("step-user", selective_scan=selective_scan_ref, selective_scan_step=op))
    try:
        inp = step_inputs(seed=2)
        buf = torch.empty(40, 12, 16)
        with ssm.use_backend("step-user"):
            y, last = ssm.selective_scan_step(**inp, delta_softplus=True, return_last_state=True,
                                              initial_state=torch.randn(40, 12, 16), last_out=buf,
                                              state_dtype=torch.float32)
        assert seen == [(buf, False)]
    finally:
        ssm.unregister_backend("step-user")


# ----------------------------------------------------------------------------------------------
# Mamba.stream: the low-memory, in-place step


def stream_run(m, xs, *, backend="auto", **kw):
    """Stream the chunks xs through m (first chunk with a gradient-carrying input, like the LRE
    token), back-propagating a fixed random cotangent after each call; returns the outputs, every
    gradient (parameters and first input) and the final state."""
    state, outs, grads = None, [], []
    gen = torch.Generator().manual_seed(7)
    with ssm.use_backend(backend):
        for i, x in enumerate(xs):
            x = x.clone().requires_grad_(i == 0)
            res = m.stream(x, state, **kw)
            out, state, finish = res if len(res) == 3 else (*res, None)
            m.zero_grad()
            (out * torch.randn(out.shape, generator=gen)).sum().backward()
            if finish is not None:
                finish()
            outs.append(out.detach())
            grads.append([p.grad.clone() for p in m.parameters()] + ([x.grad] if i == 0 else []))
    return outs, grads, state


def stream_chunks(batch=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 2, 1, generator=g)] + [torch.randn(batch, 1, 1, generator=g) for _ in range(4)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_low_memory_in_place_stream_equals_the_plain_stream(monkeypatch, dtype):
    """The low-memory, in-place step (slices of a few rows here: every path of the first,
    two-token call is cut; the one-token calls run the fused block kernels) gives the plain
    step's outputs and gradients in float32 tolerance and the same stored state up to the
    rounding of the projections (computed in torch there, in the kernel here: a 16-bit state
    then differs by at most a unit or two in its last place); one copy: the state tensor is
    updated in place. The new state the backward kernel writes in place is bit for bit the one
    the forward kernel writes out of place."""
    monkeypatch.setattr(cpu, "_SLICE_BYTES", 4 * 8 * 16 * 5)  # 5 rows a slice
    torch.manual_seed(0)
    m = Mamba(d_model=1, d_state=16, d_conv=4, expand=8)
    xs = stream_chunks()
    ref_out, ref_grads, ref_state = stream_run(m, xs, state_dtype=dtype)
    out, grads, state = stream_run(m, xs, state_dtype=dtype, low_memory=True, in_place=True)
    assert state[1].dtype == dtype and torch.equal(state[0], ref_state[0])
    scale = ref_state[1].float().abs().max().item()  # absolute: components that nearly cancel
    torch.testing.assert_close(state[1].float(), ref_state[1].float(), rtol=4 * EPS.get(dtype, 2.0 ** -24),
                               atol=1e-5 * scale)
    assert torch.equal(stream_run(m, xs, state_dtype=dtype, low_memory=True)[2][1], state[1])
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(grads, ref_grads):
        for a, b in zip(ga, gb):
            assert rel(a, b) <= 1e-5
    # in place: one state tensor from the second call on
    st = m.stream(xs[0], None, state_dtype=dtype, low_memory=True, in_place=True)[1]
    ptr = st[1].data_ptr()
    for x in xs[1:]:
        out, st, finish = m.stream(x, st, state_dtype=dtype, low_memory=True, in_place=True)
        out.sum().backward()
        finish()
        assert st[1].data_ptr() == ptr


@needs_kernel
@pytest.mark.parametrize("d_state,d_conv,x_grad", [(16, 4, True), (17, 3, False)])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_fused_block_step_against_the_float64_reference(monkeypatch, d_state, d_conv, x_grad, dtype, in_place):
    """The one-token low-memory step of a d_model = 1 block (``fsg_stream_block_*``: the
    projections, the scan step and out_proj in one kernel, forward and backward) against the
    reference backend's plain step in float64 from the same stored state: the output, every
    gradient (parameters, and the input's where it requires one) to ≤ 1e-5 relative, and the
    new state to the rounding of its dtype. In place the backward writes the new state; out of
    place the forward does, and a float32 backward then reads it instead of the old state (no
    ``exp``): changing it in place before the backward pass raises."""
    calls = []
    monkeypatch.setattr(cpu, "_block_step_bwd", lambda *a, _f=cpu._block_step_bwd: calls.append(1) or _f(*a))
    torch.manual_seed(0)
    m = Mamba(d_model=1, d_state=d_state, d_conv=d_conv, expand=6)
    with torch.no_grad():
        for p in m.parameters():  # away from the initialisation's special values
            p.add_(0.2 * torch.randn_like(p))
    batch = 23
    x_hist, x, gy = torch.randn(batch, d_conv - 1, 1), torch.randn(batch, 1, 1), torch.randn(batch, 1, 1)
    h = (0.3 * torch.randn(batch, m.d_inner, d_state)).to(dtype)
    m64 = copy.deepcopy(m).double()
    x64 = x.double().requires_grad_(x_grad)
    with ssm.use_backend("reference"):
        out_r, (_, h_r) = m64.stream(x64, (x_hist.double(), h.double()))
    grads_r = torch.autograd.grad((out_r * gy.double()).sum(), [x64] * x_grad + list(m64.parameters()))
    xk = x.clone().requires_grad_(x_grad)
    res = m.stream(xk, (x_hist, h.clone()), state_dtype=dtype, low_memory=True, in_place=in_place)
    out, (_, h_new), finish = res if in_place else (*res, lambda: None)
    grads = torch.autograd.grad((out * gy).sum(), [xk] * x_grad + list(m.parameters()), retain_graph=True)
    finish()
    if not in_place and dtype == torch.float32:
        h_new.add_(0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out.sum(), list(m.parameters()))
    assert calls and h_new.dtype == dtype
    assert rel(out, out_r) <= 1e-5
    for a, b in zip(grads, grads_r):
        assert rel(a, b) <= 1e-5
    eps = EPS.get(dtype, 2.0 ** -24)
    torch.testing.assert_close(h_new.double(), h_r, rtol=2 * eps, atol=1e-6 * h_r.abs().max().item())


@pytest.mark.parametrize("dtype", HALF)
def test_in_place_stream_on_the_reference_backend(dtype):
    """Without the C kernels the in-place step is computed out of place and copied in by finish()."""
    torch.manual_seed(0)
    m = Mamba(d_model=1, d_state=16, d_conv=4, expand=8)
    xs = stream_chunks(batch=9)
    ref_out, ref_grads, ref_state = stream_run(m, xs, backend="reference", state_dtype=dtype)
    out, grads, state = stream_run(m, xs, backend="reference", state_dtype=dtype, low_memory=True, in_place=True)
    assert torch.equal(state[1], ref_state[1])
    for a, b in zip(out, ref_out):
        assert torch.equal(a, b)


@needs_kernel
def test_in_place_finish_without_backward_and_its_misuse():
    """finish() before any backward pass advances the state as the backward kernel would (from the
    parameters of the forward, even if they changed since); the backward pass then fails in one
    line. Without a graph the step updates the state at once."""
    torch.manual_seed(0)
    m = Mamba(d_model=1, d_state=16, d_conv=4, expand=8)
    x0, x1 = torch.randn(21, 2, 1), torch.randn(21, 1, 1)
    st = m.stream(x0, None, state_dtype=torch.bfloat16, low_memory=True, in_place=True)[1]
    ref = (st[0], st[1].clone())
    out, a, finish = m.stream(x1, st, state_dtype=torch.bfloat16, low_memory=True, in_place=True)
    out.sum().backward()
    finish()
    expected = a[1].clone()
    st = (ref[0], ref[1].clone())
    out, b, finish = m.stream(x1, st, state_dtype=torch.bfloat16, low_memory=True, in_place=True)
    finish_after_a_meta_step(m, finish)
    assert torch.equal(b[1], expected)
    with pytest.raises(RuntimeError, match="already advanced"):
        out.sum().backward()
    finish()  # idempotent
    st = (ref[0], ref[1].clone())
    with torch.no_grad():
        out_ng, c, fin = m.stream(x1, st, state_dtype=torch.bfloat16, low_memory=True, in_place=True)
    assert fin is None and c[1].data_ptr() == st[1].data_ptr() and torch.equal(c[1], expected)


@needs_kernel
def test_low_memory_step_makes_no_float32_copy_of_the_state():
    """Peak memory of a low-memory, in-place 16-bit step (forward + backward) over a state of
    about 100 MB, after a warm-up step (which touches the slices' work memory): far below the
    100 MB a second 16-bit copy, or the 200 MB a float32 copy, of the state would add (own
    process: ru_maxrss)."""
    code = textwrap.dedent("""
        import resource, torch
        from fsg.ssm.mamba import Mamba
        torch.set_num_threads(1)
        torch.manual_seed(0)
        m = Mamba(d_model=1, d_state=16, d_conv=8, expand=100)
        n = 32768
        x0, x1 = torch.randn(n, 2, 1), torch.randn(n, 1, 1)
        with torch.no_grad():
            st = m.stream(x0, None, state_dtype=torch.bfloat16, low_memory=True, in_place=True)[1]
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for i in range(2):
            base = peak()
            out, st, finish = m.stream(x1, st, state_dtype=torch.bfloat16, low_memory=True, in_place=True)
            out.sum().backward()
            finish()
        print("ADDED", peak() - base, st[1].nbytes / 2**20)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    line = [l for l in res.stdout.splitlines() if l.startswith("ADDED")]
    assert line, res.stderr[-2000:]
    added, state_mb = map(float, line[0].split()[1:])
    assert state_mb == pytest.approx(100, rel=0.01)
    assert added < 0.4 * state_mb, added


# ----------------------------------------------------------------------------------------------
# FSG


x, y = make_task(n=48)


def fsg_trainer(state_dtype="float32", optimizer="sgd", **kw):
    torch.manual_seed(0)
    model = fsg.binarize(make_mlp(0), "dorefa")
    opts = dict(expand=8, fast_hidden=8, layout="stream", state_dtype=state_dtype)
    opts.update(kw)
    return fsg.Trainer(model, "fsg", optimizer=optimizer, lr=0.05, **opts)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fsg_state_is_stored_in_16_bits_in_one_copy(dtype):
    tr = fsg_trainer(dtype)
    est = tr.estimator
    ptrs = []
    for _ in range(5):
        tr.step(x, y)
        ptrs.append([s[1].data_ptr() if s is not None else None for s in est.stream_states])
    for (x_hist, h), layer in zip(est.stream_states, tr.layers):
        n = layer.latent.numel()
        assert h.dtype == getattr(torch, dtype) and h.shape == (n, 8, 16) and h.nbytes == n * 8 * 16 * 2
        assert x_hist.dtype == torch.float32 and not h.requires_grad
    assert ptrs[1] == ptrs[2] == ptrs[3] == ptrs[4]  # updated in place: no second buffer
    assert all(s is None for s in est._stream_spare) and not est.pending_stream  # committed, in-place update done
    # what a checkpoint holds is the 16-bit state
    assert est.get_extra_state()["stream"][0][1].dtype == getattr(torch, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fsg_16bit_state_training_stays_close_to_float32(backend, dtype):
    with ssm.use_backend(backend):
        runs = {}
        for sd in ("float32", dtype):
            tr = fsg_trainer(sd, beta=1.0)
            losses = [tr.step(x, y).loss for _ in range(6)]
            runs[sd] = (losses, [l.latent.detach().clone() for l in tr.layers], tr.estimator.stream_states)
    (l32, w32, s32), (l16, w16, s16) = runs["float32"], runs[dtype]
    assert l16[:2] == l32[:2]  # the observe step and the first meta step read no stored state
    for a, b in zip(l16, l32):
        assert a == pytest.approx(b, rel=1e-3)
    for a, b in zip(w16, w32):
        assert rel(a, b) <= 1e-4
    for a, b in zip(s16, s32):  # a rounding of eps relative per step, decaying with exp(Δ·A)
        assert rel(a[1].float(), b[1]) <= 2 * EPS[getattr(torch, dtype)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fsg_16bit_state_resumes_exactly(dtype):
    """Trainer.state_dict after 3 steps, loaded into a fresh trainer: the next 4 steps are the
    uninterrupted run's, bit for bit (the 16-bit state travels as it is)."""
    full = fsg_trainer(dtype, optimizer="sgdm")
    ref = [full.step(x, y).loss for _ in range(7)]
    part = fsg_trainer(dtype, optimizer="sgdm")
    got = [part.step(x, y).loss for _ in range(3)]
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    fresh = fsg_trainer(dtype, optimizer="sgdm")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.estimator.stream_states[0][1].dtype == getattr(torch, dtype)
    got += [fresh.step(x, y).loss for _ in range(4)]
    assert got == ref
    for a, b in zip(full.estimator.stream_states, fresh.estimator.stream_states):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(full.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)


def _round_trip(trainer, **kw):
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    buf.seek(0)
    fresh = fsg_trainer(trainer.estimator.state_dtype, optimizer="sgdm", **kw)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


def _one_tensor(states):
    """Whether the layers' carried states are consecutive row blocks of one tensor."""
    h = states[0][1]
    offsets = [s[1].storage_offset() for s in states]
    rows = [s[1].shape[0] * s[1].stride(0) for s in states]
    return (all(s[1].untyped_storage().data_ptr() == h.untyped_storage().data_ptr() for s in states)
            and offsets == [offsets[0] + sum(rows[:i]) for i in range(len(rows))])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsg_joint_stream_state_in_place_and_resumed_without_a_copy(monkeypatch, dtype):
    """batch_layers with the state updated in place (as on CUDA): all layers' states are rows of
    one tensor, updated in place step after step (the same memory), and a checkpoint of it,
    loaded, continues bit for bit with the states still that one loaded tensor (no re-packing
    copy: the loaded memory is the one updated)."""
    monkeypatch.setattr(fsg.estimators.FSG, "stream_in_place", lambda self: True)
    full = fsg_trainer(dtype, optimizer="sgdm", batch_layers=True)
    ref = [full.step(x, y).loss for _ in range(6)]
    part = fsg_trainer(dtype, optimizer="sgdm", batch_layers=True)
    got = [part.step(x, y).loss for _ in range(2)]
    ptrs = [s[1].data_ptr() for s in part.estimator.stream_states]
    got.append(part.step(x, y).loss)
    assert [s[1].data_ptr() for s in part.estimator.stream_states] == ptrs and _one_tensor(part.estimator.stream_states)
    fresh = _round_trip(part, batch_layers=True)
    loaded = [s[1].data_ptr() for s in fresh.estimator.stream_states]
    assert _one_tensor(fresh.estimator.stream_states)
    got += [fresh.step(x, y).loss for _ in range(3)]
    assert got == ref
    assert [s[1].data_ptr() for s in fresh.estimator.stream_states] == loaded
    for a, b in zip(full.estimator.stream_states, fresh.estimator.stream_states):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fsg_per_layer_stream_state_is_packed_once_for_batch_layers():
    """A checkpoint whose states are separate tensors (written per layer) continues with
    batch_layers: the states are packed into one tensor at the first step, and training follows
    the per-layer run up to float rounding."""
    per_layer = fsg_trainer(optimizer="sgdm")
    ref = [per_layer.step(x, y).loss for _ in range(6)]
    part = fsg_trainer(optimizer="sgdm")
    got = [part.step(x, y).loss for _ in range(3)]
    fresh = _round_trip(part, batch_layers=True)
    assert not _one_tensor(fresh.estimator.stream_states)
    got += [fresh.step(x, y).loss for _ in range(3)]
    assert _one_tensor(fresh.estimator.stream_states)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-7)
    for a, b in zip(per_layer.estimator.stream_states, fresh.estimator.stream_states):
        torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-6)


def test_joint_rows_is_a_view_of_consecutive_blocks_else_a_copy():
    from fsg.estimators.fsg import joint_rows

    base = torch.randn(10, 8, 1)[:, 1:]  # strided, like the carried conv window
    parts = list(base.split([3, 0, 5, 2]))
    j = joint_rows(parts)
    assert j.data_ptr() == base.data_ptr() and j.stride() == base.stride() and torch.equal(j, base)
    for shuffled in ([parts[2], parts[0], parts[3]], [parts[0], parts[3]], [parts[0], base[3:8].clone()]):
        assert joint_rows(shuffled, copy=False) is None
        c = joint_rows(shuffled)
        assert torch.equal(c, torch.cat(shuffled)) and c.data_ptr() != base.data_ptr()


def test_fsg_state_dtype_errors():
    with pytest.raises(ValueError, match=r"state_dtype must be one of 'float32', 'bfloat16', 'float16', got 'bf16'"):
        fsg.get_estimator("fsg", layout="stream", state_dtype="bf16")
    with pytest.raises(ValueError, match="needs slow_net='mamba' and layout='stream'"):
        fsg.get_estimator("fsg", state_dtype="bfloat16")  # the flat layout carries no state
    with pytest.raises(ValueError, match="needs slow_net='mamba' and layout='stream'"):
        fsg.get_estimator("fsg", slow_net="lstm-fc", state_dtype="float16")
    assert fsg.get_estimator("fsg").state_dtype == "float32"


def test_cli_state_dtype_flag(tmp_path, capsys):
    from conftest import cli_error, fsg_cli

    tiny = ["--dataset", "synthetic", "--dataset-option", "n_train=32", "--dataset-option", "n_test=16",
            "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
            "--batch-size", "16", "--num-threads", "1", "--no-progress", "--epochs", "2"]
    out = tmp_path / "run"
    code, _, _ = fsg_cli(capsys, "train", *tiny, "--estimator", "fsg", "--layout", "stream", "--expand", "4",
                         "--fast-hidden", "8", "--state-dtype", "bfloat16", "--out", str(out))
    assert code == 0
    ck = fsg.train.checkpoint.load_checkpoint(out / "last.pt")
    assert ck["config"]["estimator_options"]["state_dtype"] == "bfloat16"
    assert all(s[1].dtype == torch.bfloat16 for s in ck["trainer"]["estimator"]["_extra_state"]["stream"])
    err = cli_error(capsys, "train", *tiny, "--estimator", "fsg", "--state-dtype", "half")
    assert "invalid choice: 'half'" in err and "'bfloat16'" in err
