"""``fsg train`` / ``fsg pretrain`` / ``fsg eval``, the run configuration, and pre-trained weights."""

import csv
import json
from pathlib import Path

import pytest
import torch

import fsg
import fsg.data
from fsg.train.checkpoint import load_checkpoint, save_checkpoint
from fsg.cli.app import main
from fsg.cli.options import ESTIMATOR_FLAGS
from fsg.train.config import TrainConfig, estimator_option_names
from fsg.estimators import ESTIMATORS
from fsg.models import PretrainedError, SmallCNN, load_pretrained, resnet

from conftest import cli_error, fsg_cli, interrupt_at_batch

PRETRAINED = Path("/work/shared/pretrained/ResNet20-CIFAR10-pretrain.pth")

TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=48", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress", "--log-every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot_dir(d):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


# ----------------------------------------------------------------------------------------------
# fsg train / eval / --resume


def test_train_writes_run_files_eval_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = fsg_cli(capsys, "train", *TINY, "--estimator", "multifc", "--hidden", "8", "--epochs", "2",
                              "--lr", "0.01", "--optimizer", "adam", "--out", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["steps"] == 6 and summary["epochs"] == 2 and 0 <= summary["test_accuracy"] <= 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.csv", "metrics.jsonl"]

    cfg = TrainConfig.load(out / "config.json")
    assert cfg.estimator == "multifc" and cfg.estimator_options == {"hidden": 8}
    assert cfg.optimizer == "adam" and cfg.lr == 0.01 and cfg.dataset_options["n_train"] == 48
    assert load_checkpoint(out / "last.pt")["config"] == cfg.to_dict()

    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 7))
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert set(r) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "epoch_time"}
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[-1]["kind"] == "epoch" and float(table[-1]["test_accuracy"]) >= 0

    code, stdout, _ = fsg_cli(capsys, "eval", str(out / "last.pt"))
    assert code == 0 and "test accuracy" in stdout and "%" in stdout
    code, stdout, _ = fsg_cli(capsys, "eval", str(out), "--json")
    r = json.loads(stdout)
    assert r["accuracy"] == pytest.approx(summary["test_accuracy"]) and r["images"] == 16 and r["step"] == 6

    code, stdout, _ = fsg_cli(capsys, "train", "--resume", str(out / "last.pt"), "--epochs", "3", "--json",
                              "--no-progress")
    assert code == 0 and json.loads(stdout)["steps"] == 9
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3]
    assert TrainConfig.load(out / "config.json").epochs == 3

    # --resume without a path: <out>/last.pt
    code, stdout, err = fsg_cli(capsys, "train", "--resume", "--out", str(out), "--epochs", "3", "--no-progress")
    assert code == 0 and "nothing to do" in err


