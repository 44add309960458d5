"""Resets: several sequences packed into one selective scan.

``resets[b, t]`` restarts the recurrence at step t (``h_{t-1}`` counts as 0). The reference is
checked against separate scans of the segments; the Triton kernels (on CPU tensors under Triton's
interpreter, set up as in test_ssm_triton.py) against the float64 reference with resets, and the
low-memory Mamba block with resets against a plain autograd block on the reference scan.
"""

import os
import sys

import pytest
import torch

from fsg.ssm.reference import check_scan_shapes, selective_scan_ref

_CUDA = torch.cuda.is_available()
# the interpreter must be chosen before triton (and its @jit library functions) is imported
_TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = "cuda" if _CUDA else "cpu"
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]

pytestmark = pytest.mark.usefixtures("fast_triton_interpreter")


def _ts():
    """fsg.ssm.triton_scan, or skip (no triton; or the interpreter cannot be had on this CPU)."""
    pytest.importorskip("triton")
    if DEV == "cpu" and (_TOO_LATE or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 was set")
    from fsg.ssm import triton_scan

    return triton_scan


def _inputs(b=2, d=3, L=21, n=4, D=True, z=True, bias=True, h0=True, positive=False, seed=0,
            dtype=torch.float32):
    """Random scan inputs (``positive``: delta + delta_bias > 0, as after a softplus)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    delta, bias_ = 0.5 * r(b, d, L), 0.3 * r(d)
    if positive:
        delta, bias_ = delta.abs() + 0.05, bias_.abs()
    x = dict(u=r(b, d, L), delta=delta, A=-torch.rand(d, n, generator=g) * 2 - 0.2, B=r(b, n, L), C=r(b, n, L),
             D=r(d) if D else None, z=r(b, d, L) if z else None, delta_bias=bias_ if bias else None,
             initial_state=r(b, d, n) if h0 else None)
    return {k: None if v is None else v.to(DEV, dtype) for k, v in x.items()}


def _resets(L, *rows):
    """A bool (len(rows), L) resets tensor, True at each row's listed steps."""
    rs = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, steps in enumerate(rows):
        rs[i, list(steps)] = True
    return rs.to(DEV)


def _targets(y, last, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g).to(DEV, y.dtype), torch.randn(last.shape, generator=g).to(DEV, last.dtype)


def _run(fn, x, softplus, **kw):
    """(y, last, grads) of fn on x: outputs and the gradients of a fixed random loss of both."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items() if v is not None}
    y, last = fn(**{k: leaves.get(k) for k in NAMES}, delta_softplus=softplus, return_last_state=True, **kw)
    gy, gl = _targets(y, last)
    grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), list(leaves.values()))
    return y, last, dict(zip(leaves, grads))


def _f64(x):
    return {k: None if v is None else v.double() for k, v in x.items()}


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def _separate_scans(resets):
    """A scan like selective_scan_ref's, returning (y, last), without resets: each sequence's
    segments between them scanned on their own (the first from the initial state unless it starts
    with a reset, the others from 0) by selective_scan_ref, concatenated."""
    per_step = ("u", "delta", "B", "C", "z")

    def scan(delta_softplus, return_last_state, initial_state, **leaves):
        ys, lasts = [], []
        for b, row in enumerate(resets.tolist()):
            starts = sorted({0} | {t for t, r in enumerate(row) if r}) + [len(row)]
            parts = []
            for s, e in zip(starts[:-1], starts[1:]):
                seg = {k: v[b:b + 1, ..., s:e] if k in per_step and v is not None else v for k, v in leaves.items()}
                h0 = initial_state[b:b + 1] if s == 0 and not row[0] and initial_state is not None else None
                y, h = selective_scan_ref(**seg, initial_state=h0, delta_softplus=delta_softplus,
                                          return_last_state=True)
                parts.append(y)
            ys.append(torch.cat(parts, dim=-1))
            lasts.append(h)
        return torch.cat(ys), torch.cat(lasts)

    return scan


@pytest.mark.parametrize("softplus", [True, False])
def test_reference_resets_are_separate_scans(softplus):
    """selective_scan_ref with resets == the segments scanned separately, concatenated: outputs,
    last state and every input gradient (float64); no gradient reaches an initial state whose
    sequence starts with a reset."""
    L = 12
    x = _f64(_inputs(b=3, L=L, positive=not softplus))
    resets = _resets(L, [0, 4, 5, 11], [7], [])
    y, last, grads = _run(selective_scan_ref, x, softplus, resets=resets)
    ys, lasts, grads_s = _run(_separate_scans(resets), x, softplus)
    torch.testing.assert_close(y, ys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, lasts, rtol=1e-12, atol=1e-12)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_s[k], rtol=1e-12, atol=1e-12, msg=lambda m: f"d{k}: {m}")
    assert grads["initial_state"][0].abs().max() == 0 and grads["initial_state"][1:].abs().min() > 0
    yn, _, gradsn = _run(selective_scan_ref, x, softplus)  # resets change the results
    assert not torch.allclose(yn, y) and not torch.allclose(gradsn["delta"], grads["delta"])


def test_reference_resets_all_false_is_no_resets():
    x = _inputs(L=9)
    y, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    yr, lastr = selective_scan_ref(**x, delta_softplus=True, return_last_state=True, resets=_resets(9, [], []))
    assert torch.equal(y, yr) and torch.equal(last, lastr)


@pytest.mark.parametrize("resets, what", [(torch.zeros(2, 8, dtype=torch.bool), "shape"),
                                          (torch.zeros(2, 9, dtype=torch.uint8), "dtype")])
def test_reference_rejects_bad_resets(resets, what):
    x = _inputs(L=9)
    with pytest.raises(ValueError, match=r"resets must be a bool tensor of shape \(batch, L\)") as info:
        check_scan_shapes(*(x[k] for k in NAMES), resets=resets.to(DEV))
    assert "\n" not in str(info.value), what
    with pytest.raises(ValueError, match="resets"):
        selective_scan_ref(**x, resets=resets.to(DEV))


# ---------------------------------------------------------------------------------------------
# The Triton kernels
# ---------------------------------------------------------------------------------------------


def _compare(x, resets, softplus, **kw):
    """selective_scan_triton with resets against the float64 reference with resets: y, the last
    state and every input gradient to 1e-5."""
    ts = _ts()
    y, last, grads = _run(ts.selective_scan_triton, x, softplus, resets=resets, **kw)
    yr, lastr, gradsr = _run(selective_scan_ref, _f64(x), softplus, resets=resets)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    torch.testing.assert_close(y, yr.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, lastr.float(), rtol=1e-5, atol=1e-5)
    assert set(grads) == set(gradsr)
    for k in grads:
        torch.testing.assert_close(grads[k], gradsr[k].float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"d{k}: {m}")
    return grads


# chunks of 4 steps: resets on a chunk's first step (4, 8), inside chunks, at t = 0, on
# consecutive steps, in the partial last chunk (L = 21: step 20; L = 10: steps 8, 9); block_d 2:
# two channel blocks
@pytest.mark.parametrize("n, L, chunk, rows, opts, softplus", [
    (1, 21, 4, ([0, 4, 10, 13, 14], [8, 20]), dict(D=False, z=False, bias=False, h0=False, positive=True,
                                                     block_d=2), False),
    (17, 10, 4, ([3, 4], [0, 8, 9]), dict(), True),                   # z, D, delta_bias, initial state
    (4, 11, 16, ([0, 5], [6]), dict(block_d=2), True),                # a single chunk (one launch each way)
    (2, 9, 4, (range(9), []), dict(z=False, D=False), True),          # every step a reset; none
])
def test_triton_matches_reference_with_resets(n, L, chunk, rows, opts, softplus):
    opts = dict(opts)
    block_d = opts.pop("block_d", None)
    grads = _compare(_inputs(n=n, L=L, **opts), _resets(L, *rows), softplus, chunk=chunk, block_d=block_d)
    if "initial_state" in grads and 0 in rows[0]:
        assert grads["initial_state"][0].abs().max() == 0  # exactly: nothing crosses a reset


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, masked
def test_triton_resets_across_combine_tiles(monkeypatch):
    """Six chunks, two tiles of the chunk-combine kernels (the carry between tiles), resets in
    the first and in the last tile; a state with A = 0 (no decay: a chunk's S_k = +inf must
    still give Q_k = 0, not inf * 0)."""
    ts = _ts()
    monkeypatch.setattr(ts, "_KC", 4)
    x = _inputs(b=1, L=23, n=3)
    x["A"][:, 1] = 0.0
    _compare(x, _resets(23, [2, 9, 21]), True, chunk=4)


def test_triton_rank1_factors_with_resets():
    """scan_forward / scan_backward with delta and z as rank-1 factors (as the low-memory block
    runs them) and resets: y, the chunk states' last, the recomputed y and every gradient against
    the float64 reference on the full tensors delta = w ⊗ x, z = w_z ⊗ x_z."""
    ts = _ts()
    b, d, L, n = 2, 3, 18, 3
    x = _inputs(b=b, d=d, L=L, n=n)
    resets = _resets(L, [0, 5, 8, 9], [12, 17])
    g = torch.Generator().manual_seed(3)
    dw, dx, zw, zx = (torch.randn(*s, generator=g).to(DEV) for s in ((d,), (b, L), (d,), (b, L)))
    dw = 0.5 * dw
    u, A, B, C, D, bias, h0 = (x[k] for k in ("u", "A", "B", "C", "D", "delta_bias", "initial_state"))
    kw = dict(dfac=(dw, dx), zfac=(zw, zx), chunk=4, block_d=2, resets=resets)
    y, states, last = ts.scan_forward(u, None, A, B, C, D, None, bias, True, h0, **kw)
    dout, dlast = _targets(y, last)
    du, (ddw, ddx), dA, dB, dC, dD, (dzw, dzx), dbias, dh0, y2 = ts.scan_backward(
        u, None, A, B, C, D, None, bias, True, h0, states, dout, dlast, want_h0=True, want_y=True, **kw)

    full = _f64(dict(x, delta=dw[None, :, None] * dx[:, None, :], z=zw[None, :, None] * zx[:, None, :]))
    yr, lastr, gr = _run(selective_scan_ref, full, True, resets=resets)
    close = lambda a, r, name: torch.testing.assert_close(a, r.float(), rtol=1e-5, atol=1e-5,  # noqa: E731
                                                          msg=lambda m: f"{name}: {m}")
    close(y, yr, "y")
    close(y2, yr, "recomputed y")
    close(last, lastr, "last")
    for name, got in [("u", du), ("A", dA), ("B", dB), ("C", dC), ("D", dD), ("delta_bias", dbias),
                      ("initial_state", dh0)]:
        close(got, gr[name], "d" + name)
    close(ddw, torch.einsum("bdl,bl->d", gr["delta"], dx.double()), "dw_delta")
    close(ddx, torch.einsum("bdl,d->bl", gr["delta"], dw.double()), "dx_delta")
    close(dzw, torch.einsum("bdl,bl->d", gr["z"], zx.double()), "dw_z")
    close(dzx, torch.einsum("bdl,d->bl", gr["z"], zw.double()), "dx_z")


def test_triton_without_resets_unchanged():
    """resets=None is the call without resets, bit for bit; all-False resets (the kernels with
    the reset code) give the same bits too."""
    ts = _ts()
    x = _inputs(L=9, n=2)
    runs = [_run(ts.selective_scan_triton, x, True, chunk=4),
            _run(ts.selective_scan_triton, x, True, chunk=4, resets=None),
            _run(ts.selective_scan_triton, x, True, chunk=4, resets=_resets(9, [], []))]
    for y, last, grads in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(last, runs[0][1])
        assert all(torch.equal(grads[k], runs[0][2][k]) for k in grads)


def test_triton_float64_goes_to_the_reference_with_resets():
    ts = _ts()
    x, resets = _f64(_inputs(L=7)), _resets(7, [3], [0])
    got = ts.selective_scan_triton(**x, delta_softplus=True, return_last_state=True, resets=resets)
    want = selective_scan_ref(**x, delta_softplus=True, return_last_state=True, resets=resets)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------
# The low-memory Mamba block
# ---------------------------------------------------------------------------------------------


def _block_with_resets(m, x, resets):
    """The Mamba block m on x with autograd, the reference scan with resets."""
    u, z, delta, Bt, Ct = m.pre_scan(x)
    y = selective_scan_ref(u, delta, -torch.exp(m.A_log.float()), Bt, Ct, D=m.D.float(), z=z,
                           delta_bias=m.dt_proj.bias.float(), delta_softplus=True, resets=resets)
    return torch.matmul(m.out_proj.weight, y).transpose(1, 2)


@pytest.mark.parametrize("d_model", [1, 2])
def test_low_memory_block_with_resets(monkeypatch, d_model):
    """mamba_low_memory_triton(block, x, resets) (chunks of 4: 5 chunks; d_model = 1: delta and z
    as rank-1 factors) gives the output and every gradient (input and parameters) of the plain
    block with the reference scan with resets (test_ssm_triton.py compares it without resets)."""
    ts = _ts()
    from fsg.ssm.mamba import Mamba

    calls = []
    for name in ("scan_forward", "scan_backward"):
        fn = getattr(ts, name)
        monkeypatch.setattr(ts, name, lambda *a, _f=fn, **k: calls.append(k["resets"]) or _f(*a, **dict(k, chunk=4)))
    torch.manual_seed(0)
    m = Mamba(d_model=d_model, d_state=5, d_conv=3, expand=3).to(DEV)
    x = torch.randn(2, 20, d_model, device=DEV, requires_grad=True)
    gy = torch.randn(2, 20, d_model, device=DEV)
    resets = _resets(20, [0, 8, 13, 14], [10, 19])
    params = [x] + list(m.parameters())
    out = ts.mamba_low_memory_triton(m, x, resets)
    grads = torch.autograd.grad((out * gy).sum(), params)
    assert len(calls) == 2 and all(rs is resets for rs in calls)  # one scan forward, one backward
    ref = _block_with_resets(m, x, resets)
    ref_grads = torch.autograd.grad((ref * gy).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
