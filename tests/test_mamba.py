"""Tests for fsg.ssm.mamba: reference selective scan, causal conv, Mamba block, dispatcher."""

import math

import pytest
import torch
import torch.nn.functional as F

from fsg import mamba, ssm
from fsg.ssm.mamba import (
    Mamba,
    causal_conv1d,
    get_scan_impl,
    register_scan_impl,
    selective_scan,
    selective_scan_ref,
    set_scan_impl,
    use_scan_impl,
)

# the old selection API (set_scan_impl, ...) is tested here on purpose
pytestmark = pytest.mark.filterwarnings("ignore:fsg.ssm.mamba.*is deprecated:DeprecationWarning")

DT = torch.float64


# ---------------------------------------------------------------------------
# Independent naive formulas (pure Python loops over scalars)
# ---------------------------------------------------------------------------


def _softplus(v):
    return math.log1p(math.exp(v)) if v < 30 else v


def _silu(v):
    return v / (1.0 + math.exp(-v))


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """Per-batch, per-channel, per-state, per-timestep selective scan on Python floats."""
    batch, dim, L = u.shape
    N = A.shape[1]
    u_, dl_, A_, B_, C_ = u.tolist(), delta.tolist(), A.tolist(), B.tolist(), C.tolist()
    D_ = D.tolist() if D is not None else None
    z_ = z.tolist() if z is not None else None
    db_ = delta_bias.tolist() if delta_bias is not None else None
    h0 = initial_state.tolist() if initial_state is not None else None
    y = [[[0.0] * L for _ in range(dim)] for _ in range(batch)]
    last = [[[0.0] * N for _ in range(dim)] for _ in range(batch)]
    for b in range(batch):
        for d in range(dim):
            h = list(h0[b][d]) if h0 is not None else [0.0] * N
            for t in range(L):
                dt = dl_[b][d][t]
                if db_ is not None:
                    dt += db_[d]
                if delta_softplus:
                    dt = _softplus(dt)
                yt = 0.0
                for n in range(N):
                    h[n] = math.exp(dt * A_[d][n]) * h[n] + dt * B_[b][n][t] * u_[b][d][t]
                    yt += C_[b][n][t] * h[n]
                if D_ is not None:
                    yt += D_[d] * u_[b][d][t]
                if z_ is not None:
                    yt *= _silu(z_[b][d][t])
                y[b][d][t] = yt
            last[b][d] = h
    return torch.tensor(y, dtype=DT), torch.tensor(last, dtype=DT)


def naive_causal_conv(x, w, bias):
    batch, ch, L = x.shape
    K = w.shape[1]
    x_, w_, b_ = x.tolist(), w.tolist(), bias.tolist()
    out = [[[0.0] * L for _ in range(ch)] for _ in range(batch)]
    for b in range(batch):
        for c in range(ch):
            for t in range(L):
                s = b_[c]
                for k in range(K):
                    idx = t - (K - 1) + k
                    if idx >= 0:
                        s += w_[c][k] * x_[b][c][idx]
                out[b][c][t] = s
    return torch.tensor(out, dtype=DT)


def make_scan_inputs(batch=2, dim=3, N=4, L=6, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, L, generator=g, dtype=DT)
    delta = torch.rand(batch, dim, L, generator=g, dtype=DT) * 0.5 + 0.05
    A = -torch.rand(dim, N, generator=g, dtype=DT) * 2 - 0.1
    B = torch.randn(batch, N, L, generator=g, dtype=DT)
    C = torch.randn(batch, N, L, generator=g, dtype=DT)
    D = torch.randn(dim, generator=g, dtype=DT)
    z = torch.randn(batch, dim, L, generator=g, dtype=DT)
    delta_bias = torch.randn(dim, generator=g, dtype=DT) * 0.5
    h0 = torch.randn(batch, dim, N, generator=g, dtype=DT)
    out = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=h0)
    if requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


@pytest.fixture(autouse=True)
def _restore_scan_impl():
    prev = get_scan_impl()
    known = set(ssm.list_backends())
    yield
    set_scan_impl(prev)
    for k in set(ssm.list_backends()) - known:
        ssm.unregister_backend(k)


