"""fsg.estimators.nets.run_lstm: the CPU LSTM without oneDNN, bit-identical, no global state touched."""

import itertools

import pytest
import torch
from torch import nn

from fsg.estimators.nets import run_lstm


def _lstm_without_onednn(lstm, x, state):
    """The numbers run_lstm must keep: ``lstm(x, state)`` with oneDNN disabled."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return lstm(x, state)
    finally:
        torch.backends.mkldnn.enabled = old


def _run(fn, hidden, n, steps, inp, with_state, batch_first=False, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    lstm = nn.LSTM(inp, hidden, batch_first=batch_first, bias=bias).to(dtype)
    g = torch.Generator().manual_seed(n * 31 + steps)
    shape = (n, steps, inp) if batch_first else (steps, n, inp)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    state = tuple((0.5 * torch.randn(1, n, hidden, generator=g, dtype=dtype)).requires_grad_()
                  for _ in range(2)) if with_state else None
    out, (h, c) = fn(lstm, x, state)
    loss = (out * torch.randn(out.shape, generator=g, dtype=dtype)).sum() + (0.7 * h).sum() + (c * c).sum()
    leaves = [x, *lstm.parameters(), *(state or ())]
    return [out, h, c, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("n,hidden,steps,inp,with_state", [
    (n, h, t, i, s) for n, h, t, i, s in itertools.product([1, 7, 433, 3000], [100, 16], [1, 3], [1, 4], [False, True])
])
def test_run_lstm_is_bit_identical_to_the_lstm_without_onednn(n, hidden, steps, inp, with_state):
    a = _run(run_lstm, hidden, n, steps, inp, with_state)
    b = _run(_lstm_without_onednn, hidden, n, steps, inp, with_state)
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.shape == v.shape and torch.equal(u, v), i


@pytest.mark.parametrize("options", [dict(batch_first=True), dict(bias=False), dict(dtype=torch.float64)])
def test_run_lstm_variants_are_bit_identical(options):
    a = _run(run_lstm, 10, 5, 3, 2, True, **options)
    b = _run(_lstm_without_onednn, 10, 5, 3, 2, True, **options)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_run_lstm_leaves_the_global_onednn_flag_alone(monkeypatch):
    """No write to torch.backends.mkldnn.enabled (process-global: another thread would see it off)."""
    writes = []
    monkeypatch.setattr(type(torch.backends.mkldnn), "enabled",
                        property(lambda self: torch._C._get_mkldnn_enabled(), lambda self, v: writes.append(v)))
    torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled  # the recorder works
    assert writes == [torch._C._get_mkldnn_enabled()]
    writes.clear()
    lstm = nn.LSTM(1, 8)
    x = torch.randn(1, 50, 1, requires_grad=True)
    out, (h, c) = run_lstm(lstm, x)
    (out.sum() + c.sum()).backward()
    with torch.no_grad():
        run_lstm(lstm, x.detach(), (h.detach(), c.detach()))
    assert writes == []
