"""The ``fsg`` command line: ``fsg demo`` (tiny settings) and ``fsg estimators``."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsg import ESTIMATORS, QUANTIZERS
from fsg.cli.app import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_json(capsys, *args):
    assert main(["demo", "--json", "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def check_result(r, steps):
    assert set(r) >= {"train_loss", "test_loss", "test_accuracy", "sec_per_step", "time_vs_ste", "steps"}
    assert r["steps"] == steps
    assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
    assert math.isfinite(r["test_loss"]) and r["test_loss"] > 0
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert r["sec_per_step"] > 0


def test_demo_json(capsys):
    report = run_json(capsys, "--steps", "3", "--estimators", "ste,multifc", "--batch-size", "16")
    assert list(report["results"]) == ["ste", "multifc"]
    for r in report["results"].values():
        check_result(r, 3)
    assert report["results"]["ste"]["time_vs_ste"] == 1.0
    cfg = report["config"]
    assert cfg["estimators"] == ["ste", "multifc"] and cfg["steps"] == 3 and cfg["batch_size"] == 16
    assert cfg["quantizer"] == "dorefa" and cfg["train_loss_window"] == 3


def test_demo_all_estimators_other_options(capsys):
    names = ["ste", "fc-grad", "multifc", "lstmfc", "fsg"]
    report = run_json(capsys, "--steps", "2", "--estimators", ",".join(names), "--quantizer", "bwn",
                      "--optimizer", "sgdm", "--lr", "0.05", "--schedule", "constant", "--width", "2",
                      "--batch-size", "8", "--seed", "3")
    assert list(report["results"]) == names
    for r in report["results"].values():
        check_result(r, 2)
    assert report["config"]["optimizer"] == "sgdm" and report["config"]["seed"] == 3


def test_demo_without_ste_has_no_ratio(capsys):
    report = run_json(capsys, "--steps", "2", "--estimators", "multifc", "--batch-size", "8")
    assert report["results"]["multifc"]["time_vs_ste"] is None


def test_demo_is_deterministic(capsys):
    args = ["--steps", "4", "--estimators", "ste,fsg", "--batch-size", "16", "--seed", "1"]
    a, b = run_json(capsys, *args), run_json(capsys, *args)
    strip = lambda rep: {n: {k: v for k, v in r.items() if k not in ("sec_per_step", "time_vs_ste")}
                         for n, r in rep["results"].items()}
    assert strip(a) == strip(b)
    assert a["config"] == b["config"]
    c = run_json(capsys, *args[:-1], "2")  # another seed: another init / batch order
    assert strip(c) != strip(a)


def test_demo_is_seed_matched(capsys):
    # Step 0 of every estimator is a plain forward of the same initial model on the same batch.
    report = run_json(capsys, "--steps", "1", "--estimators", "ste,multifc,fsg", "--batch-size", "16")
    losses = {r["train_loss"] for r in report["results"].values()}
    assert len(losses) == 1


def test_demo_table(capsys):
    assert main(["demo", "--steps", "2", "--estimators", "ste,multifc", "--batch-size", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(l for l in lines if l.startswith("estimator"))
    assert "train loss" in header and "test loss" in header and "test acc" in header and "s/step" in header
    assert any(l.startswith("ste ") for l in lines) and any(l.startswith("multifc ") for l in lines)
    assert "%" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["demo", "--estimators", "ste,nope"], "unknown estimator 'nope'"),
        (["demo", "--estimators", "ste,,fsg"], "empty name"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--steps", "abc"], "--steps"),
        (["demo", "--lr", "-0.1"], "--lr"),
        (["demo", "--lr", "nan"], "--lr"),
        (["demo", "--batch-size", "0"], "--batch-size"),
        (["demo", "--quantizer", "ternary"], "--quantizer"),
        (["demo", "--optimizer", "rmsprop"], "--optimizer"),
        (["demo", "--bogus"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
        ([], "choose a command"),
    ],
)
def test_invalid_input_is_one_line_exit_2(capsys, args, fragment):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fsg: error: ") and fragment in lines[0]


def test_library_value_error_is_one_line(capsys, monkeypatch):
    import fsg.cli.demo as cli

    def boom(*a, **k):
        raise ValueError("bad option\nfrom the library")

    monkeypatch.setattr(cli, "run_demo", boom)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fsg: error: bad option from the library (see 'fsg demo --help')"]


def test_estimators_lists_everything(capsys):
    assert main(["estimators"]) == 0
    out = capsys.readouterr().out
    listed = {l.split()[0] for l in out.splitlines() if l.startswith("  ")}
    assert {"ste", "fc-grad", "multifc", "lstmfc", "fsg"} <= listed
    assert set(ESTIMATORS) <= listed and set(QUANTIZERS) <= listed
    for line in out.splitlines():
        if line.startswith("  "):
            assert len(line.split(None, 1)) == 2  # every entry has a description


def test_python_m_fsg_help():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "fsg", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "demo" in r.stdout and "estimators" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fsg", "demo", "--estimators", "xyz"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "fsg: error: unknown estimator" in r.stderr


def test_non_finite_numbers_are_null_in_json_and_readable_in_table():
    from fsg.cli.demo import format_table, jsonable

    report = {
        "config": {"model": "SmallCNN(width=8)", "quantizer": "dorefa", "optimizer": "sgd", "lr": 1e9,
                   "schedule": "constant", "steps": 2, "batch_size": 8, "seed": 0, "train_loss_window": 2,
                   "torch_threads": 1, "task": {"num_classes": 10, "channels": 1, "size": 16, "n_train": 8,
                                                "n_test": 8, "noise": 0.5, "max_shift": 1}},
        "results": {"ste": {"train_loss": float("nan"), "test_loss": float("inf"), "test_accuracy": 0.1,
                            "sec_per_step": 0.01, "time_vs_ste": 1.0, "steps": 2},
                    "fsg": {"train_loss": 3e29, "test_loss": 1.5, "test_accuracy": 0.1,
                            "sec_per_step": 0.5, "time_vs_ste": 50.0, "steps": 2}},
        "wall_time_s": 1.0,
    }
    fixed = jsonable(report)
    assert fixed["results"]["ste"]["train_loss"] is None and fixed["results"]["ste"]["test_loss"] is None
    json.dumps(fixed, allow_nan=False)
    table = format_table(report)
    assert "nan" in table and "inf" in table and "3.000e+29" in table


def test_run_demo_api_validates():
    from fsg.cli.demo import run_demo

    for kwargs in ({"steps": 0}, {"batch_size": 0}, {"width": 0}, {"noise": -1.0}, {"schedule": "step"},
                   {"lr": 0.0}, {"quantizer": "ternary"}, {"optimizer": "rmsprop"}):
        with pytest.raises(ValueError):
            run_demo("ste", **{"steps": 1, **kwargs})
    with pytest.raises(ValueError):
        run_demo([])
    with pytest.raises(ValueError, match="unknown estimator"):
        run_demo("ste,nope", steps=1)
    report = run_demo("ste", steps=1, batch_size=4, width=2)
    assert list(report["results"]) == ["ste"]