# ---------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_D", [False, True])
@pytest.mark.parametrize("use_z", [False, True])
@pytest.mark.parametrize("use_bias_softplus", [False, True])
@pytest.mark.parametrize("use_h0", [False, True])
@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan])
def test_scan_matches_naive(fn, use_D, use_z, use_bias_softplus, use_h0):
    inp = make_scan_inputs()
    kw = {}
    if use_D:
        kw["D"] = inp["D"]
    if use_z:
        kw["z"] = inp["z"]
    if use_bias_softplus:
        kw["delta_bias"] = inp["delta_bias"]
        kw["delta_softplus"] = True
    if use_h0:
        kw["initial_state"] = inp["initial_state"]
    y_ref, last_ref = naive_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], **kw)
    y = fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], **kw)
    assert y.shape == inp["u"].shape and y.dtype == DT
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    y2, last = fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], return_last_state=True, **kw)
    torch.testing.assert_close(y2, y_ref, rtol=1e-10, atol=1e-10)
    assert last.shape == (2, 3, 4)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)


def test_scan_bias_without_softplus_and_softplus_without_bias():
    inp = make_scan_inputs(seed=1)
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
    for kw in ({"delta_bias": inp["delta_bias"].abs()}, {"delta_softplus": True}):
        torch.testing.assert_close(selective_scan_ref(*args, **kw), naive_scan(*args, **kw)[0], rtol=1e-10, atol=1e-10)


def test_scan_split_with_initial_state_equals_full():
    inp = make_scan_inputs(L=9, seed=2)
    u, dl, A, B, C, D = (inp[k] for k in ("u", "delta", "A", "B", "C", "D"))
    y_full, last_full = selective_scan_ref(u, dl, A, B, C, D=D, return_last_state=True)
    s = 4
    y1, h1 = selective_scan_ref(u[..., :s], dl[..., :s], A, B[..., :s], C[..., :s], D=D, return_last_state=True)
    y2, h2 = selective_scan_ref(
        u[..., s:], dl[..., s:], A, B[..., s:], C[..., s:], D=D, return_last_state=True, initial_state=h1
    )
    torch.testing.assert_close(torch.cat([y1, y2], -1), y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, last_full, rtol=1e-12, atol=1e-12)


def test_scan_known_closed_form():
    # One channel, one state, A=-1, delta=1, B=C=1, u=1: h_t = e^-1 h_{t-1} + 1.
    L = 5
    one = torch.ones(1, 1, L, dtype=DT)
    y = selective_scan_ref(one, one, -torch.ones(1, 1, dtype=DT), torch.ones(1, 1, L, dtype=DT), torch.ones(1, 1, L, dtype=DT))
    a = math.exp(-1)
    expected = [sum(a**k for k in range(t + 1)) for t in range(L)]
    torch.testing.assert_close(y.flatten(), torch.tensor(expected, dtype=DT))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_scan_half_inputs_computed_in_float32(half):
    inp = make_scan_inputs(seed=3)
    args = [inp[k].to(half) for k in ("u", "delta", "A", "B", "C")]
    y = selective_scan_ref(*args, D=inp["D"].float(), z=inp["z"].to(half))
    assert y.dtype == half
    y32 = selective_scan_ref(*[a.float() for a in args], D=inp["D"].float(), z=inp["z"].to(half).float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32.to(half).float(), rtol=0, atol=0)


def test_scan_float32_stays_float32():
    inp = make_scan_inputs(seed=4)
    args = [inp[k].float() for k in ("u", "delta", "A", "B", "C")]
    y, last = selective_scan_ref(*args, return_last_state=True)
    assert y.dtype == torch.float32 and last.dtype == torch.float32


def test_scan_rejects_bad_shapes():
    inp = make_scan_inputs()
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_ref(inp["u"], inp["delta"], inp["A"], inp["B"][:, :2], inp["C"])
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan_ref(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], initial_state=inp["D"])


def test_scan_gradcheck():
    inp = make_scan_inputs(batch=2, dim=2, N=3, L=4, seed=5, requires_grad=True)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]

    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        y, last = selective_scan_ref(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
            return_last_state=True, initial_state=h0,
        )
        return y, last

    assert torch.autograd.gradcheck(f, tuple(inp[k] for k in names))


