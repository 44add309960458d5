"""fsg train's estimator flags and their help, derived from the estimators' option dataclasses."""

import dataclasses

import pytest

from fsg.estimators import ESTIMATORS, check_options, option_names
from fsg.train.config import TrainConfig


def test_cli_flags_are_derived_from_the_configs():
    from fsg.cli.options import estimator_flags
    from fsg.estimators import EstimatorConfig, Estimator, option, register_estimator

    flags = estimator_flags()
    assert set(flags) == {n for e in ESTIMATORS for n in option_names(e)}
    for name, cls in ESTIMATORS.items():
        for spec in cls.Config.specs():
            kw, help = flags[spec.name]
            assert name in help and spec.help.replace("%", "%%") in help, (name, spec.name)
    assert flags["beta"][1] == "fsg: weight β of the slow gradient, D = β·G_slow + (1−β)·c⊙G_fast (default 0.9)"
    assert "fc-grad, multifc: " in flags["hidden"][1] and "lstmfc: hidden size of the LSTM" in flags["hidden"][1]
    assert flags["recompute"][0]["action"].__name__ == "BooleanOptionalAction"
    assert flags["layout"][0]["choices"] == ["flat", "temporal", "stream"]

    @dataclasses.dataclass(frozen=True)
    class ToyConfig(EstimatorConfig):
        gamma: float = option(0.5, "toy weight", kind="float", low=0, high=1)

    @register_estimator("toy-config-test", config=ToyConfig)
    class Toy(Estimator):
        def __init__(self, config=None, **options):
            super().__init__()
            self.config = ToyConfig.from_options(config, **options)

    try:
        assert estimator_flags()["gamma"][1] == "toy-config-test: toy weight (default 0.5)"
        assert check_options("toy-config-test", {"gamma": 0.25}) == ToyConfig(0.25)
        with pytest.raises(ValueError, match="estimator 'toy-config-test': gamma must be a number in \\[0, 1\\]"):
            TrainConfig(estimator="toy-config-test", estimator_options={"gamma": 2}).validate()
    finally:
        del ESTIMATORS["toy-config-test"]
