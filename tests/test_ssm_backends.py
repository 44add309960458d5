"""fsg.ssm: the backend interface, registry, per-device selection, dispatch and fallbacks."""

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fsg
from fsg import ssm
from fsg.ssm.mamba import Mamba, get_scan_impl, register_scan_impl, set_scan_impl, use_scan_impl
from fsg.ssm import Backend, backends
from fsg.ssm.reference import causal_conv1d as conv_ref
from fsg.ssm.reference import selective_scan_ref

from conftest import make_mlp, make_task

SSM_DIR = Path(fsg.__file__).parent / "ssm"


@pytest.fixture(autouse=True)
def _isolated_registry():
    saved, selected = dict(backends._REGISTRY), ssm.current_backend()
    yield
    backends._REGISTRY.clear()
    backends._REGISTRY.update(saved)
    ssm.set_backend(selected)


def scan_inputs(batch=2, dim=3, length=7, dstate=4, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    t = dict(u=r(batch, dim, length), delta=0.5 * r(batch, dim, length), A=-torch.rand(dim, dstate, generator=g),
             B=r(batch, dstate, length), C=r(batch, dstate, length), D=r(dim), z=r(batch, dim, length),
             delta_bias=0.1 * r(dim))
    return {k: v.to(device) for k, v in t.items()}


def call_scan(fn, t, **kw):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
              delta_softplus=True, **kw)


class Counting:
    """A backend wrapping the reference that counts the calls of each operation."""

    def __init__(self, name="counting", devices=("cpu",), ops=("selective_scan", "causal_conv1d",
                                                              "mamba_low_memory", "selective_scan_step")):
        self.calls = {"selective_scan": 0, "causal_conv1d": 0, "mamba_low_memory": 0, "selective_scan_step": 0}
        self.last_out = []
        impl = dict(selective_scan=self.scan, causal_conv1d=self.conv, mamba_low_memory=self.low_memory,
                    selective_scan_step=self.step)
        self.backend = Backend(name, devices=devices, **{k: impl[k] for k in ops})

    def scan(self, *a, **k):
        self.calls["selective_scan"] += 1
        return selective_scan_ref(*a, **k)

    def conv(self, x, w, b, silu):
        self.calls["causal_conv1d"] += 1
        return conv_ref(x, w, b, silu)

    def low_memory(self, block, x):
        self.calls["mamba_low_memory"] += 1
        return torch.utils.checkpoint.checkpoint(block.plain_forward, x, use_reentrant=False)

    def step(self, *a, last_out=None, **k):
        self.calls["selective_scan_step"] += 1
        self.last_out.append(last_out)
        return selective_scan_ref(*a, **k)


def block_and_input(d_model=2, length=9, seed=0):
    torch.manual_seed(seed)
    m = Mamba(d_model, d_state=4, d_conv=3, expand=3)
    return m, torch.randn(2, length, d_model)


# ---------------------------------------------------------------------------
# A user-registered backend is honoured everywhere
# ---------------------------------------------------------------------------


def test_user_backend_used_by_scan_conv_low_memory_and_stream():
    spy = Counting()
    ssm.register_backend(spy.backend)
    assert "counting" in ssm.list_backends() and ssm.get_backend("counting") is spy.backend
    t = scan_inputs()
    m, x = block_and_input()
    with ssm.use_backend("reference"):
        y_ref = m(x)
        s_ref = m.stream(x[:, :5])[0]

    with ssm.use_backend("counting"):
        assert ssm.current_backend() == "counting"
        torch.testing.assert_close(call_scan(ssm.selective_scan, t), call_scan(selective_scan_ref, t), rtol=0, atol=0)
        assert spy.calls["selective_scan"] == 1
        w = torch.randn(3, 2)
        ssm.causal_conv1d(t["u"], w, None, silu=True)
        assert spy.calls["causal_conv1d"] == 1

        y = m(x)  # the block's conv and scan
        assert spy.calls == dict(selective_scan=2, causal_conv1d=2, mamba_low_memory=0, selective_scan_step=0)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)

        y_lm = m(x.requires_grad_(), low_memory=True)
        assert spy.calls["mamba_low_memory"] == 1
        torch.testing.assert_close(y_lm, y_ref, rtol=0, atol=0)

        buf = torch.empty(2, m.d_inner, m.d_state)
        out, state = m.stream(x[:, :5], state_buffer=buf)
        assert spy.calls["selective_scan_step"] == 1 and spy.last_out[-1] is buf
        torch.testing.assert_close(out, s_ref, rtol=0, atol=0)
        m.stream(x[:, 5:6], state)
        assert spy.calls["selective_scan_step"] == 2 and spy.last_out[-1] is None
    assert ssm.current_backend() == "auto"


