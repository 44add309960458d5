"""The base optimizer's applied direction and the look-ahead built on it (METHOD.md §3-4).

Expected values are written out here from the optimizers' formulas, from the gradients and
weights recorded right before each base-optimizer step: nothing is read back from fsg.optim.
"""

import io
import math

import pytest
import torch

import fsg
import fsg.trainer as trainer_module
from fsg.train.config import TrainConfig
from fsg.optim import ReferenceAdam, make_optimizer, step_with_directions

from conftest import make_mlp, make_task

LR = 0.05


def recorded_trainer(estimator, optimizer, adam_variant="torch", **kw):
    """A trainer whose base-optimizer steps record (p, p.grad) before stepping, and whose
    look-ahead forwards record the parameters passed to functional_call."""
    model = fsg.binarize(make_mlp(0), "dorefa")
    tr = fsg.Trainer(model, estimator, optimizer=optimizer, lr=LR, adam_variant=adam_variant, **kw)
    tr.history = []
    tr.lookaheads = []
    step = tr.optimizer.step

    def recording_step(*a, **k):
        tr.history.append({id(p): (p.detach().clone(), p.grad.detach().clone())
                           for p in tr.model.parameters() if p.grad is not None})
        return step(*a, **k)

    tr.optimizer.step = recording_step
    return tr


@pytest.fixture
def capture_lookahead(monkeypatch):
    seen = []
    real = trainer_module.functional_call

    def spy(model, params, args):
        seen.append({k: v.detach().clone() for k, v in params.items()})
        return real(model, params, args)

    monkeypatch.setattr(trainer_module, "functional_call", spy)
    return seen


def sgdm_direction(history, pid, momentum=0.9, wd=5e-4):
    buf = None
    for rec in history:
        p, g = rec[pid]
        d = g + wd * p
        buf = d.clone() if buf is None else momentum * buf + d
    return buf


def adam_direction(history, pid, variant, b1=0.9, b2=0.999, eps=1e-8):
    m = v = 0
    for t, rec in enumerate(history, start=1):
        _, g = rec[pid]
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    if variant == "torch":
        return (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)


@pytest.mark.parametrize("estimator", ["multifc", "fc-grad"])
@pytest.mark.parametrize("optimizer,variant", [("sgdm", "torch"), ("adam", "torch"), ("adam", "reference")])
def test_lookahead_moves_along_the_applied_direction(capture_lookahead, estimator, optimizer, variant):
    x, y = make_task()
    tr = recorded_trainer(estimator, optimizer, variant)
    for _ in range(4):  # observe, then three meta steps (two optimizer steps before the last look-ahead)
        before = {l.name: (l.latent.detach().clone(), l.module.bias.detach().clone()) for l in tr.layers}
        tr.step(x, y)
    # the last look-ahead (step 3) used the direction of the optimizer step of step 2
    history = tr.history
    assert len(history) == 3 and len(capture_lookahead) == 3
    params = capture_lookahead[-1]
    hist_before_last = history[:-1]
    for l in tr.layers:
        W, b = before[l.name]
        for key, base, p in ((l.weight_key, W, l.latent), (l.bias_key, b, l.module.bias)):
            if optimizer == "sgdm":
                d = sgdm_direction(hist_before_last, id(p))
            else:
                d = adam_direction(hist_before_last, id(p), variant).float()
            expected = base - LR * d
            torch.testing.assert_close(params[key], expected, rtol=1e-5, atol=1e-6)
            # and it is not the raw gradient the optimizer was given
            raw = base - LR * hist_before_last[-1][id(p)][1]
            assert not torch.allclose(params[key], raw, rtol=1e-3, atol=1e-5)


def test_plain_sgd_lookahead_unchanged_bit_for_bit(capture_lookahead):
    """Plain SGD: W_meta = W − η·(c⊙G + (W.grad − c⊙G).detach()) and b_meta = b − η·b.grad, with
    the gradients left by the previous step — the look-ahead before the direction was tracked."""
    x, y = make_task()
    tr = recorded_trainer("multifc", "sgd")
    for t in range(4):
        if t > 0:
            grads = {l.name: (l.latent.grad.clone(), l.module.bias.grad.clone()) for l in tr.layers}
            ctxs = tr._contexts()
            cgs = [c.calibration * tr.estimator.refined(c) for c in ctxs]
            expected = {}
            for l, cg in zip(tr.layers, cgs):
                wg, bg = grads[l.name]
                expected[l.weight_key] = l.latent - LR * (cg + (wg - cg).detach())
                expected[l.bias_key] = l.module.bias - LR * bg
        tr.step(x, y)
        if t > 0:
            for k, v in expected.items():
                assert torch.equal(capture_lookahead[-1][k], v.detach()), k


