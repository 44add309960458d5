"""The one configuration merge of ``fsg train``, ``fsg pretrain`` and ``fsg grid``: defaults (or a
resumed checkpoint's configuration) < ``--config FILE`` < the flags given on the command line."""

import json

import pytest
import torch

from fsg.cli.app import build_parser, main
from fsg.cli.options import PRETRAIN_DEFAULTS, config_dict_from_args, config_from_args, merge_config
from fsg.train.config import TrainConfig

TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=32", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress"]


def parse(*argv):
    return build_parser().parse_args(list(argv))


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"lr": 0.05, "epochs": 7, "batch_size": 32, "optimizer": "adam", "dataset": "synthetic",
                                "estimator_options": {"beta": 0.5, "history": 3},
                                "dataset_options": {"noise": 0.25}}))
    return str(path)


def test_merge_config_later_layers_win_and_option_dicts_merge_key_by_key():
    base = {"lr": 0.1, "epochs": 1, "estimator_options": {"beta": 0.9}, "dataset_options": {}}
    merged = merge_config(base, {"lr": 0.05, "estimator_options": {"history": 3}},
                          {"lr": 0.01, "estimator_options": {"beta": 0.5}})
    assert merged == {"lr": 0.01, "epochs": 1, "estimator_options": {"beta": 0.5, "history": 3},
                      "dataset_options": {}}
    assert base == {"lr": 0.1, "epochs": 1, "estimator_options": {"beta": 0.9}, "dataset_options": {}}


def test_train_defaults_then_file_then_flags(config_file):
    cfg, resume = config_from_args(parse("train"))
    assert resume is None and cfg == TrainConfig()
    cfg, _ = config_from_args(parse("train", "--config", config_file))
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.optimizer) == (0.05, 7, 32, "adam")
    assert cfg.estimator_options == {"beta": 0.5, "history": 3} and cfg.dataset_options == {"noise": 0.25}
    assert cfg.seed == TrainConfig().seed  # neither in the file nor given: the default
    cfg, _ = config_from_args(parse("train", "--config", config_file, "--lr", "0.2", "--beta", "0.7",
                                    "-E", "d_state=8", "--dataset-option", "size=8"))
    assert (cfg.lr, cfg.epochs) == (0.2, 7)
    assert cfg.estimator_options == {"beta": 0.7, "history": 3, "d_state": 8}
    assert cfg.dataset_options == {"noise": 0.25, "size": 8}


def test_pretrain_defaults_then_file_then_flags(config_file, tmp_path):
    cfg, _ = config_from_args(parse("pretrain"))
    assert {k: getattr(cfg, k) for k in PRETRAIN_DEFAULTS} == PRETRAIN_DEFAULTS
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"full_precision": False, "epochs": 2}))
    cfg, _ = config_from_args(parse("pretrain", "--config", str(plain)))
    assert cfg.full_precision and cfg.epochs == 2 and cfg.lr == PRETRAIN_DEFAULTS["lr"]
    cfg, _ = config_from_args(parse("pretrain", "--config", str(plain), "--lr", "0.3"))
    assert cfg.full_precision and cfg.lr == 0.3


def test_grid_merges_like_train(config_file):
    argv = ["--config", config_file, "--lr", "0.2", "--beta", "0.7", "--epochs", "3"]
    grid = config_dict_from_args(parse("grid", *argv))
    train, _ = config_from_args(parse("train", *argv))
    assert grid == train.to_dict()
    assert grid["estimator_options"] == {"beta": 0.7, "history": 3} and grid["lr"] == 0.2
    assert config_dict_from_args(parse("grid")) == TrainConfig().to_dict()


def test_resume_checkpoint_then_file_then_flags(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--lr", "0.02", "--out", str(run)]) == 0
    capsys.readouterr()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"epochs": 4, "save_every": 5}))
    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    cfg, resume = config_from_args(parse("train", "--resume", str(run)))
    assert resume == run / "last.pt" and (cfg.epochs, cfg.lr, cfg.out) == (1, 0.02, str(run))
    cfg, _ = config_from_args(parse("train", "--resume", str(run / "last.pt"), "--config", str(other)))
    assert (cfg.epochs, cfg.save_every, cfg.lr) == (4, 5, 0.02)
    cfg, resume = config_from_args(parse("train", "--resume", "--out", str(run), "--config", str(other),
                                         "--epochs", "6"))
    assert resume == run / "last.pt" and (cfg.epochs, cfg.save_every, cfg.out) == (6, 5, str(run))
    assert loads and all(loads), "the configuration is read without loading the checkpoint's tensors"
    with pytest.raises(ValueError, match="checkpoint of 'fsg train', not of 'fsg pretrain'"):
        config_from_args(parse("pretrain", "--resume", str(run)))
