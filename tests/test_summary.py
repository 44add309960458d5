"""``fsg summary`` / :func:`fsg.io.summary`: per-layer parameters, memory and MACs in closed form."""

import json
import warnings

import pytest
import torch
from torch import nn

import fsg
from fsg.cli.app import main
from fsg.io.export import export_model
from fsg.models import MLP, SmallCNN, resnet
from fsg.io.summary import ModelSummary, default_input_size, summary

# sign after a ReLU is constant (fsg.binarize warns); these tests only count, never train
pytestmark = pytest.mark.filterwarnings("ignore:the input of binarized layer")

# ResNet-20 in closed form: convs 3·16·9 + 6·16·16·9 + (16·32·9 + 5·32·32·9 + 16·32) + (32·64·9 + 5·64·64·9 + 32·64)
R20_CONV = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32) + (32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64)
R20_FC_W, R20_FC_B = 64 * 10, 10
# BatchNorm affine weights (2 per channel): 7 BNs of 16 channels, 7 of 32, 7 of 64 (shortcut BNs included), bn_fc 64
R20_BN = 2 * (7 * 16 + 7 * 32 + 7 * 64 + 64)


def row(s, name):
    return next(r for r in s.rows if r.name == name)


def test_resnet20_counts_in_closed_form():
    assert R20_CONV == 270_256 and R20_BN == 1_696
    model = fsg.binarize(resnet(20), "dorefa")
    s = summary(model)
    assert isinstance(s, ModelSummary) and s.input_size == (3, 32, 32)
    t = s.totals
    assert t["params_1bit"] == R20_CONV + R20_FC_W == 270_896
    assert t["params_32bit"] == R20_BN + R20_FC_B == 1_706
    assert t["params"] == sum(p.numel() for p in model.parameters())
    assert t["memory_bytes"] == 270_896 / 8 + 1_706 * 4
    assert t["memory_fp_bytes"] == 4 * 272_602
    assert t["compression"] == pytest.approx(4 * 272_602 / (270_896 / 8 + 1_706 * 4))
    # MACs of known layers: output elements x in_channels/groups x kernel area
    assert row(s, "conv1").macs == 16 * 32 * 32 * 3 * 9 == 442_368
    assert row(s, "layer2.0.conv1").macs == 32 * 16 * 16 * 16 * 9
    assert row(s, "layer3.0.conv2").macs == 64 * 8 * 8 * 64 * 9
    assert row(s, "layer3.0.downsample.0").macs == 64 * 8 * 8 * 32
    assert row(s, "fc").macs == 64 * 10
    assert row(s, "bn1").macs == 0 and not row(s, "bn1").binarized and row(s, "bn1").params_32bit == 32
    assert t["macs"] == 442_368 + 16 * 2_359_296 + 2 * 1_179_648 + 2 * 131_072 + 640 == 40_813_184
    assert t["macs_binarized"] == t["macs"] and t["macs_full_precision"] == 0 and t["macs_binary_input"] == 0
    fc = row(s, "fc")
    assert (fc.type, fc.binarized, fc.quantizer, fc.bits, fc.params_1bit, fc.params_32bit) == \
        ("Linear", True, "dorefa", 1, 640, 10)
    assert len(s.rows) == 22 + 19 + 2 + 1  # binarized layers, their BNs and the shortcut BNs, bn_fc


def test_keep_first_last_activations_and_full_precision():
    s = summary(fsg.binarize(resnet(20), "bwn", keep_first=True, keep_last=True))
    assert row(s, "conv1").binarized is False and row(s, "conv1").params_32bit == 432
    assert row(s, "fc").params_32bit == 650 and row(s, "fc").input_bits == 32
    assert row(s, "layer1.0.conv1").quantizer == "bwn"
    t = s.totals
    assert t["params_1bit"] == R20_CONV - 432 and t["params_32bit"] == 1_706 + 432 + 640
    assert t["macs_full_precision"] == 442_368 + 640
    assert t["macs_binarized"] == 40_813_184 - 442_368 - 640 and t["macs_binary_input"] == 0

    # 1W1A: the image goes in as is, every other binarized layer's input through sign
    s = summary(fsg.binarize(resnet(20), "dorefa", activations=True))
    assert row(s, "conv1").input_bits == 32 and row(s, "bn1").input_bits is None
    assert all(r.input_bits == 1 for r in s.rows if r.binarized and r.name != "conv1")
    assert s.totals["macs_binary_input"] == 40_813_184 - 442_368

    fp = summary(resnet(20))
    assert fp.totals["params_1bit"] == 0 and fp.totals["compression"] == 1.0
    assert fp.totals["memory_bytes"] == fp.totals["memory_fp_bytes"] == 4 * 272_602
    assert fp.totals["macs"] == 40_813_184