def test_reference_adam_closed_form_first_step():
    """At t = 1: torch's d = g/(|g| + ε); the reference's d = √(1−β₂)·g/(√(1−β₂)·|g| + ε)
    (with β₁ = 0.9 the bias corrections cancel m's 1−β₁), i.e. ε/√0.001 ≈ 3.16e-7 in effect."""
    g = torch.tensor([1e-7, -1e-7, 1.0, -3e-6])
    eps, s = 1e-8, math.sqrt(1 - 0.999)
    for variant, expected in (("torch", g / (g.abs() + eps)), ("reference", s * g / (s * g.abs() + eps))):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = make_optimizer("adam", [p], lr=0.1, adam_variant=variant)
        p.grad = g.clone()
        d = step_with_directions(opt)[p]
        torch.testing.assert_close(d, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(p.detach(), -0.1 * expected, rtol=1e-6, atol=0)
    assert abs(float(s * 1e-7 / (s * 1e-7 + eps)) - 0.2403) < 1e-3  # far from torch's 0.909


def test_reference_adam_matches_its_formula_over_steps():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = ReferenceAdam([p], lr=0.01, weight_decay=0.1)
    m = v = torch.zeros(5, dtype=torch.float64)
    w = p.detach().double().clone()
    for t in range(1, 6):
        g = torch.randn(5)
        p.grad = g.clone()
        d = step_with_directions(opt)[p]
        gg = g.double() + 0.1 * w
        m = 0.9 * m + 0.1 * gg
        v = 0.999 * v + 0.001 * gg * gg
        exp = math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-8)
        w = w - 0.01 * exp
        torch.testing.assert_close(d.double(), exp, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(momentum=0.0, weight_decay=0.1), dict(momentum=0.9, nesterov=True, weight_decay=0.01),
                                dict(momentum=0.5, dampening=0.3)])
def test_sgd_directions_are_what_the_step_applied(kw):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.1, **kw)
    for _ in range(3):
        p.grad = torch.randn(6, dtype=torch.float64)
        before = p.detach().clone()
        d = step_with_directions(opt)[p]
        torch.testing.assert_close(before - 0.1 * d, p.detach(), rtol=0, atol=1e-15)


def test_directions_survive_checkpoint_resume():
    x, y = make_task()
    a = fsg.Trainer(fsg.binarize(make_mlp(0), "dorefa"), "multifc", optimizer="adam", lr=LR)
    for _ in range(3):
        a.step(x, y)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = fsg.Trainer(fsg.binarize(make_mlp(1), "dorefa"), "multifc", optimizer="adam", lr=LR)
    b.load_state_dict(torch.load(buf, weights_only=False))
    for _ in range(2):
        ra, rb = a.step(x, y), b.step(x, y)
        assert ra.loss == rb.loss
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_unknown_adam_variant_is_one_line():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=r"^unknown Adam variant 'foo': choose one of torch, reference$"):
        make_optimizer("adam", [p], 0.1, adam_variant="foo")
    with pytest.raises(ValueError, match="adam_variant must be one of torch, reference"):
        TrainConfig(adam_variant="nope").validate()


def test_metaquant_resnet_has_no_classifier_bn():
    """classifier_bn=False: the classifier reads the pooled features directly (MetaQuant's net)."""
    from fsg.models import get_model

    for bn in (False, True):
        m = get_model("resnet20", classifier_bn=bn).eval()
        seen = {}
        m.layer3.register_forward_hook(lambda mod, a, out: seen.__setitem__("feat", out))
        m.fc.register_forward_pre_hook(lambda mod, a: seen.__setitem__("fc_in", a[0]))
        m(torch.randn(2, 3, 32, 32))
        pooled = seen["feat"].mean((2, 3))
        assert torch.equal(seen["fc_in"], pooled) is (not bn)
        assert any(k.startswith("bn_fc") for k in m.state_dict()) is bn
