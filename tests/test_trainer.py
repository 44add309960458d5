"""The training step of METHOD.md §3, checked number by number for every estimator."""

import copy

import pytest
import torch
from torch import nn

import fsg
from fsg.estimators import Estimator
from fsg.models import SmallCNN

from conftest import make_mlp, make_task


def mlp_trainer(estimator, quantizer="dorefa", optimizer="sgd", lr=0.05, seed=0, **kw):
    model = fsg.binarize(make_mlp(seed), quantizer)
    return fsg.Trainer(model, estimator, optimizer=optimizer, lr=lr, **kw)


def lin(x, *weights):
    """Element-wise bias-free linear chain 1→h→…→1, by explicit matrix products."""
    y = x.reshape(-1, 1)
    for w in weights:
        y = y @ w.T
    return y.view_as(x)


def snapshot(tr):
    return {
        "W": [l.latent.detach().clone() for l in tr.layers],
        "Wgrad": [l.latent.grad.detach().clone() for l in tr.layers],
        "b": [l.module.bias.detach().clone() for l in tr.layers],
        "bgrad": [l.module.bias.grad.detach().clone() for l in tr.layers],
        "g": [l.parametrization.grad.clone() for l in tr.layers],
        "wt": [l.parametrization.w_tilde.clone() for l in tr.layers],
        "c": [l.quantizer.calibration(l.latent) for l in tr.layers],
        "est": copy.deepcopy(tr.estimator),
    }


def capture_biases(tr):
    seen = {}
    for l in tr.layers:
        l.module.register_forward_pre_hook(lambda m, a, name=l.name: seen.__setitem__(name, m.bias.detach().clone()))
    return seen


def manual_lstm_step(lstm, x, state=None):
    """One step of a 1-layer nn.LSTM for input (n, 1), written out gate by gate."""
    gates = x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + lstm.bias_hh_l0
    if state is not None:
        gates = gates + state[0] @ lstm.weight_hh_l0.T
    i, f, g, o = gates.chunk(4, dim=1)
    c_prev = state[1] if state is not None else torch.zeros_like(i)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def metaquant_refined(name, est, s, i):
    g, wt = s["g"][i], s["wt"][i]
    if name == "fc-grad":
        return lin(g, *[l.weight for l in est.net.layers])
    if name == "multifc":
        return g * lin(wt, *[l.weight for l in est.net.layers])
    h, _ = manual_lstm_step(est.lstm, wt.reshape(-1, 1), None)
    return g * (h @ est.fc.weight.T + est.fc.bias).view_as(g)


x, y = make_task()


def steps_with_history(tr, grads, steps=5):
    """Run ``steps`` training steps on (x, y), appending after each one a clone of every layer's
    ``parametrization.grad`` to ``grads`` (``grads[k][i]``: step k, layer i). From the second
    step on, yield ``(t, s)`` after step t, with ``s`` the :func:`snapshot` taken just before it."""
    tr.step(x, y)
    grads.append([l.parametrization.grad.clone() for l in tr.layers])
    for t in range(1, steps):
        s = snapshot(tr)
        tr.step(x, y)
        grads.append([l.parametrization.grad.clone() for l in tr.layers])
        yield t, s


