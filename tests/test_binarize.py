"""Binarization of arbitrary models: selection, recording, injection, binary activations."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fsg
from fsg.models import MLP, CifarResNet, SmallCNN


def test_binarizes_every_conv_and_linear_by_default():
    m = fsg.binarize(CifarResNet(20), "dorefa")
    layers = fsg.binarized_layers(m)
    expected = [n for n, mod in CifarResNet(20).named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert [l.name for l in layers] == expected
    assert len(layers) == 19 + 2 + 1  # 19 3x3 convs, 2 shortcut 1x1 convs, the classifier
    assert sum(l.latent.numel() for l in layers) == 270896
    # the model keeps its classes and forward signature
    assert isinstance(m.layer1[0].conv1, nn.Conv2d) and m.layer1[0].conv1.stride == (1, 1)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_binary_weight_values_and_latent_untouched():
    torch.manual_seed(0)
    ref = SmallCNN()
    m = SmallCNN()
    m.load_state_dict(ref.state_dict())
    fsg.binarize(m, "bwn")
    refs = dict(ref.named_modules())
    for name, mod in m.named_modules():
        if fsg.is_binarized(mod):
            w = refs[name].weight.detach()
            torch.testing.assert_close(mod.parametrizations.weight.original.detach(), w)
            s = w.abs().mean()
            torch.testing.assert_close(mod.weight.detach(), s * torch.where(w >= 0, 1.0, -1.0))


def test_keep_first_last_include_exclude():
    names = lambda m: [l.name for l in fsg.binarized_layers(m)]
    assert names(fsg.binarize(SmallCNN(), keep_first=True)) == ["conv2", "fc"]
    assert names(fsg.binarize(SmallCNN(), keep_last=True)) == ["conv1", "conv2"]
    assert names(fsg.binarize(SmallCNN(), keep_first=True, keep_last=True)) == ["conv2"]
    assert names(fsg.binarize(SmallCNN(), include=["conv*"])) == ["conv1", "conv2"]
    assert names(fsg.binarize(SmallCNN(), exclude=["conv1"])) == ["conv2", "fc"]
    r = fsg.binarize(CifarResNet(20), exclude=["*downsample*"])
    assert not any("downsample" in n for n in names(r))


def test_errors():
    with pytest.raises(ValueError, match="no Conv or Linear layer"):
        fsg.binarize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="no layer left to binarize"):
        fsg.binarize(SmallCNN(), include=["nothing*"])
    m = fsg.binarize(SmallCNN())
    with pytest.raises(ValueError, match="already binarized"):
        fsg.binarize(m)
    with pytest.raises(ValueError, match="unknown quantizer"):
        fsg.binarize(SmallCNN(), "ternary")
    with pytest.raises(ValueError, match="model has no binarized layer"):
        fsg.Trainer(SmallCNN(), "ste")


def test_records_w_tilde_and_grad_at_binary_weight():
    torch.manual_seed(1)
    m = fsg.binarize(nn.Sequential(nn.Linear(5, 3, bias=False)), "dorefa")
    x = torch.randn(7, 5)
    target = torch.randn(7, 3)
    (layer,) = fsg.binarized_layers(m)
    out = m(x)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    wb = m[0].weight.detach()
    # closed form: L = ||x Ŵᵀ − T||², ∂L/∂Ŵ = 2 (x Ŵᵀ − T)ᵀ x
    g_expected = 2 * (x @ wb.T - target).T @ x
    torch.testing.assert_close(layer.parametrization.grad, g_expected)
    torch.testing.assert_close(layer.parametrization.w_tilde, layer.quantizer.pre(layer.latent.detach()))
    # a forward that is not back-propagated (or runs under no_grad) records nothing
    before = layer.parametrization.grad
    with torch.no_grad():
        m(x)
    m(2 * x)
    assert layer.parametrization.grad is before


def test_functional_call_injects_lookahead_weight():
    torch.manual_seed(2)
    m = fsg.binarize(MLP(4, [6], 2), "sign")
    layers = fsg.binarized_layers(m)
    x = torch.randn(3, 4)
    w_meta = {l.weight_key: -l.latent for l in layers}
    out = functional_call(m, w_meta, (x,))
    # same as a plain model with the negated binary weights
    plain = MLP(4, [6], 2)
    with torch.no_grad():
        for (lin, l) in zip([mod for mod in plain.modules() if isinstance(mod, nn.Linear)], layers):
            lin.weight.copy_(torch.where(-l.latent >= 0, 1.0, -1.0))
            lin.bias.copy_(l.module.bias)
    torch.testing.assert_close(out, plain(x))
    # the recorded W̃ is that of the injected weight
    out.sum().backward()
    torch.testing.assert_close(layers[0].parametrization.w_tilde, -layers[0].latent.detach())


def test_binary_activations_except_first_input():
    torch.manual_seed(3)
    m = fsg.binarize(MLP(4, [5], 3, activation="hardtanh"), "sign", activations=True)
    lin1, lin2 = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    x = torch.randn(6, 4)
    h = torch.nn.functional.hardtanh(x @ lin1.weight.T + lin1.bias)
    hb = torch.where(h >= 0, 1.0, -1.0)
    assert (hb < 0).any() and (hb > 0).any()
    expected = hb @ lin2.weight.T + lin2.bias
    torch.testing.assert_close(m(x), expected)
    # with the first input binarized too
    m2 = fsg.binarize(MLP(4, [5], 3, activation="hardtanh"), "sign", activations=True, binarize_first_input=True)
    m2.load_state_dict(m.state_dict())
    l1 = [mod for mod in m2.modules() if isinstance(mod, nn.Linear)][0]
    xb = torch.where(x >= 0, 1.0, -1.0)
    torch.testing.assert_close(m2.net[0](x), xb @ l1.weight.T + l1.bias)
    # STE on activations: gradient reaches the first layer, clipped at |h| <= 1
    m(x).sum().backward()
    assert lin1.bias.grad is not None and lin1.bias.grad.abs().sum() > 0


def test_binarize_passes_quantizer_options_and_rejects_unknown_ones():
    from fsg.quantizers import QUANTIZERS, Quantizer, register_quantizer, sign_ste

    with pytest.raises(ValueError, match="quantizer 'bwn' has no option 'foo'"):
        fsg.binarize(SmallCNN(), "bwn", foo=1)
    with pytest.raises(ValueError, match="1-bit only"):
        fsg.binarize(SmallCNN(), "sign", bits=2)
    with pytest.raises(ValueError, match="instance"):
        fsg.binarize(SmallCNN(), fsg.quantizers.DoReFa(2), bits=2)
    assert fsg.binarized_layers(fsg.binarize(SmallCNN(), "dorefa", bits=3))[0].quantizer.bits == 3

    @register_quantizer("test-scaled-sign2")
    class ScaledSign(Quantizer):
        def __init__(self, alpha: float = 1.0):  # no bits option at all
            self.alpha = alpha

        def quantize(self, wt):
            return self.alpha * sign_ste(wt)

    try:
        m = fsg.binarize(SmallCNN(), "test-scaled-sign2", alpha=0.5)
        assert {l.quantizer.alpha for l in fsg.binarized_layers(m)} == {0.5}
        assert set(m.conv1.weight.detach().abs().unique().tolist()) == {0.5}
        with pytest.raises(ValueError, match="has no option 'bits'"):
            fsg.binarize(SmallCNN(), "test-scaled-sign2", bits=1)
    finally:
        del QUANTIZERS["test-scaled-sign2"]
