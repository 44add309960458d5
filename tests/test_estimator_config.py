"""Estimator options as typed configs (one frozen dataclass per estimator) and the purity of
``directions()`` with respect to the carried state (committed by ``Trainer.step``)."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import fsg
from fsg.estimators import (ESTIMATORS, FSG, FSGConfig, LSTMFC, LSTMFCConfig, MultiFCConfig, check_options,
                            estimator_config, option_names, options_table_markdown)
from fsg.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

torch.manual_seed(0)
X = torch.randn(48, 8)
Y = torch.randint(0, 3, (48,))


def mlp_trainer(estimator, **opts):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    return fsg.Trainer(fsg.binarize(model, "dorefa"), estimator, optimizer="sgd", lr=0.05, **opts)


# ----------------------------------------------------------------------------------------------
# one typed config per estimator


def test_every_registered_estimator_has_a_frozen_config_with_declared_options():
    for name, cls in ESTIMATORS.items():
        config = estimator_config(name)
        assert config is cls.Config and dataclasses.is_dataclass(config), name
        cfg = config()
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, "x", 1)
        for spec in config.specs():
            assert spec.help and spec.kind in ("int", "float", "bool", "choice"), (name, spec.name)
        assert option_names(name) == [s.name for s in config.specs()]
    assert option_names("ste") == [] and "hidden" in option_names("multifc") and "beta" in option_names("fsg")


def test_defaults_and_keyword_api_unchanged():
    est = fsg.get_estimator("fsg")
    assert (est.beta, est.history_len, est.update, est.use_lre, est.slow_net, est.layout, est.recompute,
            est.state_dtype, est.fast_lr, est.slow_lr, est.lre_lr) == \
        (0.9, 5, "combined", True, "mamba", "flat", True, "float32", 1e-2, 1e-3, 1e-3)
    assert est.slow.mamba.d_state == 16 and est.slow.mamba.d_conv == 8 and est.slow.mamba.d_inner == 100
    assert est.fast.layers[0].weight.shape == (100, 1) and est.fast.nonlinearity is None
    assert fsg.get_estimator("fsg", layout="stream").config == FSGConfig(layout="stream") == \
        FSG(FSGConfig(layout="stream")).config
    lstm = fsg.get_estimator("fsg", slow_net="lstm-fc", fast_hidden=6)
    assert lstm.history_len == 0 and lstm.layout is None and lstm.lre is None and lstm.slow.hidden == 6
    assert LSTMFC().hidden == 100 and LSTMFC(LSTMFCConfig(hidden=7)).lstm.hidden_size == 7
    for name in ("fc-grad", "multifc", "lstmfc"):
        e = fsg.get_estimator(name)
        assert e.meta_lr == 1e-3 and e.config.hidden == 100
    assert mlp_trainer("fsg", layout="stream", expand=4).estimator.config.expand == 4
    with pytest.raises(TypeError, match="FSGConfig has no option.* bogus .*it takes: beta"):
        fsg.get_estimator("fsg", bogus=1)


@pytest.mark.parametrize("name, opts, fragment", [
    ("fsg", {"beta": 2.0}, "estimator 'fsg': beta must be a number in [0, 1], got 2.0"),
    ("fsg", {"history": 0}, "history must be an integer >= 1, got 0"),
    ("fsg", {"lre": 1}, "lre must be true or false, got 1"),
    ("fsg", {"fast_lr": float("inf")}, "fast_lr must be a positive number, got inf"),
    ("fsg", {"d_state": 0}, "d_state must be an integer >= 1"),
    ("fsg", {"slow_net": "lstm-fc", "layout": "flat"}, "leave layout unset"),
    ("fsg", {"state_dtype": "bfloat16"}, "needs slow_net='mamba' and layout='stream'"),
    ("fsg", {"slow_net": "lstm"}, "was removed"),
    ("multifc", {"nonlinearity": "gelu"}, "nonlinearity must be one of None, 'relu', 'tanh', got 'gelu'"),
    ("lstmfc", {"nonlinearity": "relu"}, "estimator 'lstmfc' does not take option(s) nonlinearity (it takes: hidden, meta_lr)"),
    ("ste", {"beta": 0.5}, "estimator 'ste' does not take option(s) beta (it takes: none)"),
])
def test_check_options_is_one_line(name, opts, fragment):
    with pytest.raises(ValueError) as info:
        check_options(name, opts)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        TrainConfig(estimator=name, estimator_options=opts).validate()


def test_validation_builds_no_module_and_draws_no_random_number(monkeypatch):
    cases = [("fsg", {}), ("fsg", {"layout": "stream", "state_dtype": "bfloat16"}), ("fsg", {"slow_net": "lstm-fc"}),
             ("lstmfc", {"hidden": 8}), ("multifc", {"nonlinearity": "relu"}), ("fc-grad", {}), ("ste", {})]
    torch.manual_seed(123)
    before = torch.get_rng_state()

    def no_module(self, *a, **k):
        raise AssertionError("validation built a module")

    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, "__init__", no_module)
        for name, opts in cases:
            check_options(name, opts)
            TrainConfig(estimator=name, estimator_options=opts).validate()
            estimator_config(name)(**opts).validate()
    assert torch.equal(torch.get_rng_state(), before)
    # seed, validate, build: the same initial hypernetwork weights as seed, build
    torch.manual_seed(5)
    TrainConfig(estimator="fsg", estimator_options={"layout": "stream"}).validate()
    a = fsg.get_estimator("fsg", layout="stream").state_dict()
    torch.manual_seed(5)
    b = fsg.get_estimator("fsg", layout="stream").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_readme_holds_exactly_the_rendered_options_table():
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- estimator options: generated by fsg\.estimators\.options_table_markdown\(\);[^\n]*-->\n"
                      r"(.*?)<!-- end of estimator options -->", text, re.S)
    assert found, "README lacks the generated table of estimator options"
    assert found.group(1) == options_table_markdown(), \
        "README's estimator options are stale: paste fsg.estimators.options_table_markdown() between the markers"
    table = options_table_markdown()
    for name, cls in ESTIMATORS.items():
        for spec in cls.Config.specs():
            assert f"| `{name}` | `{spec.name}` |" in table and spec.help in table


def test_grid_routes_options_by_the_configs(tmp_path):
    from fsg.train import grid
    from fsg.train.config import estimator_option_names, estimator_takes_any_option

    assert estimator_option_names("multifc") == MultiFCConfig.option_names()
    assert not estimator_takes_any_option("fsg")
    with pytest.raises(ValueError, match="estimator option.* beta taken by none of the grid's estimators"):
        grid.run_grid(tmp_path / "g", estimators="ste,multifc", estimator_options={"beta": 0.5, "hidden": 4})
    with pytest.raises(ValueError, match="run fsg-dorefa-sgd-s0: estimator 'fsg': beta must be a number in"):
        grid.run_grid(tmp_path / "g", estimators="multifc,fsg", optimizers="sgd", estimator_options={"beta": 5})
    assert not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------------------------
# directions() is pure with respect to the carried state; Trainer.step commits


def carried(est):
    """Copies of every carried state tensor of an FSG / LSTMFC estimator."""
    out = []
    for m in est.modules():
        for st in list(getattr(m, "states", None) or []) + list(getattr(m, "stream_states", None) or []):
            out.append(None if st is None else [t.clone() for t in st])
    return out


def same(a, b):
    return len(a) == len(b) and all((x is None and y is None) or
                                    (x is not None and y is not None and all(torch.equal(p, q) for p, q in zip(x, y)))
                                    for x, y in zip(a, b))


CARRYING = [("lstmfc", dict(hidden=6)),
            ("fsg", dict(slow_net="lstm-fc", fast_hidden=6)),
            ("fsg", dict(layout="stream", expand=8, fast_hidden=8)),
            ("fsg", dict(layout="stream", expand=8, fast_hidden=8, state_dtype="bfloat16"))]


@pytest.mark.parametrize("name, opts", CARRYING)
def test_directions_twice_same_result_state_unchanged(name, opts):
    tr = mlp_trainer(name, **opts)
    for _ in range(3):
        tr.step(X, Y)
    est = tr.estimator
    state = carried(est)
    assert any(s is not None for s in state)
    first = [[t.detach().clone() for t in est.directions(c)] for c in tr._contexts()]
    assert same(carried(est), state)
    second = [est.directions(c) for c in tr._contexts()]
    assert same(carried(est), state)
    for (d1, u1), (d2, u2) in zip(first, second):
        assert torch.equal(d1, d2) and torch.equal(u1, u2)
    est.commit()  # the pending state is the next one: it differs
    assert not same(carried(est), state)


@pytest.mark.parametrize("name, opts", CARRYING)
def test_extra_directions_calls_do_not_change_training(name, opts):
    plain, probed = mlp_trainer(name, **opts), mlp_trainer(name, **opts)
    for t in range(5):
        rp = plain.step(X, Y)
        if t > 0:
            for c in probed._contexts():
                probed.estimator.directions(c)
        rq = probed.step(X, Y)
        assert rp.loss == rq.loss
    for a, b in zip(plain.layers, probed.layers):
        assert torch.equal(a.latent, b.latent)
    assert same(carried(plain.estimator), carried(probed.estimator))


def test_a_rejected_step_commits_nothing():
    tr = mlp_trainer("lstmfc", hidden=6, nonfinite="skip")
    for _ in range(2):
        tr.step(X, Y)
    state = carried(tr.estimator)
    bad = X.clone()
    bad[0, 0] = float("nan")
    assert tr.step(bad, Y).skipped
    assert same(carried(tr.estimator), state) and not tr.estimator.pending_states

