"""--val-split: a held-out part of the training set, the same for every run, never trained on."""

import json

import pytest
import torch

from fsg.train.config import TrainConfig
from fsg.train.build import build_data, split_validation

from conftest import cli_error, fsg_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SYN = dict(dataset="synthetic", dataset_options={"n_train": 60, "n_test": 12, "size": 8, "num_classes": 4},
           model="small-cnn", width=2, batch_size=8)


def _keys(ds):
    """One hashable key per image (its bytes and label)."""
    return [(bytes(ds.images[i].numpy().tobytes()), int(ds.labels[i])) for i in range(len(ds))]


def test_validation_is_disjoint_and_the_same_for_every_seed():
    full = build_data(TrainConfig(**SYN), ("train",))["train"][0]
    splits = [build_data(TrainConfig(**SYN, val_split=15, seed=s), ("train",)) for s in (0, 1, 7)]
    for d in splits:
        train, val = d["train"][0], d["val"][0]
        assert len(val) == 15 and len(train) == 45
        assert not set(_keys(train)) & set(_keys(val))
        assert sorted(_keys(train) + _keys(val)) == sorted(_keys(full))  # nothing lost
    vals = [_keys(d["val"][0]) for d in splits]
    assert vals[0] == vals[1] == vals[2]
    assert splits[1]["train"][1].dataset is splits[1]["train"][0]  # the loader trains on the rest only


def test_train_subset_is_drawn_from_the_rest():
    d = build_data(TrainConfig(**SYN, val_split=20, train_subset=10), ("train",))
    assert len(d["train"][0]) == 10 and not set(_keys(d["train"][0])) & set(_keys(d["val"][0]))


def test_split_too_large_is_one_line():
    ds = build_data(TrainConfig(**SYN), ("train",))["train"][0]
    with pytest.raises(ValueError, match=r"^val_split must be smaller than the training set \(60 images\), got 60$"):
        split_validation(ds, 60)


def test_cli_logs_validation_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = fsg_cli(capsys, "train", "--dataset", "synthetic", "--dataset-option", "n_train=48",
                                "--dataset-option", "n_test=16", "--dataset-option", "size=8",
                                "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "2",
                                "--batch-size", "16", "--no-progress", "--estimator", "ste", "--epochs", "2",
                                "--val-split", "16", "--out", str(out), "--log-every", "1")
    assert code == 0, err
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in epochs)
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 4  # 32 training images / 16: the 16 held out are not trained on
    times = [r["train_time"] for r in steps]
    assert all(b > a for a, b in zip(times, times[1:]))
    err = cli_error(capsys, "train", "--dataset", "synthetic", "--dataset-option", "n_train=48",
                    "--model", "small-cnn", "--val-split", "48", "--out", str(tmp_path / "bad"))
    assert "val_split must be smaller than the training set (48 images), got 48" in err
    assert not (tmp_path / "bad").exists()