def test_kbit_memory_grouped_conv_and_linear_macs():
    s = summary(fsg.binarize(SmallCNN(), "dorefa", bits=2))
    assert s.input_size == (1, 16, 16) and row(s, "conv2").bits == 2
    assert row(s, "conv2").memory_bytes == 8 * 16 * 9 * 2 / 8
    assert row(s, "conv1").macs == 8 * 16 * 16 * 1 * 9 and row(s, "conv2").macs == 16 * 8 * 8 * 8 * 9

    net = nn.Sequential(nn.Conv2d(4, 6, (3, 5), stride=2, padding=1, groups=2), nn.Flatten(), nn.Linear(6 * 3 * 2, 7))
    s = summary(net, input_size=(4, 6, 5))
    assert row(s, "0").macs == 6 * 3 * 2 * (4 // 2) * 3 * 5 and row(s, "2").macs == 36 * 7
    assert s.totals["params_32bit"] == 6 * 2 * 15 + 6 + 36 * 7 + 7

    m = summary(MLP(5, [3], 2))
    assert m.input_size == (5,) and m.totals["macs"] == 5 * 3 + 3 * 2
    assert summary(nn.Sequential(nn.Linear(3, 2))).totals["macs"] is None  # no input size known
    assert default_input_size(nn.Linear(2, 2)) is None


def test_summary_leaves_the_model_unchanged_and_prints():
    model = fsg.binarize(resnet(20), "sign")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = summary(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    text = str(s)
    assert "conv1" in text and "total" in text and "compression" in text and "40,813,184" in text
    d = json.loads(json.dumps(s.to_dict()))
    assert d["totals"]["params_1bit"] == 270_896 and d["rows"][0]["name"] == "conv1"
    with pytest.raises(ValueError, match="forward pass .* failed"):
        summary(model, input_size=(5, 32, 32))


def test_binary_activation_hooks_are_left_as_they_were():
    from fsg.binarize import BinaryActivation

    model = fsg.binarize(SmallCNN(), "sign", activations=True)
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, BinaryActivation)]
    before = [dict(vars(h)) for h in hooks]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = summary(model)
    assert not caught and [dict(vars(h)) for h in hooks] == before
    assert [r.input_bits for r in s.rows if r.binarized] == [32, 1, 1]


def test_checkpoint_and_exported_file_give_the_same_summary(tmp_path):
    torch.manual_seed(0)
    model = fsg.binarize(SmallCNN(in_channels=3, num_classes=4, width=4), "bwn", activations=True, keep_last=True)
    path = export_model(model, tmp_path / "m.safetensors")
    direct, from_file = summary(model), fsg.summary(str(path))
    assert [r.__dict__ for r in from_file.rows] == [r.__dict__ for r in direct.rows]
    assert from_file.totals == direct.totals and from_file.source["arch"]["name"] == "small-cnn"

    run = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--dataset-option", "n_train=16", "--dataset-option", "n_test=8",
                 "--dataset-option", "size=8", "--model", "resnet20", "--dataset-option", "channels=3",
                 "--batch-size", "16", "--epochs", "1", "--estimator", "ste", "--num-threads", "1", "--no-progress",
                 "--out", str(run)]) == 0
    s = summary(run)
    assert s.totals["params_1bit"] == 270_896 and s.source["step"] == 1


def test_cli(tmp_path, capsys):
    assert main(["summary", "--model", "resnet20", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["totals"]["params_1bit"] == 270_896 and d["totals"]["macs"] == 40_813_184

    assert main(["summary", "--model", "small-cnn", "--in-channels", "3", "--keep-first", "--activations"]) == 0
    out = capsys.readouterr().out
    assert "SmallCNN" in out and "compression" in out and "3x16x16" in out

    torch.manual_seed(0)
    path = export_model(fsg.binarize(resnet(20, num_classes=5), "sign"), tmp_path / "r.safetensors")
    assert main(["summary", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["totals"]["params_1bit"] == R20_CONV + 64 * 5

    for args, msg in [([], "give a checkpoint"), ([str(path), "--model", "resnet20"], "brings its own model"),
                      (["--model", "resnet20", "--input-size", "3,x"], "--input-size"),
                      (["--model", "resnet20", "--quantizer", "bwn", "--bits", "2"], "1-bit only"),
                      ([str(tmp_path / "missing")], "not found")]:
        with pytest.raises(SystemExit) as info:
            main(["summary", *args])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("fsg: error: ") and err.count("\n") == 1 and msg in err, err


class OwnNet(torch.nn.Module):
    """A user's own architecture (not one of fsg's models: the export records no architecture)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, bias=False), torch.nn.BatchNorm2d(6),
                                            torch.nn.Hardtanh(), torch.nn.Conv2d(6, 5, 3, padding=1),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("quantizer, bits", [("dorefa", 1), ("bwn", 1), ("dorefa", 3)])
def test_summary_of_an_export_of_a_users_own_architecture(tmp_path, capsys, quantizer, bits):
    from conftest import cli_error, fsg_cli

    torch.manual_seed(0)
    model = fsg.binarize(OwnNet(), quantizer, bits=bits, keep_last=True, activations=True)
    path = fsg.export_model(model, tmp_path / "own.safetensors")
    from_model = summary(model, input_size=(3, 8, 8))
    s = summary(path)  # no architecture in the file: its own layer table
    key = lambda r: (r.name, r.binarized, r.quantizer, r.bits, r.params_1bit, r.params_32bit, r.memory_bytes)  # noqa
    assert [key(r) for r in s.rows] == sorted(map(key, from_model.rows))  # in name order
    assert [r.input_bits for r in s.rows if r.binarized] == [r.input_bits for r in from_model.rows if r.binarized]
    for k in ("params_1bit", "params_32bit", "params", "memory_bytes", "memory_fp_bytes", "compression"):
        assert s.totals[k] == from_model.totals[k], k
    assert s.totals["macs"] is None and all(r.macs is None for r in s.rows)

    code, out, _ = fsg_cli(capsys, "summary", str(path))
    assert code == 0 and "MACs n/a, need the architecture" in out and "features.0" in out and "compression" in out
    code, out, _ = fsg_cli(capsys, "summary", str(path), "--json")
    d = json.loads(out)
    assert d["totals"]["params_1bit"] == from_model.totals["params_1bit"] and d["totals"]["macs"] is None
    assert "need the architecture" in d["macs_note"]
    err = cli_error(capsys, "summary", str(path), "--input-size", "3,8,8")
    assert "records no built-in architecture, and MACs need it" in err
