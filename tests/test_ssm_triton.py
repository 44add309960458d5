"""Triton selective scan (fsg.ssm.triton_scan) against the reference scan.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported). Two interpreter-only speed-ups are patched in for this module
(conftest's ``fast_triton_interpreter``); they do not change what the kernels compute.
"""

import os
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
# the interpreter must be chosen before triton (and its @jit library functions) is imported
_TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fsg.ssm.reference import selective_scan_ref  # noqa: E402
from fsg.ssm import triton_scan as ts  # noqa: E402

DEV = "cuda" if _CUDA else "cpu"
if DEV == "cpu" and (_TOO_LATE or os.environ.get("TRITON_INTERPRET") != "1"):
    pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 was set (set it in the environment)",
                allow_module_level=True)

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


pytestmark = pytest.mark.usefixtures("fast_triton_interpreter")


def _inputs(b=2, d=3, L=37, n=16, D=True, z=True, bias=True, h0=False, dtype=torch.float32, seed=0, positive=False):
    """Random scan inputs; ``positive``: delta + delta_bias > 0 (as after a softplus), else the
    states of channels with negative delta grow and float32 itself is too coarse for 1e-5."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    delta, bias_ = 0.5 * r(b, d, L), 0.3 * r(d)
    if positive:
        delta, bias_ = delta.abs() + 0.05, bias_.abs()
    x = dict(u=r(b, d, L), delta=delta, A=-torch.rand(d, n, generator=g) * 2 - 0.2,
             B=r(b, n, L), C=r(b, n, L), D=r(d) if D else None, z=r(b, d, L) if z else None,
             delta_bias=bias_ if bias else None, initial_state=r(b, d, n) if h0 else None)
    return {k: (v.to(DEV, dtype) if v is not None and k not in ("A", "D", "delta_bias") else
                v.to(DEV) if v is not None else None) for k, v in x.items()}


def _run(fn, x, softplus, seed=1, **kw):
    """(y, last, grads): outputs and gradients of a fixed random loss on y and the last state."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    y, last = fn(**args, delta_softplus=softplus, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    gy, gl = torch.randn(y.shape, generator=g).to(DEV), torch.randn(last.shape, generator=g).to(DEV)
    loss = (y.float() * gy).sum() + (last.float() * gl).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, last, dict(zip(leaves, grads))