def test_config_file_reproduces_a_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--estimator", "fsg", "--expand", "4", "--no-lre", "--update", "fast",
                 "--epochs", "1", "--out", str(a)]) == 0
    cfg = TrainConfig.load(a / "config.json")
    assert cfg.estimator_options == {"expand": 4, "lre": False, "update": "fast"}
    assert main(["train", "--config", str(a / "config.json"), "--out", str(b), "--no-progress"]) == 0
    rows = lambda d: [{k: v for k, v in json.loads(l).items() if k not in ("epoch_time", "eval_time", "elapsed", "train_time")}  # noqa: E731
                      for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(a) == rows(b)
    # a flag overrides the file
    c = tmp_path / "c"
    assert main(["train", "--config", str(a / "config.json"), "--out", str(c), "--beta", "0.5", "--no-progress"]) == 0
    assert TrainConfig.load(c / "config.json").estimator_options == {"expand": 4, "lre": False, "update": "fast",
                                                                     "beta": 0.5}
    capsys.readouterr()


def test_ctrl_c_in_the_cli_saves_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_at_batch(monkeypatch, 3)
    code, _, err = fsg_cli(capsys, "train", *TINY, "--estimator", "ste", "--epochs", "2", "--out", str(out))
    assert code == 130
    assert err.count("\n") == 1 and err.startswith("fsg: interrupted at epoch 1, step 2;")
    assert f"fsg train --resume {out / 'last.pt'}" in err
    assert load_checkpoint(out / "last.pt")["step"] == 2
    monkeypatch.undo()  # the data pipeline works again
    code, stdout, _ = fsg_cli(capsys, "train", "--resume", str(out / "last.pt"), "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["steps"] == 6


def test_max_steps_stops_with_checkpoint_and_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = fsg_cli(capsys, "train", *TINY, "--estimator", "ste", "--max-steps", "2", "--out", str(out),
                              "--json")
    r = json.loads(stdout)
    assert code == 0 and r["steps"] == 2 and r["stopped"] == "max_steps" and r["test_accuracy"] is not None
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "final" and rows[-1]["step"] == 2
    assert load_checkpoint(out / "last.pt")["batch"] == 2


def test_tensorboard_and_progress_bar(tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    from fsg.train.loop import train

    out = tmp_path / "run"
    cfg = TrainConfig(model="small-cnn", width=2, dataset="synthetic",
                      dataset_options=dict(n_train=32, n_test=8, size=8), estimator="ste", batch_size=16,
                      epochs=1, out=str(out), tensorboard=True, num_threads=1)
    train(cfg, progress=True)
    assert any((out / "tensorboard").iterdir())
    assert "epoch 1/1" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--estimator", "multifc", "--beta", "0.5"], "estimator 'multifc' does not take option(s) beta"),
    (["--estimator", "fsg", "--history", "0"], "must be a positive integer"),
    (["--lr", "-1"], "must be a positive number"),
    (["--model", "vgg"], "invalid choice"),
    (["--estimator", "fsg", "-E", "bogus=1"], "does not take option(s) bogus"),
    (["--estimator", "fsg", "--layout", "diagonal"], "invalid choice"),
    (["--estimator", "fsg", "--slow-net", "lstm"], "invalid choice: 'lstm' (choose from 'mamba', 'lstm-fc')"),
    (["--estimator", "fsg", "-E", "slow_net=gru"], "slow_net must be one of 'mamba', 'lstm-fc', got 'gru'"),
    (["--estimator", "fsg", "--slow-net", "lstm-fc", "--history", "3"],
     "slow_net='lstm-fc' reads W̃, not the gradient history, and has no layer embedding: leave history unset"),
    (["--dataset-option", "colour=3"], "unknown synthetic dataset option(s) colour"),
    (["--model", "resnet20"], "resnet20 takes 3-channel images"),
    (["--lr-gamma", "2"], "lr_gamma must be a number > 0 and <= 1"),
    (["--config", "/nonexistent.json"], "cannot read configuration"),
    (["--pretrained", "/nonexistent.pth"], "pre-trained weights not found"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "CIFAR-10 not found"),
])
def test_bad_train_options_are_one_line(tmp_path, capsys, args, fragment):
    flags = list(TINY)
    if "--dataset" in args:  # cifar10 takes no synthetic options
        i = flags.index("--dataset")
        flags = flags[:i] + flags[i + 10:]
    err = cli_error(capsys, "train", *flags, "--out", str(tmp_path / "run"), *args)
    assert fragment in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_bad_config_file_and_resume_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "small-cnn", "colour": 1}')
    assert "unknown configuration field(s): colour" in cli_error(capsys, "train", "--config", str(bad))
    bad.write_text("{not json")
    assert "invalid JSON" in cli_error(capsys, "train", "--config", str(bad))
    assert "checkpoint not found" in cli_error(capsys, "train", "--resume", str(tmp_path / "none.pt"))
    assert "checkpoint not found" in cli_error(capsys, "eval", str(tmp_path / "none.pt"))

    out = tmp_path / "run"
    assert main(["train", *TINY, "--estimator", "ste", "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot_dir(out)
    assert "already holds a run" in cli_error(capsys, "train", *TINY, "--estimator", "ste", "--out", str(out))
    assert "cannot change lr when resuming" in cli_error(capsys, "train", "--resume", str(out), "--lr", "0.5")
    assert "is a checkpoint of 'fsg train'" in cli_error(capsys, "pretrain", "--resume", str(out))
    data = (out / "last.pt").read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupted" in cli_error(capsys, "train", "--resume", str(trunc), "--out", str(out))
    assert "truncated or corrupted" in cli_error(capsys, "eval", str(trunc))
    torch.save({"w": torch.ones(1)}, tmp_path / "sd.pt")
    assert "not an fsg checkpoint" in cli_error(capsys, "eval", str(tmp_path / "sd.pt"))
    assert snapshot_dir(out) == before


def test_train_with_the_lstm_fc_slow_net_and_old_lstm_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = fsg_cli(capsys, "train", *TINY, "--estimator", "fsg", "--slow-net", "lstm-fc", "--fast-hidden",
                              "4", "--max-steps", "3", "--out", str(out), "--json")
    assert code == 0 and json.loads(stdout)["steps"] == 3
    assert TrainConfig.load(out / "config.json").estimator_options == {"slow_net": "lstm-fc", "fast_hidden": 4}
    ck = load_checkpoint(out / "last.pt")
    est = ck["trainer"]["estimator"]
    assert est["slow.lstm.weight_ih_l0"].shape == (16, 1) and "slow.fc.bias" in est  # hidden = fast_hidden = 4
    assert all(s is not None for s in est["slow._extra_state"]["states"])
    assert sorted(ck["trainer"]["meta_optimizers"]) == ["fast", "slow"]
    code, stdout, _ = fsg_cli(capsys, "train", "--resume", str(out), "--max-steps", "5", "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["steps"] == 5

    # a checkpoint of the removed flat-history LSTM slow-net: one line, not a traceback
    ck["config"]["estimator_options"] = {"slow_net": "lstm", "lstm_hidden": 4}
    old = tmp_path / "old.pt"
    save_checkpoint(old, ck)
    for cmd in (["train", "--resume", str(old)], ["eval", str(old)]):
        err = cli_error(capsys, *cmd)
        assert "slow_net='lstm' (an LSTM scanning the flat gradient history) was removed" in err
        assert "slow_net='lstm-fc'" in err


def test_every_estimator_option_has_a_flag():
    for name in ESTIMATORS:
        for p in estimator_option_names(name):
            assert p in ESTIMATOR_FLAGS, f"{name}: option {p} has no flag"
    assert estimator_option_names("ste") == []
    with pytest.raises(ValueError, match="estimator 'ste' does not take option"):
        TrainConfig(estimator="ste", estimator_options={"beta": 0.5}).validate()


# ----------------------------------------------------------------------------------------------
# the configuration


def test_config_round_trip(tmp_path):
    cfg = TrainConfig(model="resnet32", estimator="fsg", estimator_options={"beta": 0.5, "layout": "temporal"},
                      optimizer="adam", max_steps=10, pretrained="x.pth", augment=False, weight_decay=0.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["estimator_options"] == {"beta": 0.5, "layout": "temporal"}
    d = TrainConfig().to_dict()
    assert (d["lr"], d["lr_step"], d["lr_gamma"], d["epochs"], d["batch_size"]) == (1e-3, 30, 0.1, 100, 128)


@pytest.mark.parametrize("changes, fragment", [
    (dict(model="vgg"), "model must be one of"),
    (dict(lr=0), "lr must be a number > 0"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(max_steps=1.5), "max_steps must be an integer"),
    (dict(tensorboard="yes"), "tensorboard must be true or false"),
    (dict(estimator="adagrad"), "estimator must be one of"),
    (dict(estimator="fsg", estimator_options={"beta": 2.0}), "estimator 'fsg': beta must be a number in [0, 1]"),
    (dict(estimator="lstmfc", estimator_options={"nonlinearity": "relu"}), "does not take option(s) nonlinearity"),
    (dict(dataset="cifar10", dataset_options={"size": 8}), "apply to the synthetic dataset only"),
])
def test_config_validation_is_one_line(changes, fragment):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes).validate()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_config_unknown_field():
    with pytest.raises(ValueError, match="unknown configuration field"):
        TrainConfig.from_dict({"colour": "red"})


# ----------------------------------------------------------------------------------------------
# fsg pretrain and pre-trained weights


def test_pretrain_then_train_from_it(tmp_path, capsys):
    pre = tmp_path / "pre"
    code, stdout, _ = fsg_cli(capsys, "pretrain", *TINY, "--epochs", "1", "--out", str(pre), "--json")
    assert code == 0 and json.loads(stdout)["model"] == str(pre / "model.pt")
    cfg = TrainConfig.load(pre / "config.json")
    assert cfg.full_precision and cfg.optimizer == "sgdm" and cfg.lr == 0.1
    sd = torch.load(pre / "model.pt", weights_only=True)
    assert "conv1.weight" in sd and not any("parametrizations" in k for k in sd)

    model = SmallCNN(in_channels=1, num_classes=4, width=4)
    assert load_pretrained(model, pre / "model.pt") == []
    ck = load_checkpoint(pre / "last.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["trainer"]["model"][k])
    binarized = fsg.binarize(SmallCNN(in_channels=1, num_classes=4, width=4))
    assert load_pretrained(binarized, pre / "model.pt") == []  # X.weight → X.parametrizations.weight.original
    assert torch.equal(binarized.conv1.parametrizations.weight.original, sd["conv1.weight"])

    with pytest.raises(PretrainedError) as info:  # another width: one line listing the mismatches
        load_pretrained(SmallCNN(in_channels=1, num_classes=4, width=8), pre / "model.pt")
    assert "shape mismatch conv1.weight" in str(info.value) and "\n" not in str(info.value)

    out = tmp_path / "bnn"
    code, stdout, err = fsg_cli(capsys, "train", *TINY, "--estimator", "ste", "--epochs", "1", "--out", str(out),
                                "--pretrained", str(pre / "model.pt"))
    assert code == 0 and "loaded pre-trained weights" in err

    code, stdout, _ = fsg_cli(capsys, "pretrain", "--resume", str(pre), "--epochs", "2", "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["epochs"] == 2


def test_load_pretrained_rejects_bad_files(tmp_path):
    model = SmallCNN(in_channels=1, num_classes=4, width=4)
    (tmp_path / "rand.pth").write_bytes(b"\x00garbage" * 10)
    torch.save({"conv1.weight": torch.ones(1), "extra": torch.ones(1)}, tmp_path / "wrong.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for f, fragment in [("none.pth", "not found"), ("rand.pth", "cannot read"), ("wrong.pth", "unexpected extra")]:
        with pytest.raises(PretrainedError, match=fragment) as info:
            load_pretrained(model, tmp_path / f)
        assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unchanged


@pytest.mark.skipif(not PRETRAINED.exists(), reason=f"{PRETRAINED} not present")
def test_paper_pretrained_resnet20_loads():
    model = resnet(20)
    missing = load_pretrained(model, PRETRAINED)
    assert missing and all(k.startswith("bn_fc.") for k in missing)
    binarized = fsg.binarize(resnet(20))
    assert load_pretrained(binarized, PRETRAINED) == missing
    sd = torch.load(PRETRAINED, map_location="cpu", weights_only=True)
    assert torch.equal(binarized.layer3[2].conv2.parametrizations.weight.original, sd["layer3.2.conv2.weight"])
    assert torch.equal(binarized.fc.bias, sd["fc.bias"])


def test_subset_is_a_fixed_random_sample_not_a_prefix():
    import fsg.data
    from fsg.train.build import subset as _subset

    ds = fsg.data.ImageDataset(images=torch.zeros(100, 3, 2, 2, dtype=torch.uint8),
                               labels=torch.arange(10).repeat_interleave(10), classes=[str(i) for i in range(10)],
                               mean=(0.5,) * 3, std=(0.5,) * 3, name="t")
    a, b = _subset(ds, 20), _subset(ds, 20)
    assert torch.equal(a.labels, b.labels)  # the same subset every time
    assert len(a.labels.unique()) > 3  # not the first two classes of a class-ordered split
    assert _subset(ds, 100) is ds
