"""The fused CPU selective scan against the reference scan: outputs and every input gradient."""

import pytest
import torch

from fsg.ssm import mamba, cpu as scan_cpu
from fsg.ssm.mamba import Mamba, selective_scan, selective_scan_ref, use_scan_impl
from fsg.ssm.cpu import CHUNK, selective_scan_fused

# the old selection API (set_scan_impl, ...) is tested here on purpose
pytestmark = pytest.mark.filterwarnings("ignore:fsg.ssm.mamba.*is deprecated:DeprecationWarning")

needs_kernel = pytest.mark.skipif(not scan_cpu.available(), reason=f"fused scan unavailable: {scan_cpu.build_error()}")

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_inputs(batch, dim, length, dstate, *, D=True, z=True, bias=True, h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "u": r(batch, dim, length),
        "delta": 0.5 * r(batch, dim, length),
        "A": -torch.rand(dim, dstate, generator=g) * 3,
        "B": r(batch, dstate, length),
        "C": r(batch, dstate, length),
        "D": r(dim) if D else None,
        "z": r(batch, dim, length) if z else None,
        "delta_bias": 0.1 * r(dim) if bias else None,
        "initial_state": r(batch, dim, dstate) if h0 else None,
    }


def run(fn, inp, dtype, softplus, grads_out):
    leaves = {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in inp.items()}
    y, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
                 delta_bias=leaves["delta_bias"], delta_softplus=softplus, return_last_state=True,
                 initial_state=leaves["initial_state"])
    gy, gl = grads_out
    loss = (y * gy.to(dtype)).sum() + (last * gl.to(dtype)).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    return y, last, dict(zip(present, grads))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_kernel
@pytest.mark.parametrize("batch,dim,length,dstate", [
    (1, 3, 1, 16), (2, 5, CHUNK - 1, 16), (1, 4, CHUNK, 16), (2, 3, CHUNK + 1, 4),
    (1, 7, 3 * CHUNK + 17, 16), (3, 2, 200, 3), (1, 2, 1000, 17), (4, 1, 9, 1),
    # channel-blocked path (d_state 16, 16 channels a block) with and without a channel tail
    (1, 16, 2 * CHUNK + 3, 16), (2, 37, CHUNK + 9, 16), (3, 20, 40, 16), (1, 100, 300, 16), (5, 33, 7, 16),
    # single steps of many sequences (the streaming kernel)
    (300, 20, 1, 16), (40, 100, 1, 16), (7, 5, 1, 3),
])
@pytest.mark.parametrize("options", [
    dict(D=True, z=True, bias=True, h0=True, softplus=True),
    dict(D=False, z=False, bias=False, h0=False, softplus=False),
    dict(D=True, z=False, bias=True, h0=False, softplus=True),
])
def test_fused_matches_reference_outputs_and_gradients(batch, dim, length, dstate, options):
    opts = dict(options)
    softplus = opts.pop("softplus")
    inp = make_inputs(batch, dim, length, dstate, **opts, seed=length + dim)
    g = torch.Generator().manual_seed(1)
    grads_out = (torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, dstate, generator=g))
    y64, last64, g64 = run(selective_scan_ref, inp, torch.float64, softplus, grads_out)
    y32r, last32r, g32r = run(selective_scan_ref, inp, torch.float32, softplus, grads_out)
    y, last, gf = run(selective_scan_fused, inp, torch.float32, softplus, grads_out)
    assert y.dtype == torch.float32 and y.shape == (batch, dim, length)
    assert rel(y, y64) <= 1e-5 and rel(last, last64) <= 1e-5
    assert rel(y, y32r) <= 1e-5
    assert set(gf) == set(g64)
    for k in gf:
        assert rel(gf[k], g64[k]) <= 1e-5, (k, rel(gf[k], g64[k]))
        assert rel(gf[k], g32r[k]) <= 1e-5, (k, rel(gf[k], g32r[k]))