def test_missing_ops_fall_back_to_reference_and_the_backends_own_scan():
    """A backend with only a scan: reference conv, checkpointed low-memory block running its scan,
    streaming through its scan; values and gradients as with the reference."""
    spy = Counting("scan-only", devices=None, ops=("selective_scan",))
    ssm.register_backend(spy.backend)
    m, x = block_and_input()
    x.requires_grad_()
    with ssm.use_backend("reference"):
        y_ref = m(x)
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x] + list(m.parameters()))
    with ssm.use_backend("scan-only"):
        y = m(x, low_memory=True)
        assert spy.calls["selective_scan"] == 1
        g = torch.autograd.grad(y.square().sum(), [x] + list(m.parameters()))
        assert spy.calls["selective_scan"] == 2  # recomputed by the checkpoint, with this backend
        m.stream(x[:, :4].detach(), state_buffer=torch.empty(2, m.d_inner, m.d_state))
        assert spy.calls["selective_scan"] == 3
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_conv_op_may_decline_and_the_reference_is_used():
    ssm.register_backend(Backend("declines", causal_conv1d=lambda x, w, b, silu: None))
    x, w, b = torch.randn(2, 3, 6), torch.randn(3, 4), torch.randn(3)
    with ssm.use_backend("declines"):
        out = ssm.causal_conv1d(x, w, b, silu=True)
    torch.testing.assert_close(out, conv_ref(x, w, b, True), rtol=0, atol=0)


def test_user_backend_reaches_the_fsg_estimator():
    spy = Counting(devices=None)
    ssm.register_backend(spy.backend)
    x, y = make_task(n=16)
    for layout, op in (("flat", "mamba_low_memory"), ("stream", "selective_scan_step")):
        tr = fsg.Trainer(fsg.binarize(make_mlp(), "dorefa"), "fsg", lr=0.05, layout=layout, expand=4)
        before = dict(spy.calls)
        with ssm.use_backend("counting"):
            tr.step(x, y)
            tr.step(x, y)
        assert spy.calls[op] > before[op], layout


# ---------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------


def test_auto_on_cpu_picks_the_c_kernels_when_available_else_the_reference(monkeypatch):
    monkeypatch.setattr(ssm.cpu, "available", lambda: True)
    assert ssm.select_backend("cpu").name == "cpu"
    assert ssm.select_backend(torch.device("cpu")) is ssm.get_backend("cpu")
    monkeypatch.setattr(ssm.cpu, "available", lambda: False)
    monkeypatch.setattr(ssm.cpu, "_error", "no C compiler (cc/gcc) found")
    assert ssm.select_backend("cpu").name == "reference"
    assert "no C compiler" in ssm.get_backend("cpu").unavailable_reason()
    t = scan_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the CPU
        torch.testing.assert_close(call_scan(ssm.selective_scan, t), call_scan(selective_scan_ref, t), rtol=0, atol=0)


@pytest.mark.skipif(not ssm.cpu.available(), reason="C kernels unavailable")
def test_auto_on_cpu_runs_the_c_kernels(monkeypatch):
    calls = []
    real = ssm.cpu._FusedScan.apply
    monkeypatch.setattr(ssm.cpu._FusedScan, "apply", lambda *a: calls.append(1) or real(*a))
    call_scan(ssm.selective_scan, scan_inputs())
    assert calls


def _fake_cuda_availability(monkeypatch, mamba_ssm=None, triton=None):
    monkeypatch.setattr(ssm.get_backend("mamba_ssm"), "check_available", lambda: mamba_ssm)
    monkeypatch.setattr(ssm.get_backend("triton"), "check_available", lambda: triton)
    monkeypatch.setattr(backends, "_warned", set())


def test_auto_on_cuda_prefers_mamba_ssm_then_triton(monkeypatch):
    _fake_cuda_availability(monkeypatch)
    assert ssm.select_backend("cuda").name == "mamba_ssm"
    assert ssm.select_backend("cuda:0").name == "mamba_ssm"
    _fake_cuda_availability(monkeypatch, mamba_ssm="not installed")
    assert ssm.select_backend("cuda").name == "triton"
    assert ssm.select_backend("cpu").name in ("cpu", "reference")  # never a CUDA backend for the CPU


def test_auto_on_cuda_warns_once_when_it_falls_back_to_the_reference(monkeypatch):
    _fake_cuda_availability(monkeypatch, mamba_ssm="not installed", triton="not installed")
    with pytest.warns(RuntimeWarning, match="pip install mamba-ssm") as record:
        assert ssm.select_backend("cuda").name == "reference"
    assert len(record) == 1
    msg = str(record[0].message)
    assert "\n" not in msg and "mamba_ssm" in msg and "triton" in msg and "reference" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ssm.select_backend("cuda").name == "reference"  # only once