def test_scan_gradcheck_plain():
    inp = make_scan_inputs(batch=1, dim=2, N=3, L=5, seed=6, requires_grad=True)

    def f(u, delta, A, B, C, D, z):
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z)

    assert torch.autograd.gradcheck(f, tuple(inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z")))


# ---------------------------------------------------------------------------
# Causal depthwise conv
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("d_conv", [1, 3, 8])
@pytest.mark.parametrize("L", [1, 5, 12])
def test_causal_conv1d_matches_formula(d_conv, L):
    g = torch.Generator().manual_seed(d_conv * 100 + L)
    x = torch.randn(2, 3, L, generator=g, dtype=DT)
    w = torch.randn(3, d_conv, generator=g, dtype=DT)
    b = torch.randn(3, generator=g, dtype=DT)
    out = causal_conv1d(x, w, b)
    assert out.shape == x.shape
    torch.testing.assert_close(out, naive_causal_conv(x, w, b), rtol=1e-12, atol=1e-12)
    # Without bias: formula with zero bias.
    torch.testing.assert_close(causal_conv1d(x, w, None), naive_causal_conv(x, w, torch.zeros(3, dtype=DT)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_conv", [1, 3, 8])
def test_causal_conv1d_is_causal(d_conv):
    g = torch.Generator().manual_seed(7)
    L = 6
    x = torch.randn(1, 2, L, generator=g, dtype=DT)
    w = torch.randn(2, d_conv, generator=g, dtype=DT)
    b = torch.randn(2, generator=g, dtype=DT)
    base = causal_conv1d(x, w, b)
    for t in range(L):
        x2 = x.clone()
        x2[..., t] += 1.0
        out = causal_conv1d(x2, w, b)
        assert torch.equal(out[..., :t], base[..., :t])
        assert not torch.allclose(out[..., t], base[..., t])  # the current tap (w[:, -1]) sees it


def test_causal_conv1d_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(torch.zeros(1, 3, 4), torch.zeros(2, 3), None)


# ---------------------------------------------------------------------------
# Mamba block
# ---------------------------------------------------------------------------


def test_mamba_output_shape():
    torch.manual_seed(0)
    m = Mamba(4, d_state=5, d_conv=3, expand=2)
    assert m.d_inner == 8 and m.dt_rank == 1
    y = m(torch.randn(3, 7, 4))
    assert y.shape == (3, 7, 4) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_mamba_d_model_1_project_config():
    torch.manual_seed(0)
    m = Mamba(1, d_state=16, d_conv=8, expand=100)
    assert m.d_inner == 100 and m.dt_rank == 1
    assert m.in_proj.weight.shape == (200, 1)
    assert m.conv1d.weight.shape == (100, 1, 8)
    assert m.x_proj.weight.shape == (1 + 32, 100)
    assert m.dt_proj.weight.shape == (100, 1)
    assert m.A_log.shape == (100, 16) and m.D.shape == (100,)
    assert m.out_proj.weight.shape == (1, 100)
    y = m(torch.randn(2, 5, 1))  # T < d_conv
    assert y.shape == (2, 5, 1) and torch.isfinite(y).all()


def test_mamba_param_names_and_no_biases():
    m = Mamba(2)
    names = {n for n, _ in m.named_parameters()}
    assert names == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
        "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight",
    }


def test_mamba_dt_rank():
    assert Mamba(1).dt_rank == 1
    assert Mamba(16).dt_rank == 1
    assert Mamba(17).dt_rank == 2
    assert Mamba(4, dt_rank=3).dt_rank == 3
    assert Mamba(4, dt_rank=3).x_proj.weight.shape == (3 + 2 * 16, 8)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d_model=0),
        dict(d_model=1.5),
        dict(d_model=True),
        dict(d_model=2, d_state=0),
        dict(d_model=2, d_conv=0),
        dict(d_model=2, expand=-1),
        dict(d_model=2, dt_rank=0),
        dict(d_model=2, dt_rank="big"),
        dict(d_model=2, dt_min=0.2, dt_max=0.1),
    ],
)
def test_mamba_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        Mamba(**kwargs)


def test_mamba_rejects_bad_input():
    with pytest.raises(ValueError, match="d_model"):
        Mamba(2)(torch.zeros(1, 3, 3))