@needs_kernel
def test_fused_state_carries_across_calls():
    inp = make_inputs(2, 3, 150, 16, h0=False)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    full, last = selective_scan_fused(*args, D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"],
                                      delta_softplus=True, return_last_state=True)
    cut = 70
    first = [a[..., :cut] if a.dim() == 3 else a for a in args]
    second = [a[..., cut:] if a.dim() == 3 else a for a in args]
    y1, h = selective_scan_fused(*first, D=inp["D"], z=inp["z"][..., :cut], delta_bias=inp["delta_bias"],
                                 delta_softplus=True, return_last_state=True)
    y2, last2 = selective_scan_fused(*second, D=inp["D"], z=inp["z"][..., cut:], delta_bias=inp["delta_bias"],
                                     delta_softplus=True, return_last_state=True, initial_state=h)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last2, last, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_low_precision_inputs(dtype):
    inp = make_inputs(1, 3, 40, 4, h0=False)
    args = [inp[k].to(dtype) for k in ("u", "delta", "A", "B", "C")]
    y = selective_scan_fused(*args, D=inp["D"], delta_softplus=True)
    ref = selective_scan_ref(*args, D=inp["D"], delta_softplus=True)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_float64_and_unavailable_kernel_fall_back_to_reference(monkeypatch):
    inp = make_inputs(1, 2, 10, 3, h0=False)
    args = [inp[k].double() for k in ("u", "delta", "A", "B", "C")]
    torch.testing.assert_close(selective_scan_fused(*args), selective_scan_ref(*args), rtol=0, atol=0)
    monkeypatch.setattr(scan_cpu, "available", lambda: False)
    args32 = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    torch.testing.assert_close(selective_scan_fused(*args32), selective_scan_ref(*args32), rtol=0, atol=0)
    with use_scan_impl("auto"):
        torch.testing.assert_close(selective_scan(*args32), selective_scan_ref(*args32), rtol=0, atol=0)


def test_no_compile_env_disables_build(monkeypatch):
    monkeypatch.setenv("FSG_NO_COMPILE", "1")
    monkeypatch.setattr(scan_cpu, "_tried", False)
    monkeypatch.setattr(scan_cpu, "_lib", None)
    assert scan_cpu.load_library() is None
    assert "FSG_NO_COMPILE" in scan_cpu.build_error()