@pytest.mark.parametrize("name", ["fc-grad", "multifc", "lstmfc"])
def test_metaquant_step_matches_spec(name):
    tr = mlp_trainer(name, lr=0.05)
    w_init = [l.latent.detach().clone() for l in tr.layers]
    tr.step(x, y)  # observe: no weight update
    for w0, l in zip(w_init, tr.layers):
        assert torch.equal(w0, l.latent.detach())
    s = snapshot(tr)
    tr.optimizer.param_groups[0]["lr"] = eta = 0.02  # η_t is read every step (schedules)
    biases = capture_biases(tr)
    tr.step(x, y)
    with torch.no_grad():
        for i, l in enumerate(tr.layers):
            # look-ahead: W_meta = W − η·(c⊙G + (W.grad_prev − c⊙G).detach()) = W − η·W.grad_prev
            w_meta = s["W"][i] - eta * s["Wgrad"][i]
            torch.testing.assert_close(l.parametrization.w_tilde, l.quantizer.pre(w_meta))
            torch.testing.assert_close(biases[l.name], s["b"][i] - eta * s["bgrad"][i])
            # weight update: W.grad = c⊙G with G from the previous step's g and W̃
            expected = s["c"][i] * metaquant_refined(name, s["est"], s, i)
            torch.testing.assert_close(l.latent.grad, expected, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(l.latent.detach(), s["W"][i] - eta * expected, rtol=1e-5, atol=1e-7)


def test_metaquant_lookahead_gradient_path_goes_through_c_times_G():
    """The look-ahead's value is the previous gradient, but its gradient flows through c⊙G."""
    tr = mlp_trainer("multifc")
    tr.step(x, y)
    ctx = tr._contexts()[0]
    d, u = tr.estimator.directions(ctx)
    torch.testing.assert_close(d, ctx.prev_update)
    (gd,) = torch.autograd.grad((d * 3.0).sum(), tr.estimator.net.layers[0].weight)
    (gu,) = torch.autograd.grad((3.0 * ctx.calibration * ctx.grad * tr.estimator.net(ctx.w_tilde)).sum(),
                                tr.estimator.net.layers[0].weight)
    torch.testing.assert_close(gd, gu)


def test_lstmfc_carries_its_state():
    tr = mlp_trainer("lstmfc")
    tr.step(x, y)
    s1 = snapshot(tr)
    tr.step(x, y)
    est0 = s1["est"]
    for i, l in enumerate(tr.layers):
        h, c = manual_lstm_step(est0.lstm, s1["wt"][i].reshape(-1, 1), None)
        torch.testing.assert_close(tr.estimator.states[i][0][0], h.detach())
        torch.testing.assert_close(tr.estimator.states[i][1][0], c.detach())
    s2 = snapshot(tr)
    tr.step(x, y)
    for i, l in enumerate(tr.layers):
        prev = (s2["est"].states[i][0][0], s2["est"].states[i][1][0])
        h, _ = manual_lstm_step(s2["est"].lstm, s2["wt"][i].reshape(-1, 1), prev)
        expected = s2["c"][i] * s2["g"][i] * (h @ s2["est"].fc.weight.T + s2["est"].fc.bias).view_as(s2["g"][i])
        torch.testing.assert_close(l.latent.grad, expected, rtol=1e-5, atol=1e-7)


def fsg_slow_expected(est, layer_index, history, layout):
    """G_slow from the spec's sequence layout, built by hand."""
    e = est.lre.weight[layer_index] if est.lre is not None else None
    n = history[-1].numel()
    if layout == "flat":
        toks = torch.cat(([e.reshape(1)] if e is not None else []) + [h.reshape(-1) for h in history])
        out = est.slow(toks.view(1, -1, 1))
        return out[0, -n:, 0].view_as(history[-1])
    cols = [h.reshape(-1, 1) for h in history]
    if e is not None:
        cols = [e.expand(n, 1)] + cols
    out = est.slow(torch.cat(cols, 1).unsqueeze(-1))
    return out[:, -1, 0].view_as(history[-1])


@pytest.mark.parametrize("update", ["combined", "fast"])
@pytest.mark.parametrize("layout,lre,batch_layers", [("flat", True, False), ("temporal", True, False),
                                                     ("flat", False, False), ("flat", True, True),
                                                     ("temporal", True, True)])
def test_fsg_step_matches_spec(update, layout, lre, batch_layers):
    beta = 0.7
    tr = mlp_trainer("fsg", lr=0.05, beta=beta, history=3, update=update, layout=layout, lre=lre, expand=8,
                     batch_layers=batch_layers)
    est = tr.estimator
    assert est.batches_layers() == batch_layers
    assert (est.lre is not None) == lre
    if lre:
        assert est.lre.num_embeddings == len(tr.layers) == 2
    grads = []
    for t, s in steps_with_history(tr, grads):
        with torch.no_grad():
            for i, l in enumerate(tr.layers):
                hist = [grads[k][i] for k in range(max(0, t - 3), t)]  # g⁽ᵗ⁻ᴸ⁾ … g⁽ᵗ⁻¹⁾
                g_slow = fsg_slow_expected(s["est"], i, hist, layout)
                g_fast = s["g"][i] * lin(s["wt"][i], *[m.weight for m in s["est"].fast.layers])
                d = beta * g_slow + (1 - beta) * s["c"][i] * g_fast
                w_meta = s["W"][i] - 0.05 * d
                torch.testing.assert_close(l.parametrization.w_tilde, l.quantizer.pre(w_meta), rtol=1e-5, atol=1e-6)
                u = d if update == "combined" else s["c"][i] * g_fast
                torch.testing.assert_close(l.latent.grad, u, rtol=1e-5, atol=1e-7)
    # HGS: FIFO of the last L = 3 gradients, oldest first, never reset
    for i in range(len(tr.layers)):
        assert len(est.hgs[i]) == 3
        for got, want in zip(est.hgs[i], [grads[k][i] for k in (2, 3, 4)]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("update", ["combined", "fast"])
def test_fsg_lstm_fc_step_matches_spec(update):
    """slow_net="lstm-fc" (the reference's MetaFastAndLSTM): G_slow = g ⊙ FC(LSTM(W̃)), the LSTM
    run element-wise with its (h, c) per layer carried, detached, from step to step; no HGS, no
    LRE; D = β·G_slow + (1−β)·c⊙G_fast (G_slow without c), U = D or c⊙G_fast."""
    beta, eta = 0.7, 0.05
    tr = mlp_trainer("fsg", lr=eta, beta=beta, update=update, slow_net="lstm-fc", fast_hidden=6)
    est = tr.estimator
    assert est.lre is None and est.slow.lstm.hidden_size == 6  # lstm_hidden defaults to fast_hidden
    groups = {g["name"]: g for g in est.meta_param_groups()}
    assert {k: g["lr"] for k, g in groups.items()} == {"fast": 1e-2, "slow": 1e-3}
    assert {id(p) for p in groups["slow"]["params"]} == {id(p) for m in (est.slow.lstm, est.slow.fc)
                                                         for p in m.parameters()}
    assert est.slow.fc.bias is not None  # the FC head has a bias (MetaQuant's LSTMFC)
    tr.step(x, y)
    state = [None] * len(tr.layers)  # the carried (h, c), computed here gate by gate
    for t in range(1, 5):
        s = snapshot(tr)
        tr.step(x, y)
        with torch.no_grad():
            for i, l in enumerate(tr.layers):
                slow, g, wt = s["est"].slow, s["g"][i], s["wt"][i]
                h, c = manual_lstm_step(slow.lstm, wt.reshape(-1, 1), state[i])
                g_slow = g * (h @ slow.fc.weight.T + slow.fc.bias).view_as(g)
                g_fast = g * lin(wt, *[m.weight for m in s["est"].fast.layers])
                d = beta * g_slow + (1 - beta) * s["c"][i] * g_fast
                torch.testing.assert_close(l.parametrization.w_tilde, l.quantizer.pre(s["W"][i] - eta * d),
                                           rtol=1e-5, atol=1e-6)
                u = d if update == "combined" else s["c"][i] * g_fast
                torch.testing.assert_close(l.latent.grad, u, rtol=1e-5, atol=1e-7)
                # the state carried to the next step: this step's gates from the previous state, detached
                got_h, got_c = est.slow.states[i]
                assert not got_h.requires_grad and not got_c.requires_grad
                assert got_h.grad_fn is None and got_c.grad_fn is None
                torch.testing.assert_close(got_h[0], h, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(got_c[0], c, rtol=1e-5, atol=1e-7)
                state[i] = (h, c)
    assert state[0][0].shape != state[1][0].shape  # one state per layer (the layers differ in size)
    assert all(len(q) == 0 for q in est.hgs)  # no gradient history is kept
    # the carried states are part of the estimator's state: a fresh estimator continues identically
    fresh = fsg.get_estimator("fsg", beta=beta, update=update, slow_net="lstm-fc", fast_hidden=6)
    fresh.setup(est.layer_names, est.layer_shapes)
    fresh.load_state_dict(copy.deepcopy(est.state_dict()))
    for (ha, ca), (hb, cb) in zip(est.slow.states, fresh.slow.states):
        assert torch.equal(ha, hb) and torch.equal(ca, cb)
    ctx = tr._contexts()[0]
    torch.testing.assert_close(fresh.directions(ctx)[0], est.directions(ctx)[0], rtol=0, atol=0)


def test_lstmfc_checkpoint_of_another_hidden_size_is_one_clear_line():
    a = fsg.get_estimator("lstmfc", hidden=20)
    a.setup(["l"], [torch.Size([3])])
    b = fsg.get_estimator("lstmfc")
    b.setup(["l"], [torch.Size([3])])
    assert b.hidden == 100  # MetaQuant's paper and scripts
    with pytest.raises(RuntimeError, match="hidden size 20, this one 100.*default hidden size was 20") as e:
        b.load_state_dict(a.state_dict())
    assert "\n" not in str(e.value)


def test_fsg_hgs_fills_then_slides():
    est = fsg.get_estimator("fsg", history=2, expand=4)
    est.setup(["a"], [torch.Size([3])])
    gs = [torch.full((3,), float(k)) for k in range(5)]
    lengths = []
    for g in gs:
        est.observe(0, g, g)
        lengths.append(len(est.hgs[0]))
    assert lengths == [1, 2, 2, 2, 2]
    assert [h[0].item() for h in est.hgs[0]] == [3.0, 4.0]
    # and it is part of the estimator's state
    st = est.state_dict()
    est2 = fsg.get_estimator("fsg", history=2, expand=4)
    est2.setup(["a"], [torch.Size([3])])
    est2.load_state_dict(st)
    assert [h[0].item() for h in est2.hgs[0]] == [3.0, 4.0]


def test_fsg_slow_net_input_layout_flat_and_temporal():
    for layout in ("flat", "temporal"):
        tr = mlp_trainer("fsg", history=2, layout=layout, expand=4)
        seen = []
        orig = tr.estimator.slow.forward
        tr.estimator.slow.forward = lambda seq, **kw: (seen.append(seq.detach().clone()), orig(seq, **kw))[1]
        tr.step(x, y)
        g0 = [l.parametrization.grad.clone() for l in tr.layers]
        tr.step(x, y)
        g1 = [l.parametrization.grad.clone() for l in tr.layers]
        seen.clear()
        tr.step(x, y)
        for i, seq in enumerate(seen):
            e = tr.estimator.lre.weight.detach()
            n = g0[i].numel()
            if layout == "flat":
                assert seq.shape == (1, 1 + 2 * n, 1)
                assert seq[0, 0, 0] != 0
                torch.testing.assert_close(seq[0, 1:, 0], torch.cat([g0[i].flatten(), g1[i].flatten()]))
            else:
                assert seq.shape == (n, 3, 1)
                torch.testing.assert_close(seq[:, 1, 0], g0[i].flatten())
                torch.testing.assert_close(seq[:, 2, 0], g1[i].flatten())
                assert torch.all(seq[:, 0, 0] == seq[0, 0, 0])
        # one distinct LRE token per layer (the embedding was updated by the meta step already,
        # so compare the tokens with each other rather than with the current table)
        assert seen[0][0, 0, 0] != seen[1][0, 0, 0]


@pytest.mark.parametrize("name,opts", [("fc-grad", {}), ("multifc", {}), ("lstmfc", {}),
                                       ("fsg", {"expand": 8}), ("fsg", {"expand": 8, "layout": "temporal"}),
                                       ("fsg", {"slow_net": "lstm-fc", "lstm_hidden": 8})])
def test_hypernetwork_parameters_receive_nonzero_gradients(name, opts):
    tr = mlp_trainer(name, **opts)
    before = copy.deepcopy(tr.estimator.state_dict())
    for _ in range(3):  # LSTM recurrent weights see a non-zero state from step 2 on
        tr.step(x, y)
    groups = tr.estimator.meta_param_groups()
    assert groups
    for g in groups:
        for p in g["params"]:
            assert p.grad is not None and p.grad.abs().sum() > 0
    after = tr.estimator.state_dict()
    changed = [k for k in before if not k.endswith("_extra_state") and not torch.equal(before[k], after[k])]
    assert changed, "the meta step did not change any hypernetwork parameter"


def test_fsg_meta_optimizer_learning_rates():
    tr = mlp_trainer("fsg", expand=4)
    lrs = {k: o.param_groups[0]["lr"] for k, o in tr.meta_optimizers.items()}
    assert lrs == {"fast": 1e-2, "slow": 1e-3, "lre": 1e-3}
    assert all(isinstance(o, torch.optim.Adam) for o in tr.meta_optimizers.values())


class IdentityEstimator(Estimator):
    """G = g, applied to the current gradient without look-ahead: must reproduce STE."""

    lookahead = False

    def directions(self, ctx):
        u = ctx.calibration * ctx.grad
        return u, u


@pytest.mark.parametrize("quantizer", ["dorefa", "bwn", "sign"])
@pytest.mark.parametrize("optimizer", ["sgd", "sgdm", "adam"])
def test_identity_estimator_reproduces_ste_step_for_step(quantizer, optimizer):
    a = mlp_trainer("ste", quantizer, optimizer, lr=0.05)
    b = mlp_trainer(IdentityEstimator(), quantizer, optimizer, lr=0.05)
    for t in range(6):
        xb, yb = x[16 * t:16 * t + 16], y[16 * t:16 * t + 16]
        ra, rb = a.step(xb, yb), b.step(xb, yb)
        assert ra.loss == pytest.approx(rb.loss, rel=1e-5, abs=1e-6)
        for pa, pb in zip(a.model.parameters(), b.model.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert a.layers[0].latent.abs().max() < 1  # (bwn/sign: STE clipping never active here)


def test_constant_hypernetwork_gives_delayed_ste_gradient():
    """FC-Grad with M ≡ identity (MetaQuant's symmetric init): W.grad = c(W)⊙g⁽ᵗ⁻¹⁾."""
    tr = mlp_trainer("fc-grad", hidden=4, meta_lr=1e-12)
    with torch.no_grad():
        tr.estimator.net.layers[0].weight.fill_(0.25)
        tr.estimator.net.layers[1].weight.fill_(1.0)
    tr.step(x, y)
    for _ in range(3):
        s = snapshot(tr)
        tr.step(x, y)
        for i, l in enumerate(tr.layers):
            torch.testing.assert_close(l.latent.grad, s["c"][i] * s["g"][i], rtol=1e-5, atol=1e-8)


def test_update_on_observe_option():
    tr = mlp_trainer("multifc", update_on_observe=True)
    w0 = tr.layers[0].latent.detach().clone()
    tr.step(x, y)
    assert not torch.equal(w0, tr.layers[0].latent.detach())


@pytest.mark.parametrize("quantizer", ["dorefa", "bwn", "sign"])
@pytest.mark.parametrize("name", ["ste", "multifc", "fsg"])
def test_evaluation_uses_exactly_binary_weights(quantizer, name):
    torch.manual_seed(0)
    model = fsg.binarize(SmallCNN(width=4), quantizer)
    opts = {"expand": 4} if name == "fsg" else {}
    tr = fsg.Trainer(model, name, optimizer="adam", lr=1e-2, **opts)
    xi = torch.randn(8, 1, 8, 8)
    yi = torch.randint(0, 10, (8,))
    for _ in range(4):
        tr.step(xi, yi)
    model.eval()
    # a plain (never binarized) copy holding the binary weights as ordinary parameters
    plain = SmallCNN(width=4).eval()
    state = {k: v for k, v in model.state_dict().items() if "parametrizations" not in k}
    with torch.no_grad():
        for l in tr.layers:
            wb = l.module.weight
            scale = l.quantizer.scale(l.latent)
            assert torch.equal(wb.abs(), scale.expand_as(wb)), "binary weight is not exactly ±scale"
            assert set(torch.sign(wb).unique().tolist()) <= {-1.0, 1.0}
            state[f"{l.name}.weight"] = wb.clone()
        plain.load_state_dict(state)
        torch.testing.assert_close(model(xi), plain(xi), rtol=0, atol=0)


@pytest.mark.parametrize("name,opts", [
    ("ste", {}), ("fc-grad", {}), ("multifc", {}), ("lstmfc", {}),
    ("fsg", {"expand": 16}),
    ("fsg", {"expand": 16, "update": "fast"}),
    ("fsg", {"expand": 16, "layout": "temporal"}),
    ("fsg", {"slow_net": "lstm-fc", "lstm_hidden": 16}),
])
def test_every_estimator_lowers_the_training_loss(name, opts):
    tr = mlp_trainer(name, optimizer="sgd", lr=0.05, **opts)
    loss0 = torch.nn.functional.cross_entropy(tr.model(x), y).item()
    for t in range(60):
        xb, yb = x[32 * (t % 3):32 * (t % 3) + 32], y[32 * (t % 3):32 * (t % 3) + 32]
        tr.step(xb, yb)
    loss1 = torch.nn.functional.cross_entropy(tr.model(x), y).item()
    assert loss1 < 0.7 * loss0, (loss0, loss1)


def test_option_errors_are_one_line():
    bad = [
        ("fsg", {"beta": 1.5}, "beta must be a number in \\[0, 1\\]"),
        ("fsg", {"beta": -0.1}, "beta"),
        ("fsg", {"history": 0}, "history"),
        ("fsg", {"history": 2.5}, "history"),
        ("fsg", {"update": "slow"}, "update must be one of"),
        ("fsg", {"layout": "2d"}, "layout must be one of"),
        ("fsg", {"slow_net": "gru"}, "slow_net must be one of 'mamba', 'lstm-fc', got 'gru'"),
        ("fsg", {"slow_net": "lstm"}, "slow_net='lstm' .* was removed.*slow_net='lstm-fc'"),
        ("fsg", {"slow_net": "lstm-fc", "history": 5}, "slow_net='lstm-fc' reads W̃.*leave history unset"),
        ("fsg", {"slow_net": "lstm-fc", "lre": False, "layout": "flat"}, "leave lre, layout unset"),
        ("fsg", {"slow_net": "lstm-fc", "lstm_hidden": 0}, "lstm_hidden must be an integer >= 1"),
        ("multifc", {"hidden": 0}, "hidden"),
        ("fsg", {"fast_lr": 0}, "fast_lr"),
    ]
    for name, opts, msg in bad:
        with pytest.raises(ValueError, match=msg) as e:
            fsg.get_estimator(name, **opts)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown estimator 'sgd'.*fsg.*ste"):
        fsg.get_estimator("sgd")
    with pytest.raises(ValueError, match="unknown optimizer"):
        mlp_trainer("ste", optimizer="rmsprop")
    with pytest.raises(ValueError, match="learning rate"):
        mlp_trainer("ste", lr=-1.0)
    with pytest.raises(ValueError, match="only accepted with an estimator name"):
        mlp_trainer(fsg.get_estimator("ste"), beta=0.5)


def test_registry_names():
    assert set(fsg.ESTIMATORS) >= {"ste", "fc-grad", "multifc", "lstmfc", "fsg"}


@pytest.mark.parametrize("slow_net", ["mamba"])
def test_fsg_stream_layout_is_the_temporal_sequence_as_a_recurrence(slow_net):
    """With frozen hypernetworks, the streamed G_slow equals re-running the slow-net on each
    element's whole sequence [e_l, g⁽⁰⁾, …, g⁽ᵗ⁻¹⁾]; the carried state holds no graph."""
    tr = mlp_trainer("fsg", layout="stream", slow_net=slow_net, expand=8, lstm_hidden=6, beta=1.0,
                     slow_lr=1e-30, lre_lr=1e-30, fast_lr=1e-30)
    est = tr.estimator
    grads = []
    for t, s in steps_with_history(tr, grads):
        with torch.no_grad():
            for i, l in enumerate(tr.layers):
                seq = torch.stack([grads[k][i].reshape(-1) for k in range(t)], dim=1).unsqueeze(-1)
                e = s["est"].lre.weight[i].view(1, 1, 1).expand(seq.shape[0], 1, 1)
                expected = s["est"].slow(torch.cat([e, seq], 1))[:, -1, 0].view_as(l.latent)
                torch.testing.assert_close(l.latent.grad, expected, rtol=1e-4, atol=1e-7)
    for st in est.stream_states:
        assert st is not None and not any(s.requires_grad for s in st)
    slow = next(g for g in est.meta_param_groups() if g["name"] == "slow")  # (β = 1: no fast-net grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in slow["params"])
    # the state is part of the estimator's checkpointable state
    extra = est.get_extra_state()
    assert len(extra["stream"]) == len(tr.layers) and extra["stream"][0] is not None


def test_fsg_stream_state_buffers_alternate():
    """The new scan state is written into the buffer of two steps ago (no fresh allocation)."""
    from fsg.ssm import cpu as scan_cpu

    if not scan_cpu.available():
        pytest.skip("fused kernels unavailable")
    tr = mlp_trainer("fsg", layout="stream", expand=8)
    ptrs = []
    for _ in range(6):
        tr.step(x, y)
        st = tr.estimator.stream_states[0]
        ptrs.append(st[1].data_ptr() if st is not None else None)
    assert ptrs[3] == ptrs[5] and ptrs[3] != ptrs[4]  # steady state: two buffers, alternating


@pytest.mark.parametrize("layout,recompute", [("flat", True), ("flat", False), ("temporal", True),
                                              ("temporal", False), ("stream", True)])
def test_fsg_batch_layers_batches_layers_and_trains_alike(layout, recompute):
    """batch_layers on layers of 16, 16, 64 and 48 weights (history 3): flat batches the two
    16-weight layers (3 slow-net calls per step instead of 4); temporal batches layers in order
    up to the 64-weight layer's 256 tokens: [16, 16], [64], [48] (3 calls); stream runs all
    layers in one call (their states one tensor). The fast-net runs once per step instead of once per
    layer. The same training as per layer up to float rounding: losses, latent weights and every
    hypernetwork parameter after 6 steps."""
    from fsg.models import MLP

    x, y = make_task(n=32, d=4, k=3)
    runs = {}
    for batch in (False, True):
        torch.manual_seed(0)
        tr = fsg.Trainer(fsg.binarize(MLP(4, [4, 4, 16], 3), "dorefa"), "fsg", lr=0.05, history=3, layout=layout,
                         expand=8, batch_layers=batch, recompute=recompute)
        assert tr.estimator.batches_layers() == batch
        calls, fast = [], []
        hooks = [tr.estimator.slow.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape))),
                 tr.estimator.fast.register_forward_hook(lambda m, a, out: fast.append(a[0].numel()))]
        if layout == "stream":  # the stream's calls go to the Mamba block's stream(), not the module's forward
            stream = tr.estimator.slow.stream
            tr.estimator.slow.stream = lambda seq, *a, **k: calls.append(tuple(seq.shape)) or stream(seq, *a, **k)
        losses = [tr.step(x, y).loss for _ in range(6)]
        for h in hooks:
            h.remove()
        runs[batch] = (tr, losses, calls, fast)
    (t0, l0, c0, f0), (t1, l1, c1, f1) = runs[False], runs[True]
    assert [l.latent.numel() for l in t0.layers] == [16, 16, 64, 48]
    assert f0[-4:] == [16, 16, 64, 48] and f1[-1] == 144 and len(f0) == 4 * len(f1)
    if layout == "stream":
        assert c0[-4:] == [(16, 1, 1), (16, 1, 1), (64, 1, 1), (48, 1, 1)] and c1[-1] == (144, 1, 1)
        # the first call: the LRE token first
        assert c0[:4] == [(16, 2, 1), (16, 2, 1), (64, 2, 1), (48, 2, 1)] and c1[0] == (144, 2, 1)
        states = t1.estimator.stream_states  # each layer's state: rows of one tensor
        h = states[0][1]
        assert all(s[1].untyped_storage().data_ptr() == h.untyped_storage().data_ptr() for s in states)
        assert [s[1].storage_offset() for s in states] == [0, 16 * h[0].numel(), 32 * h[0].numel(), 96 * h[0].numel()]
    elif layout == "flat":  # the last step's calls: (rows, tokens per row, 1)
        assert c0[-4:] == [(1, 49, 1), (1, 49, 1), (1, 193, 1), (1, 145, 1)]
        assert c1[-3:] == [(2, 49, 1), (1, 193, 1), (1, 145, 1)]
    else:
        assert c0[-4:] == [(16, 4, 1), (16, 4, 1), (64, 4, 1), (48, 4, 1)]
        assert c1[-3:] == [(32, 4, 1), (64, 4, 1), (48, 4, 1)]
    assert len(c0) == 5 * 4 and len(c1) == 5 * (1 if layout == "stream" else 3)  # steps 1-5 (step 0 only observes)
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=1e-7)
    for a, b in zip(t0.layers, t1.layers):
        torch.testing.assert_close(b.latent, a.latent, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(t0.estimator.named_parameters(), t1.estimator.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_fsg_stream_state_in_place_where_it_must_be():
    """One copy of the carried state for a 16-bit state_dtype, and for float32 on CUDA; two
    alternating float32 buffers on the CPU (earlier runs' numbers)."""
    assert not fsg.estimators.FSG(layout="stream").stream_in_place()
    assert fsg.estimators.FSG(layout="stream", state_dtype="bfloat16").stream_in_place()
    if torch.cuda.is_available():
        assert fsg.estimators.FSG(layout="stream").to("cuda").stream_in_place()


def test_fsg_batch_layers_default_follows_the_slow_net_device():
    est = fsg.estimators.FSG()
    assert est.config.batch_layers is None and not est.batches_layers()  # CPU: per layer (earlier numbers)
    assert fsg.estimators.FSG(batch_layers=True, layout="stream").batches_layers()
    assert not fsg.estimators.FSG(batch_layers=True, slow_net="lstm-fc").batches_layers()
    assert not fsg.estimators.FSG(batch_layers=True, beta=0.0).batches_layers()
    if torch.cuda.is_available():
        assert est.to("cuda").batches_layers()


def test_lookahead_weights_flattened_equal_per_layer_bit_for_bit():
    """W − η·D on all layers at once (views of one flat result) equals the per-layer arithmetic
    exactly, forward and backward; mixed dtypes fall back to per layer."""
    from fsg.trainer import lookahead_weights

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 3)]
    ws = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    ds = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    outs = lookahead_weights(ws, ds, 0.037)
    want = [w - 0.037 * d for w, d in zip(ws, ds)]
    assert [o.shape for o in outs] == [w.shape for w in ws]
    assert all(torch.equal(o, e) for o, e in zip(outs, want))
    cot = [torch.randn(s, generator=g) for s in shapes]
    got_grads = torch.autograd.grad(outs, ws + ds, cot)
    want_grads = torch.autograd.grad(want, ws + ds, cot)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    mixed = lookahead_weights([ws[0], ws[1].double()], [ds[0], ds[1].double()], 0.5)
    assert mixed[1].dtype == torch.float64 and torch.equal(mixed[0], ws[0] - 0.5 * ds[0])
