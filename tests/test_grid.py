"""``fsg grid`` / :func:`fsg.grid.run_grid`: layout, the results table and JSON, the curves, resume."""

import json
import re
import statistics
import struct
import sys

import pytest
import torch

import fsg.data
import fsg.train.loop
from fsg.train.checkpoint import load_checkpoint
from fsg.cli.app import main
from fsg.train.config import TrainConfig
from fsg.train.grid import parse_seeds, run_grid, write_report

from conftest import interrupt_at_batch

# 48 training images in batches of 16: 3 steps per epoch
TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=48", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress", "--log-every", "1", "--lr", "0.05",
        "--optimizers", "adam"]
RUNS = ["multifc-dorefa-adam-s0", "multifc-dorefa-adam-s1", "ste-dorefa-adam-s0", "ste-dorefa-adam-s1"]
ROW = re.compile(r"^\| (\S+) \| (\S+) \| (\S+) \| ([\d.]+) ± ([\d.]+) \| ([\d.]+) ± ([\d.]+) \| (\d+) \| (\d+) \|$")


pytestmark = pytest.mark.usefixtures("one_thread")


def grid(capsys, *args):
    code = main(["grid", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_error(capsys, *args, after_start=False):
    """The one-line error of ``fsg grid ARGS`` (exit status 2). ``after_start``: the error comes from
    the first run, after the grid's one-line note that it is starting."""
    with pytest.raises(SystemExit) as info:
        main(["grid", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2
    if after_start:
        note, _, err = err.partition("\n")
        assert note.startswith("fsg grid: [1/"), note
    assert err.startswith("fsg: error: ") and err.count("\n") == 1, err
    return err


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def recompute(run_dir, k):
    """(mean test accuracy over the last k evaluated epochs, train loss of the last epoch) from metrics.jsonl."""
    epochs = [r for r in rows(run_dir) if r["kind"] in ("epoch", "final") and r["test_accuracy"] is not None]
    return statistics.fmean(r["test_accuracy"] for r in epochs[-k:]), epochs[-1]["train_loss"]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """2 estimators x 2 seeds x 3 epochs of 3 steps, with a report over the last 2 epochs."""
    out = tmp_path_factory.mktemp("grid") / "g"
    torch.set_num_threads(1)
    code = main(["grid", "--estimators", "ste,multifc", "--seeds", "0,1", "--epochs", "3", "--hidden", "8",
                 "--last-k", "2", "--out", str(out), *TINY])
    assert code == 0
    return out


def test_layout_table_json_and_curves(tiny_grid):
    out = tiny_grid
    assert sorted(p.name for p in out.iterdir()) == sorted(RUNS + ["curves.png", "grid.json", "results.json",
                                                                    "results.md"])
    for name in RUNS:
        assert sorted(p.name for p in (out / name).iterdir()) == ["config.json", "last.pt", "metrics.csv",
                                                                  "metrics.jsonl"]
        cfg = TrainConfig.load(out / name / "config.json")
        est, q, opt, seed = name.split("-")
        assert (cfg.estimator, cfg.quantizer, cfg.optimizer, cfg.seed) == (est, q, opt, int(seed[1:]))
        assert cfg.epochs == 3 and cfg.lr == 0.05 and cfg.model == "small-cnn"
        # the estimator option goes to the estimator that takes it
        assert cfg.estimator_options == ({"hidden": 8} if est == "multifc" else {})
        assert load_checkpoint(out / name / "last.pt")["step"] == 9

    md = (out / "results.md").read_text()
    table = {m.group(1): m.groups() for m in map(ROW.match, md.splitlines()) if m}
    assert list(table) == ["ste", "multifc"]  # the order of --estimators
    report = json.loads((out / "results.json").read_text())
    assert report["last_k"] == 2 and [g["estimator"] for g in report["groups"]] == ["ste", "multifc"]
    for g in report["groups"]:
        est = g["estimator"]
        accs, losses = zip(*(recompute(out / f"{est}-dorefa-adam-s{s}", 2) for s in (0, 1)))
        # results.json: exact
        assert g["n_seeds"] == 2 and g["seeds"] == [0, 1] and g["steps"] == [9]
        assert g["test_accuracy_last_k"]["mean"] == pytest.approx(statistics.fmean(accs))
        assert g["test_accuracy_last_k"]["std"] == pytest.approx(statistics.stdev(accs))
        assert g["train_loss"]["mean"] == pytest.approx(statistics.fmean(losses))
        assert g["train_loss"]["std"] == pytest.approx(statistics.stdev(losses))
        for s, acc in enumerate(accs):
            r = report["runs"][f"{est}-dorefa-adam-s{s}"]
            assert r["acc_k"] == pytest.approx(acc) and r["k_used"] == 2 and r["evaluations"] == 3 and r["finished"]
        # results.md: the same numbers, in percent (2 decimals) and loss (4 decimals)
        _, q, opt, acc_m, acc_s, loss_m, loss_s, n, steps = table[est]
        assert (q, opt, int(n), int(steps)) == ("dorefa", "adam", 2, 9)
        assert float(acc_m) == pytest.approx(100 * statistics.fmean(accs), abs=0.006)
        assert float(acc_s) == pytest.approx(100 * statistics.stdev(accs), abs=0.006)
        assert float(loss_m) == pytest.approx(statistics.fmean(losses), abs=6e-5)
        assert float(loss_s) == pytest.approx(statistics.stdev(losses), abs=6e-5)
    assert "last 2 evals" in md and "sample standard deviation" in md

    (w, h), nbytes = png_size(out / "curves.png")
    assert w >= 800 and h >= 300 and nbytes > 10_000
    from PIL import Image

    with Image.open(out / "curves.png") as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # axes, text and curves, not a blank canvas


def test_rerun_skips_finished_runs_and_report_only(tiny_grid, capsys, monkeypatch):
    out = tiny_grid
    before = {n: (out / n / "last.pt").stat().st_mtime_ns for n in RUNS}
    expected = json.loads((out / "results.json").read_text())

    def no_training(*a, **k):
        raise AssertionError("train() called for a finished run")

    monkeypatch.setattr(fsg.train.loop, "train", no_training)
    code, stdout, err = grid(capsys, "--estimators", "ste,multifc", "--seeds", "0-1", "--epochs", "3", "--hidden",
                             "8", "--last-k", "2", "--out", str(out), *TINY)
    assert code == 0 and err.count("skipped") == 4
    assert "| ste | dorefa | adam |" in stdout and "curves.png" in stdout
    assert json.loads((out / "results.json").read_text()) == expected
    assert {n: (out / n / "last.pt").stat().st_mtime_ns for n in RUNS} == before

    # --report-only rebuilds the files from the runs (and --last-k changes the window)
    for f in ("results.md", "results.json", "curves.png"):
        (out / f).unlink()
    code, stdout, _ = grid(capsys, "--report-only", str(out), "--last-k", "2", "--x-axis", "epoch")
    assert code == 0 and json.loads((out / "results.json").read_text()) == expected
    assert (out / "curves.png").stat().st_size > 10_000
    code, stdout, _ = grid(capsys, "--report-only", str(out), "--last-k", "1", "--json")
    report = json.loads(stdout)
    acc, _ = recompute(out / "ste-dorefa-adam-s1", 1)
    assert report["runs"]["ste-dorefa-adam-s1"]["acc_k"] == pytest.approx(acc)


def test_unfinished_runs_are_resumed(tmp_path, capsys, monkeypatch):
    out = tmp_path / "g"
    common = ["--estimators", "ste", "--seeds", "3", "--out", str(out), *TINY]
    code, stdout, _ = grid(capsys, *common, "--max-steps", "2", "--epochs", "2")
    assert code == 0 and re.search(r"^\| ste \| dorefa \| adam \| [\d.]+ \| [\d.]+ \| 1 \| 2 \|$", stdout, re.M)

    calls = []
    real = fsg.train.loop.train

    def spy(cfg, resume=None, **kw):
        calls.append((cfg.seed, cfg.max_steps, resume))
        return real(cfg, resume=resume, **kw)

    monkeypatch.setattr(fsg.train.loop, "train", spy)
    code, _, err = grid(capsys, *common, "--epochs", "2")  # max_steps lifted: continue to 2 epochs
    assert code == 0 and "resuming from step 2" in err
    run = out / "ste-dorefa-adam-s3"
    assert calls == [(3, None, run / "last.pt")]
    assert load_checkpoint(run / "last.pt")["step"] == 6
    r = json.loads((out / "results.json").read_text())["runs"]["ste-dorefa-adam-s3"]
    # the final evaluation at step 2 is superseded by the end of epoch 1
    assert r["evaluations"] == 2 and r["steps"] == 6 and r["finished"]


def test_ctrl_c_then_rerun_finishes_the_grid(tmp_path, capsys, monkeypatch):
    out = tmp_path / "g"
    common = ["--estimators", "ste", "--seeds", "0,1", "--epochs", "1", "--out", str(out), *TINY]
    interrupt_at_batch(monkeypatch, 5)  # second run, second batch
    code, _, err = grid(capsys, *common)
    assert code == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("fsg: interrupted at epoch 1, step 1;") and "running the same grid again resumes" in last
    assert not (out / "results.md").exists()
    monkeypatch.undo()  # the data pipeline works again
    code, stdout, err = grid(capsys, *common)
    assert code == 0 and "s0: finished (step 3), skipped" in err and "s1: resuming from step 1" in err
    assert re.search(r"^\| ste \| dorefa \| adam \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| 2 \| 3 \|$", stdout, re.M)


def test_python_api_and_missing_matplotlib(tmp_path, monkeypatch, capsys):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    lines = []
    report = run_grid(tmp_path / "g", "ste", seeds=[0], config=TrainConfig(model="small-cnn", width=4),
                      dataset="synthetic", dataset_options=dict(n_train=32, n_test=8, size=8), batch_size=16,
                      epochs=1, num_threads=1, log=lines.append)
    assert report["curves"] is None and not (tmp_path / "g" / "curves.png").exists()
    missing = [l for l in lines if "matplotlib" in l]
    assert len(missing) == 1 and "pip install matplotlib" in missing[0]
    g = report["groups"][0]
    assert (g["estimator"], g["quantizer"], g["optimizer"], g["n_seeds"]) == ("ste", "dorefa", "sgd", 1)
    assert g["test_accuracy_last_k"]["std"] is None  # one seed: no spread
    md = (tmp_path / "g" / "results.md").read_text()
    assert re.search(r"^\| ste \| dorefa \| sgd \| [\d.]+ \| [\d.]+ \| 1 \| 2 \|$", md, re.M)
    assert json.loads((tmp_path / "g" / "results.json").read_text())["groups"] == report["groups"]


def test_parse_seeds():
    assert parse_seeds("0-2,5,1") == [0, 1, 2, 5] and parse_seeds(4) == [4] and parse_seeds([2, 2]) == [2]
    for bad in ("", "a", "-1", "3-1", "1,,2"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


@pytest.mark.parametrize("args, fragment", [
    (["--estimators", "ste,adagrad"], "unknown estimator 'adagrad'"),
    (["--estimators", "ste,"], "empty name"),
    (["--estimators", "ste", "--quantizers", "ternary"], "unknown quantizer 'ternary'"),
    (["--estimators", "ste", "--optimizers", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--estimators", "ste", "--seeds", "1-x"], "seeds: expected non-negative integers"),
    (["--estimators", "ste,multifc", "--beta", "0.5"], "option(s) beta taken by none of the grid's estimators"),
    (["--estimators", "fsg", "--history", "0"], "must be a positive integer"),
    (["--estimators", "ste", "--epochs", "0"], "must be a positive integer"),
    (["--estimators", "ste", "--pretrained", "/nonexistent.pth"], "pre-trained weights not found"),
    (["--estimator", "ste"], "ambiguous option"),
    (["--resume"], "unrecognized arguments"),
    (["--report-only", "DIR", "--lr", "0.1"], "--report-only trains nothing"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, fragment):
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    err = cli_error(capsys, "--out", str(tmp_path / "g"), *TINY, *args)
    assert fragment in err
    assert not (tmp_path / "g").exists()


def test_error_in_a_run_is_one_line(tmp_path, capsys):
    err = cli_error(capsys, "--out", str(tmp_path / "g"), *TINY, "--estimators", "ste", "--model", "resnet20",
                    after_start=True)
    assert "resnet20 takes 3-channel images" in err
    assert not (tmp_path / "g" / "results.md").exists()


def test_report_errors(tmp_path, capsys):
    assert "no grid directory" in cli_error(capsys, "--report-only", str(tmp_path / "none"))
    assert "holds no run" in cli_error(capsys, "--report-only", str(tmp_path))
    with pytest.raises(ValueError, match="last_k must be a positive integer"):
        write_report(tmp_path, last_k=0)


def test_existing_run_with_another_configuration(tmp_path, capsys):
    out = tmp_path / "g"
    assert grid(capsys, "--estimators", "ste", "--epochs", "1", "--out", str(out), *TINY)[0] == 0
    err = cli_error(capsys, "--estimators", "ste", "--epochs", "1", "--out", str(out), *TINY, "--lr", "0.5")
    assert "holds a run with another configuration (lr: 0.05 there, 0.5 in this grid)" in err


# ----------------------------------------------------------------------------------------------
# report groups: by the full configuration, one seed counted once


def fake_run(out, name, acc, **changes):
    """A finished run directory (config.json + metrics.jsonl with one evaluated epoch)."""
    cfg = TrainConfig(**{**dict(model="small-cnn", dataset="synthetic", estimator="ste", optimizer="adam", epochs=1),
                         **changes}).to_dict()
    d = out / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    row = {"kind": "epoch", "epoch": 1, "step": 3, "train_loss": 1.0 - acc, "test_loss": 1.0, "test_accuracy": acc}
    (d / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    return cfg


def test_report_groups_by_the_full_configuration(tmp_path, capsys):
    out = tmp_path / "g"
    fake_run(out, "a-s0", 0.5, seed=0)
    fake_run(out, "a-s1", 0.7, seed=1, device="cuda", num_threads=4)  # run-only settings: same group
    fake_run(out, "b-s0", 0.2, seed=0, model="resnet20")
    fake_run(out, "b-s1", 0.4, seed=1, model="resnet20")
    old = fake_run(out, "c-s0", 0.9, seed=0, dataset="cifar10")
    del old["nonfinite"], old["max_skips"]  # a config.json of an older fsg
    (out / "c-s0" / "config.json").write_text(json.dumps(old))
    code, stdout, _ = grid(capsys, "--report-only", str(out), "--json")
    assert code == 0
    groups = {tuple(sorted(g["runs"])): g for g in json.loads(stdout)["groups"]}
    assert set(groups) == {("a-s0", "a-s1"), ("b-s0", "b-s1"), ("c-s0",)}
    assert groups[("a-s0", "a-s1")]["settings"] == {"dataset": "synthetic", "model": "small-cnn"}
    assert groups[("b-s0", "b-s1")]["settings"] == {"dataset": "synthetic", "model": "resnet20"}
    assert groups[("c-s0",)]["settings"] == {"dataset": "cifar10", "model": "small-cnn"}
    assert groups[("a-s0", "a-s1")]["test_accuracy_last_k"]["mean"] == pytest.approx(0.6)
    assert groups[("b-s0", "b-s1")]["n_seeds"] == 2 and groups[("a-s0", "a-s1")]["settings_differ"] == ["device"]
    md = (out / "results.md").read_text()
    assert "| ste | dorefa | adam | dataset=synthetic, model=resnet20 | 30.00 ± 14.14 |" in md
    assert "| settings |" in md and "its runs differ in device" in md


def test_report_refuses_one_seed_counted_twice(tmp_path, capsys):
    out = tmp_path / "g"
    for name in ("copy1", "copy2", "copy3", "copy4"):  # four runs of seed 0
        fake_run(out, name, 0.5, seed=0)
    err = cli_error(capsys, "--report-only", str(out))
    assert "runs copy1 and copy2" in err and "have the same configuration and seed 0" in err
    assert not (out / "results.md").exists()