def test_explicit_backend_for_the_wrong_device_is_one_value_error_line():
    ssm.set_backend("cpu")
    with pytest.raises(ValueError) as err:
        ssm.select_backend("cuda")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'cpu'" in msg and "cuda tensors" in msg and "set_backend" in msg and "'auto'" in msg
    t = scan_inputs(device="meta")
    with pytest.raises(ValueError, match="scan backend 'cpu' cannot run on meta tensors"):
        call_scan(ssm.selective_scan, t)


def test_fake_cuda_only_backend_with_cpu_tensors_gives_a_clear_error():
    def boom(*a, **k):
        raise AssertionError("must not be called")

    ssm.register_backend(Backend("fake-cuda", devices={"cuda"}, selective_scan=boom, causal_conv1d=boom,
                                 mamba_low_memory=boom, selective_scan_step=boom))
    m, x = block_and_input()
    with ssm.use_backend("fake-cuda"):
        for run in (lambda: call_scan(ssm.selective_scan, scan_inputs()), lambda: m(x),
                    lambda: m(x.requires_grad_(), low_memory=True), lambda: m.stream(x)):
            with pytest.raises(ValueError) as err:
                run()
            msg = str(err.value)
            assert "\n" not in msg
            assert msg.startswith("scan backend 'fake-cuda' cannot run on cpu tensors (it supports cuda)")


def test_explicit_unavailable_backend_is_one_value_error_line(monkeypatch):
    monkeypatch.setattr(ssm.get_backend("mamba_ssm"), "check_available", lambda: "cannot import mamba_ssm")
    with ssm.use_backend("mamba_ssm"):
        with pytest.raises(ValueError) as err:
            ssm.select_backend("cuda")
    assert "\n" not in str(err.value) and "not available here (cannot import mamba_ssm)" in str(err.value)


def test_unknown_backend_name_lists_the_choices():
    choices = ", ".join(repr(n) for n in ["auto"] + ssm.list_backends())
    assert "'cpu', 'mamba_ssm', 'reference', 'triton'" in choices
    for call in (lambda: ssm.set_backend("nope"), lambda: ssm.get_backend("nope")):
        with pytest.raises(ValueError, match=f"unknown scan backend 'nope'; choose one of: {choices}"):
            call()
    with pytest.raises(ValueError):
        with ssm.use_backend("nope"):
            pass
    assert ssm.current_backend() == "auto"


def test_use_backend_restores_and_unregister_resets_selection():
    ssm.register_backend(Backend("mine"))
    with ssm.use_backend("reference"):
        with pytest.raises(RuntimeError):
            with ssm.use_backend("mine"):
                raise RuntimeError
        assert ssm.current_backend() == "reference"
    ssm.set_backend("mine")
    ssm.unregister_backend("mine")
    assert ssm.current_backend() == "auto" and "mine" not in ssm.list_backends()


def test_backend_validation():
    with pytest.raises(ValueError, match="reserved"):
        Backend("auto")
    with pytest.raises(ValueError, match="must be callable"):
        Backend("x", selective_scan=3)
    with pytest.raises(ValueError):
        Backend("")
    with pytest.raises(ValueError):
        ssm.register_backend(object())
    b = Backend("x", devices="cuda", check_available=lambda: 1 / 0)
    assert b.devices == frozenset({"cuda"}) and b.supports("cuda:1") and not b.supports("cpu")
    assert not b.available() and "ZeroDivisionError" in b.unavailable_reason()


def test_user_backend_with_priority_is_picked_by_auto(monkeypatch):
    spy = Counting("fast-cpu")
    spy.backend.priority = 100
    ssm.register_backend(spy.backend)
    assert ssm.select_backend("cpu") is spy.backend
    call_scan(ssm.selective_scan, scan_inputs())
    assert spy.calls["selective_scan"] == 1


# ---------------------------------------------------------------------------
# Built-in backends
# ---------------------------------------------------------------------------