def _compare(x, softplus, rtol=1e-5, atol=1e-5, upcast=False, **kw):
    y, last, grads = _run(ts.selective_scan_triton, x, softplus, **kw)
    xr = {k: (v.float() if v is not None else None) for k, v in x.items()} if upcast else x
    yr, lastr, gradsr = _run(selective_scan_ref, xr, softplus)
    assert y.dtype == x["u"].dtype and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), yr.float().to(y.dtype).float() if upcast else yr, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, lastr, rtol=rtol, atol=atol)
    assert set(grads) == set(gradsr)
    for k in grads:
        assert grads[k].dtype == x[k].dtype, k
        torch.testing.assert_close(grads[k].float(), gradsr[k].float(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("n, L, chunk, opts, softplus", [
    (16, 33, 16, dict(b=1, h0=True), True),                  # 3 chunks, the last one partial
    (17, 29, 16, dict(b=1, h0=True), False),                 # d_state 17 (any d_state: a loop over states)
    (1, 21, 4, dict(D=False, z=False, bias=False), True),    # d_state 1, nothing optional
    (1, 21, 4, dict(D=False, z=False, bias=False), False),
    (4, 16, 32, dict(D=False, bias=False), True),            # a single (partial) chunk
    (4, 16, 32, dict(z=False, h0=True), False),
])
def test_matches_reference(n, L, chunk, opts, softplus):
    _compare(_inputs(n=n, L=L, positive=not softplus, **opts), softplus, chunk=chunk)


def test_many_chunks_and_channel_blocks(monkeypatch):
    """More chunks than one tile of the chunk-combine kernels, several channel blocks."""
    monkeypatch.setattr(ts, "_KC", 4)  # 9 chunks: three combine tiles
    _compare(_inputs(b=1, d=5, L=33, n=4, h0=True), True, chunk=4, block_d=2)


def test_tiling_with_several_channels_per_lane():
    """``num_warps`` below block_d / 32 (a tiling of the sweep in benchmarks/gpu_profile.py) gives
    the same results; a num_warps that is not a power of two is refused."""
    _compare(_inputs(b=1, d=5, L=33, n=4, h0=True), True, chunk=8, block_d=4, num_warps=1)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        _compare(_inputs(b=1, d=5, L=33, n=4), True, chunk=8, block_d=4, num_warps=3)


def test_long_chunks():
    """Chunks of 64 steps, whose end states must not lose precision (sums of delta over a chunk
    are large); two channel blocks."""
    _compare(_inputs(b=1, d=3, L=150, n=4, h0=True, seed=7), True, chunk=64, block_d=2)


def test_streaming_one_token():
    """L = 1 from an initial state (one launch each way); the state written into last_out."""
    x = _inputs(L=1, h0=True)
    _compare(x, True)
    buf = torch.empty(2, 3, 16, device=DEV)  # the default n
    y, last = ts.selective_scan_triton(**x, delta_softplus=True, return_last_state=True, last_out=buf)
    yr, lastr = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert last.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf, lastr, rtol=1e-5, atol=1e-5)


def test_empty_sequence():
    x = _inputs(L=0, h0=True)
    y, last = ts.selective_scan_triton(**x, return_last_state=True)
    assert y.shape == (2, 3, 0)
    torch.testing.assert_close(last, x["initial_state"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """16-bit u, delta, B, C, z, initial state: compared with the reference on the same values
    upcast to float32 (y rounded to the input dtype)."""
    _compare(_inputs(L=19, n=4, h0=True, dtype=dtype), True, rtol=2e-2, atol=2e-2, upcast=True)  # 2 chunks


def test_rank1_factors_match_full_tensors():
    """delta = w ⊗ x and z = w_z ⊗ x_z given as factors: same y, states and gradients as the full
    tensors, the factor gradients being the contractions of the full ones."""
    b, d, L, n = 2, 5, 17, 4
    x = _inputs(b=b, d=d, L=L, n=n, h0=True)
    g = torch.Generator().manual_seed(3)
    dw, dx, zw, zx = (torch.randn(*s, generator=g).to(DEV) for s in ((d,), (b, L), (d,), (b, L)))
    dw = 0.5 * dw
    full = dict(x, delta=dw[None, :, None] * dx[:, None, :], z=zw[None, :, None] * zx[:, None, :])
    common = [x["u"], x["A"], x["B"], x["C"], x["D"]]
    kw = dict(delta_bias=x["delta_bias"], delta_softplus=True, initial_state=x["initial_state"], chunk=8, block_d=2)
    y, st, last = ts.scan_forward(*common[:1], None, *common[1:], None, dfac=(dw, dx), zfac=(zw, zx), **kw)
    yf, stf, lastf = ts.scan_forward(*common[:1], full["delta"], *common[1:], full["z"], **kw)
    torch.testing.assert_close(y, yf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st, stf, rtol=1e-5, atol=1e-5)
    dout, dlast = torch.randn(y.shape, generator=g).to(DEV), torch.randn(last.shape, generator=g).to(DEV)
    bw = ts.scan_backward(*common[:1], None, *common[1:], None, x["delta_bias"], True, x["initial_state"], st, dout,
                          dlast, want_h0=True, want_y=True, dfac=(dw, dx), zfac=(zw, zx), chunk=8, block_d=2)
    bf = ts.scan_backward(*common[:1], full["delta"], *common[1:], full["z"], x["delta_bias"], True,
                          x["initial_state"], stf, dout, dlast, want_h0=True, want_y=True, chunk=8)
    for i in (0, 2, 3, 4, 5, 7, 8):  # du, dA, dB, dC, dD, dbias, dh0
        torch.testing.assert_close(bw[i], bf[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bw[9], yf.float(), rtol=1e-5, atol=1e-5)  # the recomputed y
    (ddw, ddx), (dzw, dzx), ddelta, dz = bw[1], bw[6], bf[1], bf[6]
    torch.testing.assert_close(ddw, torch.einsum("bdl,bl->d", ddelta, dx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ddx, torch.einsum("bdl,d->bl", ddelta, dw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dzw, torch.einsum("bdl,bl->d", dz, zx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dzx, torch.einsum("bdl,d->bl", dz, zw), rtol=1e-5, atol=1e-5)


def test_float64_uses_reference():
    x = {k: (v.double() if v is not None else None) for k, v in _inputs(L=5).items()}
    torch.testing.assert_close(ts.selective_scan_triton(**x), selective_scan_ref(**x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bigger_shape():
    """The default tiling, more chunks than one combine tile, 100 channels (a partial last channel
    block), against the float64 reference (each output's largest error over its largest value:
    over 18,000 summed steps an element-wise float32-against-float32 check measures the two
    summation orders, not the kernel); then bf16 inputs."""
    for x, tol in [(_inputs(b=2, d=100, L=9000, n=16, h0=True, seed=5), 1e-5),
                   (_inputs(b=2, d=37, L=777, n=16, h0=True, dtype=torch.bfloat16, seed=6), 3e-2)]:
        y, last, grads = _run(ts.selective_scan_triton, x, True)
        x64 = {k: v.double() if v is not None else None for k, v in x.items()}
        yr, lastr, gradsr = _run(selective_scan_ref, x64, True)
        for name, a, b in [("y", y, yr), ("last", last, lastr)] + [("d" + k, grads[k], gradsr[k]) for k in grads]:
            want = x["u"].dtype if name == "y" else torch.float32 if name == "last" else x[name[1:]].dtype
            assert a.dtype == want, name
            err = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-3))
            assert err < tol, (name, err)


def test_triton_backend_streaming_step_writes_the_state_buffer():
    """The triton backend's streaming op (what Mamba.stream calls on CUDA): one token from an
    initial state, the new state written into the given buffer, values as the reference."""
    from fsg.ssm.backends import get_backend

    step = get_backend("triton").selective_scan_step
    x = _inputs(b=3, d=4, L=1, n=16, h0=True, positive=True)
    buf = torch.empty(3, 4, 16, device=DEV)
    y, last = step(**{k: x[k] for k in NAMES}, delta_softplus=True, return_last_state=True, last_out=buf)
    yr, lastr = selective_scan_ref(**{k: x[k] for k in NAMES}, delta_softplus=True, return_last_state=True)
    assert last.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf, lastr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d_model", [1, 2])
def test_low_memory_block_matches_the_plain_block(monkeypatch, d_model):
    """The triton backend's low-memory Mamba block (fsg.ssm.lowmem on scan_forward / scan_backward,
    here in chunks of 8: 5 chunks; d_model = 1: z and delta as rank-1 factors) gives the plain
    block's output and every gradient (input and parameters) with the reference scan; float64
    is declined."""
    from fsg.ssm import backends
    from fsg.ssm.mamba import Mamba

    calls = []
    for name in ("scan_forward", "scan_backward"):
        fn = getattr(ts, name)
        monkeypatch.setattr(ts, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **dict(k, chunk=8)))
    torch.manual_seed(0)
    m = Mamba(d_model=d_model, d_state=5, d_conv=3, expand=3).to(DEV)
    x = torch.randn(2, 37, d_model, device=DEV, requires_grad=True)
    gy = torch.randn(2, 37, d_model, device=DEV)
    out = ts.mamba_low_memory_triton(m, x)
    grads = torch.autograd.grad((out * gy).sum(), [x] + list(m.parameters()))
    assert calls == ["scan_forward", "scan_backward"]
    with backends.use_backend("reference"):
        ref = m.plain_forward(x)
        ref_grads = torch.autograd.grad((ref * gy).sum(), [x] + list(m.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert ts.mamba_low_memory_triton(m.double(), x.double()) is None


def _nvidia_compiler_present() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(sys.modules["triton.backends.nvidia.compiler"].__file__), "bin",
                                       "ptxas"))


#: benchmarks/triton_compile.py with one more case in its quick set: FSG flat's low-memory block
#: with resets (the slow-net's layers packed into one scan: every kernel of fsg.ssm.triton_scan
#: with HAS_RESET).
_COMPILE_WITH_RESETS = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import triton_compile as tc

def lowmem_resets():
    x, rs = tc._scan_inputs(1, 100, 184321, 16, z=False), torch.zeros(1, 184321, dtype=torch.bool)
    rs[0, ::2000] = True
    fac = lambda: (torch.randn(100), torch.randn(1, 184321))
    kernels, dfac, zfac = tc.ts.LOW_MEMORY_KERNELS, fac(), fac()
    args = (x["u"], None, x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"])
    y, states = kernels.forward(*args, dfac, zfac, resets=rs)
    kernels.backward(*args, states, torch.zeros_like(y), dfac, zfac, resets=rs)

tc.CASES.insert(tc.QUICK, ("flat-lowmem-resets", "FSG flat, low-memory block, with resets", lowmem_resets))
tc.QUICK += 1
sys.exit(tc.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not _nvidia_compiler_present(), reason="this Triton has no NVIDIA backend with its ptxas")
def test_kernels_compile_for_an_h100_h200_without_a_gpu(tmp_path):
    """The interpreter does not compile: benchmarks/triton_compile.py compiles the kernels FSG flat and
    stream launch (GPU tiling, Triton's own argument binding), and FSG flat's low-memory block's with
    resets, down to sm_90a cubins, from scratch."""
    import json
    import subprocess

    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _COMPILE_WITH_RESETS, bench, "--quick", "--json", "--sass"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ok"] and not out["failures"] and out["target"] == "sm_90a"
    compiled = {(k["case"], k["kernel"]) for k in out["kernels"]}
    assert {("flat", "_fwd_local_kernel"), ("flat", "_combine_kernel"), ("flat", "_fwd_out_kernel"),
            ("flat", "_bwd_local_kernel"), ("flat", "_bwd_main_kernel"), ("flat-lowmem", "_bwd_main_kernel"),
            ("stream", "_fwd_out_kernel"), ("stream", "_bwd_main_kernel")} <= compiled
    resets = {k["kernel"]: k for k in out["kernels"] if k["case"] == "flat-lowmem-resets"}
    assert set(resets) == {"_fwd_local_kernel", "_combine_kernel", "_fwd_out_kernel", "_bwd_local_kernel",
                           "_bwd_main_kernel"}
    assert all(k["registers"] > 0 for k in out["kernels"])
    assert any(p.suffix == ".cubin" for p in tmp_path.rglob("*"))  # really compiled, not found in a cache
    # The scans and sums over a chunk's steps stay in each thread's registers: no scan kernel puts
    # time across lanes, and the only shuffles of the hot loops (over the states) are the backward's
    # two sums over the channels per step (dB, dC: 16 steps x 2 x 5 butterfly levels). Triton 3.6
    # laid time across lanes (786 shuffles per state in the backward) until the tiles' memory
    # accesses went 1-D; its reversed scans reversed the lanes too (79-395 shuffles) until tl.flip.
    flat = {k["kernel"]: k for k in out["kernels"] if k["case"] == "flat"}
    assert not any(k.get("lanes_on_time") for k in out["kernels"])
    for name in ("_fwd_local_kernel", "_fwd_out_kernel", "_bwd_local_kernel"):
        assert flat[name]["loop_shfl"] == 0 and flat[name]["loop_mufu"] > 0, flat[name]
    assert 0 < flat["_bwd_main_kernel"]["loop_shfl"] <= 2 * 16 * 5, flat["_bwd_main_kernel"]
    assert all(k["loop_shfl"] <= 8 for k in out["kernels"] if k["kernel"] == "_combine_kernel")
    assert all(k["loop_spill_ops"] == 0 for k in flat.values())  # spills, if any, stay off the hot loop
    # with resets (a_t = 0 there, chunks' end states and start-state gradients masked): the same
    for name in ("_fwd_local_kernel", "_fwd_out_kernel", "_bwd_local_kernel"):
        assert resets[name]["loop_shfl"] == 0 and resets[name]["loop_mufu"] > 0, resets[name]
    assert 0 < resets["_bwd_main_kernel"]["loop_shfl"] <= 2 * 16 * 5, resets["_bwd_main_kernel"]
    assert all(k["loop_spill_ops"] == 0 for k in resets.values())


def test_combine_stages_sets_and_restores_the_pipelining():
    """combine_stages (the sweep's pipelined combine kernels) sets COMBINE_STAGES for its block
    only, also when the block raises; the results do not depend on it (the interpreter)."""
    assert ts.COMBINE_STAGES == 1
    with pytest.raises(RuntimeError):
        with ts.combine_stages(3):
            assert ts.COMBINE_STAGES == 3
            raise RuntimeError
    assert ts.COMBINE_STAGES == 1
    with ts.combine_stages(3):
        _compare(_inputs(b=1, d=3, L=40, n=2, h0=True), True, chunk=4)