def test_mamba_init():
    torch.manual_seed(0)
    m = Mamba(1, d_state=16, d_conv=8, expand=100)
    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    assert dt.min() < 3e-3 and dt.max() > 3e-2  # actually spread log-uniformly
    assert (m.dt_proj.weight.abs() <= m.dt_rank**-0.5).all()
    expected = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(100, 16)
    torch.testing.assert_close(m.A_log.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(m.D.detach(), torch.ones(100))


def test_mamba_init_custom_dt_range():
    torch.manual_seed(1)
    m = Mamba(2, expand=50, dt_min=1e-2, dt_max=2e-2)
    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert (dt >= 1e-2 * (1 - 1e-5)).all() and (dt <= 2e-2 * (1 + 1e-5)).all()
    m = Mamba(2, expand=50, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(m.dt_proj.bias.detach().double()), torch.full((100,), 1e-4, dtype=DT), rtol=1e-5, atol=0)


def hand_forward(m, x):
    """The 7 spec steps, written out from the module's own parameters."""
    d_inner, N, R, K = m.d_inner, m.d_state, m.dt_rank, m.d_conv
    Bsz, T, _ = x.shape
    # 1. in_proj -> (u, z)
    xz = x @ m.in_proj.weight.T
    u, z = xz[..., :d_inner], xz[..., d_inner:]
    # 2. causal depthwise conv over T, then SiLU
    w = m.conv1d.weight[:, 0, :]  # (d_inner, K)
    conv = m.conv1d.bias.expand(Bsz, T, d_inner).clone()
    for t in range(T):
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                conv[:, t, :] = conv[:, t, :] + w[:, k] * u[:, src, :]
    u = conv * torch.sigmoid(conv)
    # 3. x_proj -> (delta, B, C)
    dbl = u @ m.x_proj.weight.T
    dlt, Bt, Ct = dbl[..., :R], dbl[..., R:R + N], dbl[..., R + N:]
    # 4. Delta = softplus(dt_proj(delta))
    Delta = torch.log1p(torch.exp(dlt @ m.dt_proj.weight.T + m.dt_proj.bias))
    # 5. A = -exp(A_log)
    A = -torch.exp(m.A_log)
    # 6. selective scan (naive, per-channel/per-state), with D
    y, _ = naive_scan(
        u.transpose(1, 2).detach(), Delta.transpose(1, 2).detach(), A.detach(),
        Bt.transpose(1, 2).detach(), Ct.transpose(1, 2).detach(), D=m.D.detach(),
    )
    y = y.transpose(1, 2)  # (B, T, d_inner)
    # 7. gate and out_proj
    y = y * (z * torch.sigmoid(z))
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("d_model,expand,d_state,d_conv,T", [(1, 3, 4, 8, 5), (3, 2, 3, 3, 6), (20, 1, 2, 2, 3)])
def test_mamba_forward_equals_hand_composition(d_model, expand, d_state, d_conv, T):
    torch.manual_seed(0)
    m = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand).double()
    with torch.no_grad():  # make D and A_log non-trivial so they are really exercised
        m.D.normal_()
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.conv1d.bias.normal_()
    x = torch.randn(2, T, d_model, dtype=DT)
    with torch.no_grad():
        got = m(x)
        want = hand_forward(m, x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_mamba_is_causal():
    torch.manual_seed(0)
    m = Mamba(2, d_state=4, d_conv=3, expand=3).double()
    T = 10
    x = torch.randn(2, T, 2, dtype=DT)
    with torch.no_grad():
        base = m(x)
        for t in (0, 3, 7, T - 1):
            x2 = x.clone()
            x2[:, t, :] += torch.randn(2, 2, dtype=DT)
            out = m(x2)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-13)
            assert not torch.allclose(out[:, t:], base[:, t:])


def test_mamba_batch_independence():
    torch.manual_seed(0)
    m = Mamba(2, d_state=3, d_conv=3, expand=2).double()
    x = torch.randn(3, 6, 2, dtype=DT)
    with torch.no_grad():
        full = m(x)
        one = m(x[1:2])
    torch.testing.assert_close(full[1:2], one, rtol=1e-12, atol=1e-12)


def test_mamba_gradcheck():
    torch.manual_seed(0)
    m = Mamba(2, d_state=3, d_conv=3, expand=2).double()
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in m.named_parameters())
    x = torch.randn(2, 4, 2, dtype=DT, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x,) + params)