def test_mamba_ssm_backend_calls_its_kernel_and_uses_the_reference_for_an_initial_state(monkeypatch):
    seen = []

    def fake_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        seen.append(return_last_state)
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state)

    monkeypatch.setitem(backends._lazy, "mamba_ssm", fake_kernel)
    scan = ssm.get_backend("mamba_ssm").selective_scan
    t = scan_inputs()
    torch.testing.assert_close(call_scan(scan, t), call_scan(selective_scan_ref, t), rtol=0, atol=0)
    assert seen == [False]
    h0 = torch.randn(2, 3, 4)
    y, h = call_scan(scan, t, return_last_state=True, initial_state=h0)
    y_ref, h_ref = call_scan(selective_scan_ref, t, return_last_state=True, initial_state=h0)
    assert seen == [False]  # not the kernel: it has no initial state
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_builtin_backends_declare_devices_and_priorities():
    ref, cpu, mssm, tri = (ssm.get_backend(n) for n in ("reference", "cpu", "mamba_ssm", "triton"))
    assert ref.devices is None and ref.priority is None and ref.available()
    assert cpu.devices == {"cpu"} and mssm.devices == {"cuda"} and tri.devices == {"cuda"}
    assert mssm.priority > tri.priority
    assert cpu.selective_scan is ssm.cpu.selective_scan_fused and cpu.mamba_low_memory is ssm.cpu.mamba_low_memory
    for b in (mssm, tri):
        reason = b.unavailable_reason()
        assert reason is None or (isinstance(reason, str) and "\n" not in reason)


# ---------------------------------------------------------------------------
# Compatibility and layering
# ---------------------------------------------------------------------------


def test_old_scan_impl_names_map_to_backends():
    with pytest.warns(DeprecationWarning, match="fsg.ssm.set_backend"):
        set_scan_impl("fused")
    assert ssm.current_backend() == "cpu" and get_scan_impl() == "fused"
    with pytest.warns(DeprecationWarning):
        with use_scan_impl("ref"):
            assert ssm.current_backend() == "reference" and get_scan_impl() == "ref"
    assert ssm.current_backend() == "cpu"
    with pytest.warns(DeprecationWarning):
        set_scan_impl("auto")
    assert ssm.current_backend() == "auto" and get_scan_impl() == "auto"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="unknown scan implementation 'x'"):
        set_scan_impl("x")


def test_register_scan_impl_on_an_existing_backend_replaces_only_its_scan():
    spy = Counting()
    with pytest.warns(DeprecationWarning):
        register_scan_impl("fused", spy.scan)
    cpu = ssm.get_backend("cpu")
    assert cpu.selective_scan == spy.scan and cpu.devices == {"cpu"} and cpu.mamba_low_memory is not None
    with pytest.warns(DeprecationWarning):
        register_scan_impl("new-one", spy.scan)
    assert ssm.get_backend("new-one").devices is None


def test_scan_cpu_is_the_moved_module():
    import fsg.ssm.cpu
    from fsg.ssm.cpu import selective_scan_fused

    assert fsg.ssm.cpu is ssm.cpu and selective_scan_fused is ssm.cpu.selective_scan_fused


def _fsg_imports(path: Path):
    """Modules of fsg imported by ``path`` (a file of fsg/ssm), as absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = {0: "", 1: "fsg.ssm", 2: "fsg"}.get(node.level, "<outside fsg>")
            base = ".".join(p for p in (package, node.module) if p)
            found += [base] if node.module else [f"{base}.{a.name}" for a in node.names]
    return [name for name in found if name.split(".")[0] in ("fsg", "<outside fsg>")]


def test_ssm_modules_import_nothing_of_fsg_outside_ssm():
    files = sorted(SSM_DIR.glob("*.py"))
    assert {"__init__.py", "backends.py", "cpu.py", "reference.py"} <= {f.name for f in files}
    for f in files:
        for name in _fsg_imports(f):
            assert name.startswith("fsg.ssm"), (f.name, name)
    assert "fsg.ssm.reference" in _fsg_imports(SSM_DIR / "cpu.py")
    assert _fsg_imports(SSM_DIR / "reference.py") == []


def test_ssm_imports_and_runs_without_fsg_mamba():
    """Load fsg.ssm with a bare ``fsg`` package (fsg/__init__ itself imports fsg.ssm.mamba)."""
    code = (
        "import sys, types, torch\n"
        f"pkg = types.ModuleType('fsg'); pkg.__path__ = [{str(SSM_DIR.parent)!r}]; sys.modules['fsg'] = pkg\n"
        "import fsg.ssm as s\n"
        "assert 'fsg.ssm.mamba' not in sys.modules, sorted(m for m in sys.modules if m.startswith('fsg'))\n"
        "u = torch.randn(1, 2, 5); A = -torch.rand(2, 3); B = torch.randn(1, 3, 5)\n"
        "s.selective_scan(u, u, A, B, B); s.causal_conv1d(u, torch.randn(2, 3))\n"
        "assert 'fsg.ssm.mamba' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "FSG_NO_COMPILE": "1"})
