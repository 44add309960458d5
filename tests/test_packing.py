"""Several sequences packed in one row (fsg.ssm.packing, resets through the backends and the
Mamba block) and FSG's flat layout on packed sequences (FSG.packed_slow_gradients)."""

import os

import pytest
import torch

import fsg
from fsg import ssm
from fsg.estimators.fsg import pack_plan
from fsg.ssm.mamba import Mamba

from conftest import make_task


def test_packed_starts_closed_form_and_errors():
    assert ssm.packed_starts([3, 1, 2], 2) == ([0, 5, 8], 10)
    assert ssm.packed_starts([4], 7) == ([0], 4)
    with pytest.raises(ValueError, match="lengths >= 1 and gap >= 0"):
        ssm.packed_starts([3, 0], 1)


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_block_is_each_sequence_alone(backend, low_memory):
    """A Mamba block on sequences packed with d_conv - 1 zeros between them and resets at their
    first tokens gives, at each sequence's positions, the block's output on that sequence alone;
    a loss on those outputs has the gradients (parameters and inputs) of the separate calls'
    losses summed. float64. The "cpu" backend has no resets in its kernels: the call goes to the
    reference scan (same results)."""
    if backend == "cpu" and not ssm.get_backend("cpu").available():
        pytest.skip("C kernels not built")
    torch.manual_seed(0)
    block = Mamba(d_model=1, d_state=5, d_conv=4, expand=3).double()
    seqs = [torch.randn(n, 1, dtype=torch.float64, requires_grad=True) for n in (6, 1, 9, 3)]
    weights = [torch.randn(n, 1, dtype=torch.float64) for n in (6, 1, 9, 3)]
    with ssm.use_backend(backend):
        assert ssm.supports_resets("cpu") == (backend == "reference")
        row, resets, starts = ssm.pack_sequences(seqs, block.d_conv - 1)
        assert row.shape == (1, 6 + 1 + 9 + 3 + 3 * 3, 1) and resets.sum() == 4 and starts == [0, 9, 13, 25]
        out = block(row, low_memory=low_memory, resets=resets)
        got = [out[0, s:s + len(x)] for s, x in zip(starts, seqs)]
        loss = sum((g * w).sum() for g, w in zip(got, weights))
        grads = torch.autograd.grad(loss, seqs + list(block.parameters()))
        alone = [block(x.unsqueeze(0))[0] for x in seqs]
        ref_loss = sum((a * w).sum() for a, w in zip(alone, weights))
        ref = torch.autograd.grad(ref_loss, seqs + list(block.parameters()))
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, rtol=1e-12, atol=1e-12)
    for g, r, name in zip(grads, ref, [f"seq{i}" for i in range(4)] + [n for n, _ in block.named_parameters()]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_without_the_gap_the_conv_reaches_across_sequences():
    """The gap is what isolates the convolution: packed without it, the second sequence's first
    outputs differ from its outputs alone (the test above would fail)."""
    torch.manual_seed(0)
    block = Mamba(d_model=1, d_state=3, d_conv=4, expand=2).double()
    a, b = torch.randn(5, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    with ssm.use_backend("reference"):
        row, resets, starts = ssm.pack_sequences([a, b], 0)
        out = block(row, resets=resets)[0, starts[1]:]
        assert not torch.allclose(out[:3], block(b.unsqueeze(0))[0, :3])


def test_resets_dispatch_to_ops_that_support_them_else_the_reference():
    """A backend whose scan op does not carry supports_resets never sees resets= (the reference
    runs the call); supports_resets tells which is the case."""
    calls = []

    def scan(*args, **kwargs):
        calls.append(sorted(kwargs))
        return ssm.selective_scan_ref(*args, **kwargs)

    ssm.register_backend(ssm.Backend("plain-scan", devices={"cpu"}, selective_scan=scan))
    try:
        with ssm.use_backend("plain-scan"):
            assert not ssm.supports_resets("cpu")
            u, delta = torch.randn(1, 2, 5), torch.rand(1, 2, 5)
            A, B, C = -torch.rand(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5)
            resets = torch.tensor([[False, False, True, False, False]])
            y = ssm.selective_scan(u, delta, A, B, C, resets=resets)
            assert calls == []
            torch.testing.assert_close(y, ssm.selective_scan_ref(u, delta, A, B, C, resets=resets))
            ssm.selective_scan(u, delta, A, B, C)
            assert len(calls) == 1 and "resets" not in calls[0]
            scan.supports_resets = True
            assert ssm.supports_resets("cpu")
            ssm.selective_scan(u, delta, A, B, C, resets=resets)
            assert "resets" in calls[-1]
    finally:
        ssm.unregister_backend("plain-scan")


def test_block_resets_errors():
    block = Mamba(d_model=1, d_state=2, d_conv=2, expand=2)
    x = torch.randn(1, 5, 1)
    with pytest.raises(ValueError, match=r"resets must be a bool tensor of shape \(B, T\) = \(1, 5\)"):
        block(x, resets=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="resets must be a bool tensor"):
        block(x, resets=torch.zeros(1, 5))


def test_pack_plan_fills_calls_first_fit_decreasing_up_to_the_longest():
    """Layers of 64, 16, 8, 24 weights, history 3, a first token, gap 7: sequences of 193, 49,
    25, 73 tokens; the 193 alone, then 73 + 7 + 49 + 7 + 25 = 161 <= 193 in one call (in layer
    order). The first tokens and the G_slow positions (each sequence's last n_l outputs in the
    concatenated rows) follow."""
    hist = [[64] * 3, [16] * 3, [8] * 3, [24] * 3]
    plan = pack_plan(hist, 1, 7, "cpu")
    assert plan.calls == ((0,), (1, 2, 3)) and plan.lengths == (193, 161)
    assert plan.lre_at.tolist() == [0, 193, 193 + 56, 193 + 56 + 32]
    assert [r.nonzero()[:, 1].tolist() for r in plan.resets] == [[0], [0, 56, 88]]
    expect = [list(range(193 - 64, 193)), list(range(193 + 49 - 16, 193 + 49)),
              list(range(193 + 81 - 8, 193 + 81)), list(range(354 - 24, 354))]
    assert plan.gather.tolist() == [i for e in expect for i in e]
    assert sum(size if kind != "history" else hist[m][size] for kind, m, size in plan.pieces) == 354
    one = pack_plan([[5, 5]], 0, 3, "cpu")  # a single layer, no first token
    assert one.calls == ((0,),) and one.lengths == (10,) and one.gather.tolist() == list(range(5, 10))


@pytest.mark.parametrize("recompute", [True, False])
def test_fsg_flat_on_packed_sequences_trains_like_per_layer(recompute):
    """batch_layers on a backend with resets (the reference): the flat layout's slow-net runs on
    the layers' sequences packed in 2 calls instead of 4 (layers of 64, 16, 8, 24 weights, history
    3, see the plan test), and trains as the per-layer run up to float rounding: losses, latent
    weights and every hypernetwork parameter after 6 steps."""
    from fsg.models import MLP

    x, y = make_task(n=32, d=4, k=3)
    runs = {}
    with ssm.use_backend("reference"):
        for batch in (False, True):
            torch.manual_seed(0)
            tr = fsg.Trainer(fsg.binarize(MLP(4, [16, 1, 8], 3), "dorefa"), "fsg", lr=0.05, history=3,
                             expand=4, d_state=4, batch_layers=batch, recompute=recompute)
            calls = []
            tr.estimator.slow.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
            losses = [tr.step(x, y).loss for _ in range(6)]
            runs[batch] = (tr, losses, calls)
    (t0, l0, c0), (t1, l1, c1) = runs[False], runs[True]
    assert [l.latent.numel() for l in t0.layers] == [64, 16, 8, 24]
    assert c0[-4:] == [(1, 193, 1), (1, 49, 1), (1, 25, 1), (1, 73, 1)]
    assert c1[-2:] == [(1, 193, 1), (1, 161, 1)]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=1e-7)
    for a, b in zip(t0.layers, t1.layers):
        torch.testing.assert_close(b.latent, a.latent, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(t0.estimator.named_parameters(), t1.estimator.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_fsg_flat_packed_on_the_triton_kernels_follows_the_reference(fast_triton_interpreter):
    """The flat layout's packed calls through the Triton backend's kernels (the interpreter, on
    the CPU: its scan with resets and its low-memory block) train as the reference backend's
    packed calls: the same losses and hypernetwork parameters to float32 tolerance over 3 steps
    (history 2, the 193- and 161-token rows of the plan test shortened: 129 and 113 tokens, several
    chunks each)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    from fsg.models import MLP
    from fsg.ssm import backends

    t = backends.TRITON
    if t.unavailable_reason() is not None:
        pytest.skip(t.unavailable_reason())
    ssm.register_backend(ssm.Backend("triton-on-cpu", devices={"cpu"}, selective_scan=t.selective_scan,
                                     mamba_low_memory=t.mamba_low_memory))
    x, y = make_task(n=16, d=4, k=3)
    runs = {}
    try:
        for backend in ("reference", "triton-on-cpu"):
            with ssm.use_backend(backend):
                assert ssm.supports_resets("cpu")
                torch.manual_seed(0)
                tr = fsg.Trainer(fsg.binarize(MLP(4, [16, 1, 8], 3), "dorefa"), "fsg", lr=0.05, history=2,
                                 expand=4, d_state=3, batch_layers=True)
                calls = []
                tr.estimator.slow.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
                runs[backend] = ([tr.step(x, y).loss for _ in range(3)], calls, tr)
    finally:
        ssm.unregister_backend("triton-on-cpu")
    (l0, c0, t0), (l1, c1, t1) = runs["reference"], runs["triton-on-cpu"]
    assert c1 == c0 and c1[-2:] == [(1, 129, 1), (1, 113, 1)]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(t0.estimator.named_parameters(), t1.estimator.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
