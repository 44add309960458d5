"""Quantizers against closed forms, STE gradients, calibration against finite differences."""

import pytest
import torch

import fsg
from fsg.quantizers import BWN, DoReFa, Sign, binary_sign, get_quantizer, round_ste, sign_ste


def _w(seed=0, shape=(6, 5), scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale)


def test_binary_sign_of_zero_is_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0])
    assert binary_sign(x).tolist() == [-1, 1, 1, 1, -1, 1]
    assert sign_ste(x).tolist() == [-1, 1, 1, 1, -1, 1]


def test_dorefa_forward_closed_form_1bit():
    w = _w()
    q = DoReFa(1)
    t = torch.tanh(w)
    wt_expected = t / (2 * t.abs().max()) + 0.5
    torch.testing.assert_close(q.pre(w), wt_expected)
    assert wt_expected.min() >= 0 and wt_expected.max() <= 1
    wb = q(w)
    torch.testing.assert_close(wb, torch.where(wt_expected >= 0.5, 1.0, -1.0).double())
    assert set(wb.unique().tolist()) <= {-1.0, 1.0}
    # 1-bit dorefa is sign(W) (ties at W = 0 round half to even: W̃ = 0.5 → 0 → -1)
    nz = w != 0
    assert torch.equal(wb[nz], torch.sign(w[nz]))


@pytest.mark.parametrize("bits", [2, 3])
def test_dorefa_forward_kbit_levels(bits):
    w = _w(1, (50,))
    q = DoReFa(bits)
    n = 2**bits - 1
    t = torch.tanh(w)
    wt = t / (2 * t.abs().max()) + 0.5
    torch.testing.assert_close(q(w), 2 * torch.round(n * wt) / n - 1)
    assert len(q(w).unique()) <= 2**bits


def test_dorefa_ste_gradient_equals_calibration_times_g():
    """The STE gradient through dorefa w.r.t. W is exactly c(W) ⊙ ∂L/∂Ŵ."""
    w = _w(2).requires_grad_()
    g = _w(3)
    q = DoReFa(1)
    q(w).backward(g)
    t = torch.tanh(w.detach())
    c_closed = (1 - t**2) / t.abs().max()
    torch.testing.assert_close(q.calibration(w), c_closed)
    torch.testing.assert_close(w.grad, c_closed * g)


def test_dorefa_calibration_is_twice_derivative_of_A_by_finite_differences():
    w = _w(4)
    q = DoReFa(1)
    c = q.calibration(w)
    flat = w.flatten()
    argmax = torch.tanh(flat).abs().argmax()
    eps = 1e-6
    for i in range(flat.numel()):
        if i == argmax:  # perturbing the max element moves the (constant) max itself
            continue
        e = torch.zeros_like(flat)
        e[i] = eps
        fd = (q.pre((flat + e).view_as(w)) - q.pre((flat - e).view_as(w))).flatten()[i] / (2 * eps)
        assert abs(2 * fd.item() - c.flatten()[i].item()) < 1e-7


def test_dorefa_calibration_gradcheck_of_A_with_max_held_constant():
    w = _w(5).requires_grad_()
    q = DoReFa(1)
    # autograd derivative of A (max detached) is the exact derivative; c is twice it
    (grad,) = torch.autograd.grad(q.pre(w).sum(), w)
    torch.testing.assert_close(q.calibration(w), 2 * grad)


def test_bwn_forward_and_ste():
    w = _w(6, (40,), scale=1.2).requires_grad_()
    q = BWN()
    wb = q(w)
    s = w.detach().abs().mean()
    torch.testing.assert_close(wb, s * torch.where(w.detach() >= 0, 1.0, -1.0).double())
    assert torch.allclose(wb.detach().abs(), s.expand_as(wb))
    g = _w(7, (40,))
    wb.backward(g)
    # identity STE clipped at |W| <= 1; the scale is a constant and not applied to the gradient
    torch.testing.assert_close(w.grad, g * (w.detach().abs() <= 1))
    assert (w.detach().abs() > 1).any() and (w.detach().abs() <= 1).any()
    torch.testing.assert_close(q.calibration(w), torch.ones_like(w))


def test_sign_quantizer_is_plain_sign_with_clipped_ste():
    w = torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    q = Sign()
    out = q(w)
    assert out.tolist() == [-1, -1, 1, 1, 1, 1]
    out.backward(torch.arange(1.0, 7.0))
    assert w.grad.tolist() == [0, 2, 3, 4, 5, 0]


def test_round_ste_gradient_clipped():
    x = torch.tensor([-1.5, -0.3, 0.2, 0.9, 1.2], requires_grad=True)
    y = round_ste(x, 1)
    assert y.tolist() == [-2, -0, 0, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_registry_and_errors():
    assert set(fsg.QUANTIZERS) >= {"dorefa", "bwn", "sign"}
    assert isinstance(get_quantizer("dorefa", bits=2), DoReFa)
    q = Sign()
    assert get_quantizer(q) is q
    with pytest.raises(ValueError, match="unknown quantizer 'xnor'.*dorefa"):
        get_quantizer("xnor")
    with pytest.raises(ValueError, match="1-bit only"):
        get_quantizer("bwn", bits=2)
    with pytest.raises(ValueError, match="bits"):
        DoReFa(0)


def test_all_zero_weight_does_not_produce_nan():
    w = torch.zeros(4, requires_grad=True)
    q = DoReFa(1)
    out = q(w)
    assert torch.isfinite(out).all() and torch.isfinite(q.calibration(w)).all()


def test_unknown_option_is_rejected_not_dropped():
    for name in ("bwn", "sign", "dorefa"):
        with pytest.raises(ValueError, match=rf"quantizer '{name}' has no option 'foo' \(its options: bits\)"):
            get_quantizer(name, foo=1)
    with pytest.raises(ValueError, match="1-bit only"):
        get_quantizer("sign", bits=3)
    assert isinstance(get_quantizer("sign", bits=1), Sign)
    with pytest.raises(ValueError, match="instance"):
        get_quantizer(DoReFa(2), bits=2)


def test_registered_quantizer_gets_its_options():
    from fsg.quantizers import QUANTIZERS, Quantizer, quantizer_options, register_quantizer

    @register_quantizer("test-scaled-sign")
    class ScaledSign(Quantizer):
        def __init__(self, bits: int = 1, alpha: float = 1.0):
            super().__init__(bits)
            self.alpha = alpha

        def quantize(self, wt):
            return self.alpha * sign_ste(wt)

    try:
        assert QUANTIZERS["test-scaled-sign"] is ScaledSign and ScaledSign.name == "test-scaled-sign"
        assert quantizer_options(ScaledSign) == ("bits", "alpha")
        q = get_quantizer("test-scaled-sign", alpha=0.25)
        assert q.alpha == 0.25
        assert torch.equal(q(torch.tensor([-2.0, 3.0])), torch.tensor([-0.25, 0.25]))
        with pytest.raises(ValueError, match="is 1-bit only"):
            get_quantizer("test-scaled-sign", bits=2, alpha=0.25)
    finally:
        del QUANTIZERS["test-scaled-sign"]


def test_builtin_quantizers_register_with_the_decorator():
    import inspect

    import fsg.quantizers as quantizers

    src = inspect.getsource(quantizers)
    for cls in (DoReFa, BWN, Sign):
        assert f'@register_quantizer("{cls.name}")\nclass {cls.__name__}(' in src
        assert fsg.QUANTIZERS[cls.name] is cls
