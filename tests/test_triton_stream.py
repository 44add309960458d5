"""The Triton streaming block step (fsg.ssm.triton_stream, the ``"triton"`` backend's
``mamba_stream`` op) against the float64 reference, its in-place state update, and FSG's stream
layout trained on it.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest before triton is imported); a test backend on the CPU routes ``Mamba.stream``
to the op, as the ``"triton"`` backend does on CUDA.
"""

import copy

import pytest
import torch

pytest.importorskip("triton")

import fsg  # noqa: E402
from fsg import ssm  # noqa: E402
from fsg.ssm import backends  # noqa: E402
from fsg.ssm.mamba import Mamba  # noqa: E402
from fsg.ssm import triton_stream as tst  # noqa: E402

from conftest import finish_after_a_meta_step, make_mlp, make_task  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HALF = [torch.bfloat16, torch.float16]
pytestmark = pytest.mark.usefixtures("fast_triton_interpreter")
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture
def triton_here(monkeypatch):
    """``"triton-here"``: the triton backend's scan and streaming ops on this test's device (the CPU
    under the interpreter), with a record of the streaming kernels' launches."""
    calls = []
    for name in ("stream_block_forward", "stream_block_backward"):
        fn = getattr(tst, name)
        monkeypatch.setattr(tst, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    t = backends.TRITON
    ssm.register_backend(ssm.Backend("triton-here", devices={DEV}, selective_scan=t.selective_scan,
                                     selective_scan_step=t.selective_scan_step, mamba_stream=t.mamba_stream))
    yield calls
    ssm.unregister_backend("triton-here")


def perturbed_block(d_state=16, d_conv=4, expand=6, seed=0):
    torch.manual_seed(seed)
    m = Mamba(d_model=1, d_state=d_state, d_conv=d_conv, expand=expand)
    with torch.no_grad():
        for p in m.parameters():  # away from the initialisation's special values
            p.add_(0.2 * torch.randn_like(p))
    return m.to(DEV)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("d_state,d_conv,x_grad", [(16, 4, True), (17, 3, False), (5, 8, True)])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_stream_step_against_the_float64_reference(triton_here, monkeypatch, d_state, d_conv, x_grad, in_place,
                                                   dtype):
    """One low-memory step of a d_model = 1 block through ``Mamba.stream`` (several rows per
    program, the last program short) against the reference backend's plain step in float64 from
    the same stored state: the output and every gradient (parameters, the input where it requires
    one) to ≤ 1e-5 relative, the new state to the rounding of its dtype, written by the
    backward kernel into the old state's memory (in place) or by the forward into a new tensor.
    With d_state 17 the old state is a (batch, d_state, d_inner) tensor's transposed view (the
    Triton scan's layout of a last state)."""
    monkeypatch.setattr(tst, "_PROGRAMS", 4)  # 23 rows: 6 per program, 5 in the last
    m = perturbed_block(d_state, d_conv)
    batch = 23
    g = torch.Generator().manual_seed(1)
    x_hist, x, gy = (torch.randn(batch, t, 1, generator=g).to(DEV) for t in (d_conv - 1, 1, 1))
    h = (0.3 * torch.randn(batch, m.d_inner, d_state, generator=g)).to(DEV, dtype)
    if d_state == 17:
        h = h.transpose(1, 2).contiguous().transpose(1, 2)
    m64 = copy.deepcopy(m).double()
    x64 = x.double().requires_grad_(x_grad)
    with ssm.use_backend("reference"):
        out_r, (_, h_r) = m64.stream(x64, (x_hist.double(), h.double()))
    grads_r = torch.autograd.grad((out_r * gy.double()).sum(), [x64] * x_grad + list(m64.parameters()))
    xk, hk = x.clone().requires_grad_(x_grad), h.clone()
    assert hk.is_contiguous() == (d_state != 17)
    with ssm.use_backend("triton-here"):
        res = m.stream(xk, (x_hist, hk), state_dtype=dtype, low_memory=True, in_place=in_place)
    out, (_, h_new), finish = res if in_place else (*res, None)
    assert triton_here == ["stream_block_forward"]
    grads = torch.autograd.grad((out * gy).sum(), [xk] * x_grad + list(m.parameters()))
    assert triton_here == ["stream_block_forward", "stream_block_backward"]
    if finish is not None:
        finish()  # nothing left to do: the backward kernel wrote the state
    assert h_new.dtype == dtype and (h_new.data_ptr() == hk.data_ptr()) == in_place
    assert rel(out, out_r) <= 1e-5
    for a, b in zip(grads, grads_r):
        assert rel(a, b) <= 1e-5
    torch.testing.assert_close(h_new.double(), h_r, rtol=2 * EPS[dtype], atol=1e-6 * h_r.abs().max().item())


def test_float32_state_buffer_and_no_graph(triton_here):
    """Out of place the new state goes into a suitable ``state_buffer``; without a graph to record
    the in-place step updates the state at once (forward only), to what the backward kernel of a
    recorded step writes."""
    m = perturbed_block()
    batch = 9
    x_hist, x = torch.randn(batch, 3, 1, device=DEV), torch.randn(batch, 1, 1, device=DEV)
    h = 0.3 * torch.randn(batch, m.d_inner, m.d_state, device=DEV)
    buf = torch.empty_like(h)
    with ssm.use_backend("triton-here"):
        out, (_, h1) = m.stream(x, (x_hist, h), state_buffer=buf, low_memory=True)
        assert h1.data_ptr() == buf.data_ptr()
        h2 = h.clone()
        with torch.no_grad():
            out_ng, (_, h3), fin = m.stream(x, (x_hist, h2), state_dtype=torch.float32, low_memory=True,
                                            in_place=True)
    assert fin is None and h3.data_ptr() == h2.data_ptr()
    torch.testing.assert_close(h3, h1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out_ng, out.detach(), rtol=1e-6, atol=1e-7)


def test_finish_without_backward_and_its_misuse(triton_here):
    """finish() before any backward pass advances the state as the backward kernel would, from the
    parameters of the forward even if they changed since; the backward pass then fails in one
    line; finish() is idempotent."""
    m = perturbed_block()
    x_hist, x = torch.randn(21, 3, 1, device=DEV), torch.randn(21, 1, 1, device=DEV)
    h = (0.3 * torch.randn(21, m.d_inner, m.d_state, device=DEV)).to(torch.bfloat16)
    kw = dict(state_dtype=torch.bfloat16, low_memory=True, in_place=True)
    with ssm.use_backend("triton-here"):
        out, (_, a), finish = m.stream(x, (x_hist, h.clone()), **kw)
        out.sum().backward()
        finish()
        out, (_, b), finish = m.stream(x, (x_hist, h.clone()), **kw)
    finish_after_a_meta_step(m, finish)
    torch.testing.assert_close(b.float(), a.float(), rtol=2 * EPS[torch.bfloat16], atol=0)
    with pytest.raises(RuntimeError, match="already advanced"):
        out.sum().backward()
    finish()


def test_declines_what_it_does_not_cover():
    """None (the caller's ordinary path) for two new tokens, float64, a block with d_model > 1 and
    a state of another dtype than asked for."""
    m = perturbed_block()
    win = torch.randn(5, m.d_conv, 1, device=DEV)
    h = torch.zeros(5, m.d_inner, m.d_state, device=DEV)
    assert tst.mamba_stream_triton(m, torch.randn(5, m.d_conv + 1, 1, device=DEV), h, torch.float32) is None
    assert tst.mamba_stream_triton(copy.deepcopy(m).double(), win.double(), h.double(), torch.float32) is None
    assert tst.mamba_stream_triton(m, win, h, torch.bfloat16) is None
    wide = Mamba(d_model=2, d_state=4, d_conv=4, expand=2).to(DEV)
    assert tst.mamba_stream_triton(wide, torch.randn(5, 4, 2, device=DEV), None, torch.float32) is None


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_fsg_stream_training_on_the_triton_step(triton_here, monkeypatch, state_dtype):
    """FSG's stream layout trained through the Triton step (the first, two-token call runs the
    Triton scan, every later step the block step), its state updated in place as on CUDA (a
    float32 one too), follows the reference backend: the same losses to float32 tolerance over
    four steps (a 16-bit state: to its rounding); the carried state keeps its dtype and, from the
    second step on, its memory (one copy)."""
    monkeypatch.setattr(fsg.estimators.FSG, "stream_in_place", lambda self: True)
    x, y = make_task(n=32, d=4)
    losses = {}
    for backend in ("reference", "triton-here"):
        with ssm.use_backend(backend):
            model = fsg.binarize(make_mlp(d=4, hidden=6), "dorefa").to(DEV)
            tr = fsg.Trainer(model, "fsg", optimizer="sgd", lr=0.05, layout="stream", expand=4, d_state=4,
                             state_dtype=state_dtype)
            losses[backend] = [tr.step(x.to(DEV), y.to(DEV)).loss for _ in range(2)]
            ptrs = [s[1].data_ptr() for s in tr.estimator.stream_states]
            losses[backend] += [tr.step(x.to(DEV), y.to(DEV)).loss for _ in range(2)]
            states = tr.estimator.stream_states
            assert all(s[1].dtype == getattr(torch, state_dtype) for s in states)
            assert [s[1].data_ptr() for s in states] == ptrs
    assert "stream_block_backward" in triton_here
    tol = 1e-5 if state_dtype == "float32" else 1e-2
    torch.testing.assert_close(torch.tensor(losses["triton-here"]), torch.tensor(losses["reference"]), rtol=tol,
                               atol=tol)