def test_mamba_all_params_get_gradients():
    torch.manual_seed(0)
    m = Mamba(1, d_state=16, d_conv=8, expand=10)
    x = torch.randn(2, 20, 1)
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_mamba_bfloat16_module_runs():
    torch.manual_seed(0)
    m = Mamba(2, d_state=4, d_conv=3, dtype=torch.bfloat16)
    assert m.in_proj.weight.dtype == torch.bfloat16
    y = m(torch.randn(1, 5, 2, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# ---------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------


def test_default_impl_is_auto():
    assert get_scan_impl() == "auto"
    assert ssm.get_backend("reference").selective_scan is selective_scan_ref
    assert {"reference", "cpu", "mamba_ssm", "triton"} <= set(ssm.list_backends())


def test_set_unknown_impl_raises():
    with pytest.raises(ValueError, match="unknown scan implementation 'nope'.*'ref'"):
        set_scan_impl("nope")
    assert get_scan_impl() == "auto"
    with pytest.raises(ValueError):
        with use_scan_impl("nope"):
            pass
    assert get_scan_impl() == "auto"


def test_register_bad_impl_raises():
    with pytest.raises(ValueError):
        register_scan_impl("x", 3)
    with pytest.raises(ValueError):
        register_scan_impl("", selective_scan_ref)


def test_custom_impl_is_called_and_used_by_block():
    calls = []

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
            return_last_state=False, initial_state=None):
        calls.append(dict(shape=tuple(u.shape), delta_softplus=delta_softplus, has_bias=delta_bias is not None))
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state,
                                  initial_state=initial_state) * 2

    register_scan_impl("spy", spy)
    inp = make_scan_inputs()
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
    set_scan_impl("spy")
    assert get_scan_impl() == "spy"
    torch.testing.assert_close(selective_scan(*args), 2 * selective_scan_ref(*args))
    assert len(calls) == 1

    set_scan_impl("ref")
    torch.manual_seed(0)
    m = Mamba(2, d_state=3, d_conv=2, expand=2)
    x = torch.randn(1, 4, 2)
    y_ref = m(x)
    with use_scan_impl("spy"):
        y_spy = m(x)
    assert len(calls) == 2
    assert calls[-1] == dict(shape=(1, 4, 4), delta_softplus=True, has_bias=True)
    torch.testing.assert_close(y_spy, 2 * y_ref)  # out_proj is linear, no bias


def test_use_scan_impl_restores_previous():
    register_scan_impl("a", selective_scan_ref)
    register_scan_impl("b", selective_scan_ref)
    set_scan_impl("a")
    with use_scan_impl("b"):
        assert get_scan_impl() == "b"
    assert get_scan_impl() == "a"
    with pytest.raises(RuntimeError):
        with use_scan_impl("b"):
            raise RuntimeError("boom")
    assert get_scan_impl() == "a"


def test_cpu_inputs_never_use_cuda_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("CUDA kernel must not be used for CPU tensors")

    monkeypatch.setattr(ssm.get_backend("mamba_ssm"), "selective_scan", boom)
    monkeypatch.setattr(ssm.get_backend("mamba_ssm"), "check_available", lambda: None)
    inp = make_scan_inputs()
    y = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
    torch.testing.assert_close(y, selective_scan_ref(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"]))


@pytest.mark.parametrize("t_new", [1, 3])
def test_stream_pre_scan_backward_is_autograds_vjp(t_new):
    """The written-out backward of the factored stream pre-scan (d_model = dt_rank = 1) equals
    autograd's vector-Jacobian product through ``stream_pre_scan`` in float64, for the window
    (overlap-add across the sliding windows, plus z's factor) and each weight it reads."""
    torch.manual_seed(0)
    m = Mamba(d_model=1, d_state=5, d_conv=4, expand=6).double()
    for p in m.parameters():  # away from the initialisation's special values
        p.data.add_(0.3 * torch.randn_like(p))
    batch, d, n = 7, m.d_inner, m.d_state
    window = torch.randn(batch, m.d_conv - 1 + t_new, 1, dtype=torch.float64, requires_grad=True)
    weights = [m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight]
    u, (_, zx), (_, dlt), Bt, Ct = m.stream_pre_scan(window, factored=True)
    g = torch.Generator().manual_seed(1)
    du, dzx, ddlt = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((batch, d, t_new), zx.shape, dlt.shape))
    dB, dC = (torch.randn(batch, n, t_new, generator=g, dtype=torch.float64) for _ in range(2))
    want = torch.autograd.grad([u, zx, dlt, Bt, Ct], [window] + weights[:4], [du, dzx, ddlt, dB, dC],
                               allow_unused=True)
    d_window, dw_u, dconv_w, dconv_b, dw_x = m.stream_pre_scan_backward(window, du, dzx, ddlt, dB, dC)
    torch.testing.assert_close(d_window, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw_u, want[1][:d, 0], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(want[1][d:]) == 0  # z's weight is the caller's (the kernel's factor gradient)
    torch.testing.assert_close(dconv_w, want[2].reshape(d, m.d_conv), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dconv_b, want[3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw_x, want[4], rtol=1e-12, atol=1e-12)
    assert m.stream_pre_scan_backward(window, du, dzx, ddlt, dB, dC, want_window=False)[0] is None