@needs_kernel
def test_auto_uses_fused_kernel_and_mamba_block_agrees_with_reference():
    calls = []
    real = scan_cpu._FusedScan.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scan_cpu._FusedScan, "apply", lambda *a: calls.append(1) or real(*a))
        torch.manual_seed(0)
        m = Mamba(1, d_state=16, d_conv=8, expand=12)
        x = torch.randn(2, 3 * CHUNK + 5, 1, requires_grad=True)
        with use_scan_impl("auto"):
            y = m(x)
            (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
        assert calls, "auto did not use the fused kernel"
        with use_scan_impl("ref"):
            y_ref = m(x)
            (gx_ref,) = torch.autograd.grad(y_ref.pow(2).sum(), x)
    assert rel(y, y_ref) <= 1e-5
    assert rel(gx, gx_ref) <= 1e-5
    assert mamba.get_scan_impl() == "auto"


@needs_kernel
def test_fused_saves_nothing_of_size_length_by_channels_by_states():
    length, dim, dstate = 4096, 8, 16
    inp = make_inputs(1, dim, length, dstate, h0=False)
    leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
    y = selective_scan_fused(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                             z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True)
    saved = sum(t.numel() for t in y.grad_fn.saved_tensors)
    # inputs (u, delta, z: L·d each; B, C: L·n each) plus chunk-boundary states (L/CHUNK·d·n)
    bound = 3 * length * dim + 2 * length * dstate + 2 * dim * dstate + 3 * dim + (length // CHUNK + 1) * dim * dstate
    assert saved <= bound
    assert saved < length * dim * dstate / 2


@needs_kernel
@pytest.mark.parametrize("d_conv,length", [(1, 5), (4, 3), (8, 100), (8, 5), (3, 257)])
def test_fused_causal_conv_matches_torch(d_conv, length):
    g = torch.Generator().manual_seed(d_conv * 1000 + length)
    x = torch.randn(2, 5, length, generator=g, dtype=torch.float64)
    w = torch.randn(5, d_conv, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 5, length, generator=g, dtype=torch.float64)
    with use_scan_impl("ref"):
        leaves64 = [t.clone().requires_grad_() for t in (x, w, b)]
        ref = mamba.causal_conv1d(*leaves64)
        g64 = torch.autograd.grad((ref * dy).sum(), leaves64, retain_graph=True)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    out = scan_cpu.causal_conv1d_fused(*leaves)
    out_silu = scan_cpu.causal_conv1d_fused(*leaves, silu=True)
    torch.testing.assert_close(out_silu, torch.nn.functional.silu(out))
    gs = torch.autograd.grad((out_silu * dy.float()).sum(), leaves)
    gs_ref = torch.autograd.grad((torch.nn.functional.silu(ref) * dy).sum(), leaves64)
    for a, r in zip(gs, gs_ref):
        assert rel(a, r) <= 1e-6
    assert out is not None
    grads = torch.autograd.grad((out * dy.float()).sum(), leaves)
    assert rel(out, ref) <= 1e-6
    for a, r in zip(grads, g64):
        assert rel(a, r) <= 1e-6
    with use_scan_impl("auto"):
        torch.testing.assert_close(mamba.causal_conv1d(*[t.detach() for t in leaves]), out.detach())


@pytest.mark.parametrize("impl", ["auto", "ref"])
@pytest.mark.parametrize("batch,length,expand", [(1, 3 * CHUNK + 7, 20), (5, 6, 16), (2, 40, 7)])
def test_mamba_low_memory_matches_plain_forward_and_gradients(impl, batch, length, expand):
    torch.manual_seed(0)
    m = Mamba(1, d_state=16, d_conv=8, expand=expand)
    x = (torch.randn(batch, length, 1) * 0.1).requires_grad_()
    dy = torch.randn(batch, length, 1)
    params = [x] + list(m.parameters())
    with use_scan_impl(impl):
        y = m(x)
        g = torch.autograd.grad((y * dy).sum(), params)
        y_lm = m(x, low_memory=True)
        g_lm = torch.autograd.grad((y_lm * dy).sum(), params)
    assert rel(y_lm, y) <= 1e-6
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g_lm, g):
        assert rel(a, b) <= 1e-5, (name, rel(a, b))


@needs_kernel
def test_mamba_low_memory_keeps_only_input_and_chunk_states():
    torch.manual_seed(0)
    m = Mamba(1, d_state=16, d_conv=8, expand=32)
    length = 50 * CHUNK
    x = torch.randn(1, length, 1, requires_grad=True)
    y = m(x, low_memory=True)
    saved = sum(t.numel() for t in y.grad_fn.saved_tensors)
    assert saved <= length + (length // CHUNK) * 32 * 16
    assert saved < length * 32 / 2  # not even one (T, d_inner) activation


@pytest.mark.parametrize("impl", ["auto", "ref"])
@pytest.mark.parametrize("pieces", [[1] * 12, [3, 1, 5, 3], [12]])
def test_mamba_stream_continues_the_sequence_exactly(impl, pieces):
    torch.manual_seed(0)
    m = Mamba(1, d_state=16, d_conv=4, expand=20)
    x = torch.randn(3, sum(pieces), 1)
    with use_scan_impl(impl), torch.no_grad():
        full = m(x)
        outs, state, t = [], None, 0
        for p in pieces:
            y, state = m.stream(x[:, t:t + p], state)
            outs.append(y)
            t += p
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)
    assert state[0].shape == (3, 3, 1) and state[1].shape == (3, 20, 16)


@pytest.fixture
def float64_default():
    """``torch.set_default_dtype(torch.float64)`` for one test (restored after it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@needs_kernel
@pytest.mark.parametrize("batch,dim,length,dstate", [(2, 5, CHUNK + 3, 16), (7, 5, 1, 3)])
def test_fused_scan_under_float64_default_dtype(float64_default, batch, dim, length, dstate):
    """Every buffer handed to the C kernels is float32 whatever the default dtype: the float32 scan
    (a multi-chunk scan, a single step, an empty one) and all its gradients match the reference."""
    inp = {k: (v.float() if v is not None else None)
           for k, v in make_inputs(batch, dim, length, dstate, seed=3).items()}
    g = torch.Generator().manual_seed(1)
    grads_out = (torch.randn(batch, dim, length, generator=g, dtype=torch.float32),
                 torch.randn(batch, dim, dstate, generator=g, dtype=torch.float32))
    y, last, gf = run(selective_scan_fused, inp, torch.float32, True, grads_out)
    y64, last64, g64 = run(selective_scan_ref, inp, torch.float64, True, grads_out)
    assert y.dtype == last.dtype == torch.float32
    assert rel(y, y64) <= 1e-5 and rel(last, last64) <= 1e-5
    for k in g64:
        assert gf[k].dtype == torch.float32, k
        assert rel(gf[k], g64[k]) <= 1e-5, (k, rel(gf[k], g64[k]))


@needs_kernel
def test_fused_causal_conv_under_float64_default_dtype(float64_default):
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float32) for s in ((2, 5, 40), (5, 4), (5,)))
    dy = torch.randn(2, 5, 40, generator=g, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    grads = torch.autograd.grad((scan_cpu.causal_conv1d_fused(*leaves) * dy).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    with use_scan_impl("ref"):
        grads64 = torch.autograd.grad((mamba.causal_conv1d(*leaves64) * dy.double()).sum(), leaves64)
    for a, r in zip(grads, grads64):
        assert a.dtype == torch.float32 and rel(a, r) <= 1e-6


@needs_kernel
@pytest.mark.parametrize("pieces", [[1] * 4, [3, 1]])
def test_mamba_stream_under_float64_default_dtype(pieces):
    """A float32 block streamed while the default dtype is float64 (its step kernel's output
    buffer) continues the sequence as the float32 forward does."""
    torch.manual_seed(0)
    m = Mamba(1, d_state=16, d_conv=4, expand=20)
    x = torch.randn(3, sum(pieces), 1)
    with torch.no_grad():
        full = m(x)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with use_scan_impl("auto"), torch.no_grad():
            outs, state, t = [], None, 0
            for p in pieces:
                y, state = m.stream(x[:, t:t + p], state, low_memory=True)[:2]
                outs.append(y)
                t += p
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)
