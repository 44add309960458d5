"""1-bit activations (1W1A): sign with a clipped STE on the inputs of binarized layers, with
every estimator, the look-ahead forward included, and end to end through `fsg train`."""

import json
import warnings

import pytest
import torch
from torch import nn

import fsg
from fsg.models import MLP, CifarResNet, SmallCNN

from conftest import make_task

ESTIMATORS = [("ste", {}), ("fc-grad", {}), ("multifc", {}), ("lstmfc", {}), ("fsg", {"history": 2}),
              ("fsg", {"update": "fast", "history": 2}), ("fsg", {"layout": "stream"})]


def _record_inputs(model):
    """Forward pre-hooks registered after binarize's: they see what each binarized layer gets."""
    seen = {}
    for layer in fsg.binarized_layers(model):
        def hook(m, args, name=layer.name):
            seen.setdefault(name, []).append(args[0].detach().clone())
        layer.module.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in ESTIMATORS])
def test_every_estimator_trains_with_binary_activations(name, opts):
    x, y = make_task(n=96, d=8, k=3, seed=1)
    torch.manual_seed(0)
    model = fsg.binarize(MLP(8, [32, 32], 3, activation="hardtanh"), "dorefa", activations=True)
    seen = _record_inputs(model)
    trainer = fsg.Trainer(model, name, optimizer="sgd", lr=0.05, **opts)
    loss0 = torch.nn.functional.cross_entropy(model(x), y).item()
    seen.clear()
    for _ in range(60):  # LSTMFC's loss first rises for ~30 steps (with and without 1W1A)
        trainer.step(x, y)
    first, *rest = [l.name for l in fsg.binarized_layers(model)]
    # the image goes in as is; every other binarized layer saw exactly ±1 in every forward,
    # the look-ahead forwards (functional_call) included
    assert not torch.equal(seen[first][0].abs(), torch.ones_like(seen[first][0]))
    for n in rest:
        assert len(seen[n]) == 60
        assert all(bool((v.abs() == 1).all()) for v in seen[n]), n
    loss1 = torch.nn.functional.cross_entropy(model(x), y).item()
    assert loss1 < 0.7 * loss0, (name, loss0, loss1)
    # evaluation uses binary activations too: a model without the hooks gives other outputs
    plain = MLP(8, [32, 32], 3, activation="hardtanh")
    fsg.binarize(plain, "dorefa")
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x))


def test_sign_activation_forward_and_clipped_ste_backward():
    torch.manual_seed(0)
    model = fsg.binarize(MLP(3, [4], 2, activation="hardtanh"), "sign", activations=True)
    lin1, lin2 = model.net[0], model.net[2]
    x = torch.randn(5, 3)
    h = torch.nn.functional.hardtanh(lin1(x)).detach().requires_grad_(True)
    hb = torch.where(h >= 0, 1.0, -1.0)
    expected = hb @ lin2.weight.T + lin2.bias
    out = model.net[2](h)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    # d out / d h through the STE: (g @ Ŵ2) · 1[|h| ≤ 1]
    torch.testing.assert_close(h.grad, (g @ lin2.weight) * (h.abs() <= 1).float())


def test_first_layer_is_the_models_not_the_first_binarized():
    """With keep_first the first *binarized* layer's input is an activation: it is binarized."""
    model = fsg.binarize(MLP(4, [6, 6], 2, activation="hardtanh"), "dorefa", activations=True, keep_first=True)
    seen = _record_inputs(model)
    model(torch.randn(7, 4) * 3)
    names = [l.name for l in fsg.binarized_layers(model)]
    assert names == ["net.2", "net.4"]
    for n in names:
        assert bool((seen[n][0].abs() == 1).all())


def test_relu_before_a_binary_activation_warns():
    model = fsg.binarize(SmallCNN(in_channels=1, num_classes=3, width=4), "dorefa", activations=True)
    with pytest.warns(UserWarning, match="no negative value"):
        model(torch.randn(2, 1, 8, 8))
    ok = fsg.binarize(SmallCNN(in_channels=1, num_classes=3, width=4, activation="hardtanh"), "dorefa",
                      activations=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok(torch.randn(2, 1, 8, 8))


def test_hardtanh_resnet_keeps_parameter_names_and_clips():
    a, b = CifarResNet(20), CifarResNet(20, activation="hardtanh")
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert not torch.allclose(a.eval()(torch.randn(2, 3, 32, 32)), b.eval()(torch.randn(2, 3, 32, 32)))
    with pytest.raises(ValueError, match="unknown activation"):
        CifarResNet(20, activation="gelu")


def test_config_activation_default():
    cfg = fsg.train.config.TrainConfig() if hasattr(fsg, "config") else None
    from fsg.train.config import TrainConfig

    assert TrainConfig().model_activation == "relu"
    assert TrainConfig(activations=True).model_activation == "hardtanh"
    assert TrainConfig(activations=True, activation="relu").model_activation == "relu"
    with pytest.raises(ValueError, match="activation"):
        TrainConfig(activation="tanh").validate()
    del cfg


def test_fsg_train_with_binary_activations(tmp_path, capsys):
    from fsg.cli.app import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--width", "4", "--estimator", "multifc",
            "--activations", "--epochs", "1", "--max-steps", "4", "--batch-size", "16", "--train-subset", "64",
            "--test-subset", "32", "--no-progress", "--out", str(out), "--num-threads", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "sign of a ReLU output" warning: hardtanh by default
        assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["activations"] is True and cfg["activation"] is None
    from fsg.train.loop import evaluate

    res = evaluate(out)
    assert res["images"] == 32
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["activations"] is True
    capsys.readouterr()
