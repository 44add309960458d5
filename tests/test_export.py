"""``fsg export`` / :mod:`fsg.io.export`: bit-packed, pickle-free export and exact reload."""

import json
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fsg
from fsg.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fsg.cli.app import main
from fsg.io.export import (ExportError, export_checkpoint, export_model, load_exported, model_spec, pack_codes,
                        read_exported, unpack_codes)
from fsg.models import MLP, SmallCNN, resnet
from fsg.quantizers import Quantizer

from conftest import cli_error, fsg_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=32", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress", "--epochs", "1", "--estimator", "ste",
        "--optimizer", "adam", "--lr", "0.01"]


def trained(arch, quantizer, activations, bits=1, steps=3):
    """A binarized model after a few STE steps (non-trivial weights and BN statistics), in eval
    mode, and a batch of inputs."""
    torch.manual_seed(0)
    act = "hardtanh" if activations else "relu"  # sign() of a ReLU output would be constant
    if arch == "small-cnn":
        model, x = SmallCNN(in_channels=2, num_classes=5, width=4, activation=act), torch.randn(6, 2, 12, 12)
        y = torch.randint(5, (6,))
    else:
        model, x = resnet(20, num_classes=10, activation=act), torch.randn(4, 3, 16, 16)
        y = torch.randint(10, (4,))
    fsg.binarize(model, quantizer, bits=bits, activations=activations)
    trainer = fsg.Trainer(model, "ste", optimizer="adam", lr=0.05)
    for _ in range(steps):
        trainer.step(x, y)
    model.eval()
    return model, x, trainer


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def read_header(path):
    """The safetensors header, read by hand: (header dict, metadata, data buffer)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__")
    return header, meta, raw[8 + n:]


def no_leftovers(directory):
    return not [p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# exact reconstruction


@pytest.mark.parametrize("arch", ["small-cnn", "resnet20"])
@pytest.mark.parametrize("quantizer", ["dorefa", "bwn", "sign"])
@pytest.mark.parametrize("activations", [False, True])
def test_reloaded_model_outputs_equal_the_trained_model(tmp_path, arch, quantizer, activations):
    model, x, trainer = trained(arch, quantizer, activations)
    ref = outputs(model, x)
    grads = [l.parametrization.grad for l in trainer.layers]
    path = export_model(model, tmp_path / "m.safetensors")
    plain = load_exported(path)
    assert not plain.training
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    assert torch.equal(outputs(plain, x), ref)
    # the exported weights are the evaluation's Ŵ, ±s exactly
    for layer in fsg.binarized_layers(model):
        w = dict(plain.named_modules())[layer.name].weight
        with torch.no_grad():
            assert torch.equal(w, layer.module.weight)
        assert torch.unique(w.abs()).numel() == 1
    # 1W1A: the sign pre-hooks are where they were
    hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert [n for n, m in plain.named_modules() if m._forward_pre_hooks] == hooked
    assert bool(hooked) == activations
    # the trained model is untouched and still trains (no parametrization removed, nothing recorded)
    assert [l.parametrization.grad for l in trainer.layers] == grads
    assert torch.equal(outputs(model, x), ref)
    model.train()
    trainer.step(x, torch.zeros(len(x), dtype=torch.long))


def test_export_keeps_the_models_training_flags(tmp_path):
    model, x, _ = trained("small-cnn", "dorefa", False, steps=1)
    model.train()
    model.bn1.eval()
    export_model(model, tmp_path / "m.safetensors")
    assert model.training and model.conv1.training and not model.bn1.training


def test_kbit_dorefa_codes_and_level_table(tmp_path):
    model, x, _ = trained("small-cnn", "dorefa", True, bits=2)
    path = export_model(model, tmp_path / "m.safetensors")
    header, meta, _ = read_header(path)
    layers = {r["name"]: r for r in json.loads(meta["layers"])}
    assert layers["conv2"]["bits"] == 2 and layers["conv2"]["encoding"] == "levels"
    n = 8 * 4 * 9
    assert header["conv2.weight.codes"]["dtype"] == "U8" and header["conv2.weight.codes"]["shape"] == [n * 2 // 8]
    assert header["conv2.weight.levels"]["shape"][0] <= 4
    assert torch.equal(outputs(load_exported(path), x), outputs(model, x))


def test_keep_first_and_last_are_stored_in_full_precision(tmp_path):
    torch.manual_seed(0)
    model = fsg.binarize(SmallCNN(num_classes=3), "bwn", keep_first=True, keep_last=True)
    path = export_model(model, tmp_path / "m.safetensors")
    header, meta, _ = read_header(path)
    assert [r["name"] for r in json.loads(meta["layers"])] == ["conv2"]
    assert header["conv1.weight"]["dtype"] == "F32" and header["fc.weight"]["dtype"] == "F32"
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(outputs(load_exported(path), x), outputs(model, x))


# ----------------------------------------------------------------------------------------------
# the file


def test_file_layout_packing_and_metadata(tmp_path):
    model, _, _ = trained("resnet20", "bwn", True, steps=1)
    path = export_model(model, tmp_path / "r20.safetensors")
    raw = path.read_bytes()
    assert raw[:2] != b"PK" and b"\x80\x02" not in raw[:16]
    header, meta, buffer = read_header(path)
    # 1 bit per binarized weight: a 64x64x3x3 conv is 36864 weights -> 4608 bytes, 1/32 of float32
    entry = header["layer3.1.conv1.weight.bits"]
    assert entry["dtype"] == "U8" and entry["shape"] == [4608]
    begin, end = entry["data_offsets"]
    assert end - begin == 36864 * 4 // 32
    assert header["layer3.1.conv1.weight.scale"] == {"dtype": "F32", "shape": [],
                                                     "data_offsets": header["layer3.1.conv1.weight.scale"]["data_offsets"]}
    assert "layer3.1.conv1.weight" not in header
    # bit i of the little-endian stream is +s for a positive weight
    with torch.no_grad():
        w = model.layer3[1].conv1.weight.reshape(-1)
    bits = np.unpackbits(np.frombuffer(buffer[begin:end], np.uint8), bitorder="little")
    assert np.array_equal(bits.astype(bool), (w > 0).numpy())
    b, e = header["layer3.1.conv1.weight.scale"]["data_offsets"]
    assert struct.unpack("<f", buffer[b:e])[0] == w.abs()[0].item()
    # float tensors in full precision, the ranges tile the buffer
    assert header["bn1.running_var"]["dtype"] == "F32" and header["bn1.num_batches_tracked"]["dtype"] == "I64"
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(buffer)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # the whole binary part is ~1/32 of the float32 weights
    n = sum(math.prod(r["shape"]) for r in json.loads(meta["layers"]))
    packed = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.endswith(".bits"))
    assert packed == sum((math.prod(r["shape"]) + 7) // 8 for r in json.loads(meta["layers"]))
    assert abs(packed / (4 * n) - 1 / 32) < 1e-3
    assert meta["format"] == "fsg-binary" and meta["format_version"] == "1" and meta["bit_order"] == "little"
    assert json.loads(meta["arch"]) == {"name": "resnet20", "kwargs": {"num_classes": 10, "activation": "hardtanh"}}
    layers = json.loads(meta["layers"])
    assert len(layers) == 22 and layers[0]["name"] == "conv1" and layers[0]["activations"] is False
    assert layers[1] == {"name": "layer1.0.conv1", "shape": [16, 16, 3, 3], "quantizer": "bwn", "bits": 1,
                         "activations": True, "encoding": "binary", "dtype": "F32",
                         "tensors": {"bits": "layer1.0.conv1.weight.bits", "scale": "layer1.0.conv1.weight.scale"}}
    assert json.loads(meta["binary_activations"]) == [r["name"] for r in layers[1:]]


def test_loading_unpickles_nothing(tmp_path, monkeypatch):
    model, x, _ = trained("small-cnn", "sign", False, steps=1)
    path = export_model(model, tmp_path / "m.safetensors")

    def refuse(*a, **k):
        raise AssertionError("no unpickling allowed")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert torch.equal(outputs(load_exported(path), x), outputs(model, x))


def test_safetensors_package_reads_our_file(tmp_path):
    st = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    model, _, _ = trained("small-cnn", "dorefa", True, steps=1)
    path = export_model(model, tmp_path / "m.safetensors")
    theirs = load_file(str(path))
    ours = read_exported(path).tensors
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    with st.safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "fsg-binary"


def test_pack_codes_is_numpy_packbits_little_and_round_trips():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(1001, generator=g) > 0.5
    assert np.array_equal(pack_codes(bits).numpy(), np.packbits(bits.numpy(), bitorder="little"))
    assert torch.equal(unpack_codes(pack_codes(bits), 1001), bits.long())
    codes = torch.randint(8, (333,), generator=g)
    packed = pack_codes(codes, 3)
    assert packed.numel() == (333 * 3 + 7) // 8
    assert torch.equal(unpack_codes(packed, 333, 3), codes)
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]


def test_user_supplied_architecture(tmp_path):
    torch.manual_seed(0)
    mlp = fsg.binarize(MLP(6, [8], 3, activation="hardtanh"), "bwn", activations=True)
    assert model_spec(mlp) is None
    x = torch.randn(4, 6)
    path = export_model(mlp, tmp_path / "mlp.safetensors")
    with pytest.raises(ExportError, match="records no built-in architecture"):
        load_exported(path)
    plain = load_exported(path, model=MLP(6, [8], 3, activation="hardtanh"))
    assert torch.equal(outputs(plain, x), outputs(mlp, x))
    with pytest.raises(ExportError, match="does not fit MLP: .*shape mismatch"):
        load_exported(path, model=MLP(6, [9], 3))
    with pytest.raises(ExportError, match="parametrizations"):
        load_exported(path, model=fsg.binarize(MLP(6, [8], 3)))


# ----------------------------------------------------------------------------------------------
# errors: one line, nothing written


class _Identity(Quantizer):
    name = "identity"

    def quantize(self, wt):
        return wt


def test_non_binary_layer_is_refused_and_nothing_is_written(tmp_path):
    torch.manual_seed(0)
    model = fsg.binarize(SmallCNN(), "sign", keep_last=True)
    fsg.binarize(nn.Sequential(model.fc), _Identity())  # fc gets a quantizer that is not binary
    out = tmp_path / "m.safetensors"
    with pytest.raises(ExportError) as info:
        export_model(model, out)
    msg = str(info.value)
    assert "\n" not in msg and "'fc'" in msg and "not binary" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # a previous file at the destination is left as it was
    out.write_bytes(b"old")
    with pytest.raises(ExportError):
        export_model(model, out)
    assert out.read_bytes() == b"old" and no_leftovers(tmp_path)


def test_kbit_layer_with_too_many_levels_is_refused(tmp_path):
    class TwoBitIdentity(_Identity):
        bits = 2

    model = fsg.binarize(MLP(4, [], 2), TwoBitIdentity())
    with pytest.raises(ExportError, match="is not 2-bit: .* distinct values, more than 2\\^2"):
        export_model(model, tmp_path / "m.safetensors")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    model, x, _ = trained("small-cnn", "dorefa", False, steps=1)
    return export_model(model, d / "m.safetensors"), model, x


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[: len(raw) - 10], "truncated"),
    (lambda raw: raw[:100], "truncated"),
    (lambda raw: raw[:5], "truncated"),
    (lambda raw: raw + b"\0\0", "bytes after the last tensor"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum"),
    (lambda raw: raw[:8] + b"#" + raw[9:], "bad header"),
    (lambda raw: b"", "truncated"),
    (lambda raw: b"\xff" * 64, "not an exported model"),
])
def test_damaged_files_give_one_line_errors(tmp_path, exported, damage, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(exported[0].read_bytes()))
    with pytest.raises(ExportError) as info:
        load_exported(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_foreign_files(tmp_path, exported):
    from fsg.io.export import write_safetensors

    other = write_safetensors(tmp_path / "other.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
    with pytest.raises(ExportError, match="not an fsg export"):
        load_exported(other)
    torch.save({"a": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(ExportError, match="PyTorch zip file"):
        load_exported(tmp_path / "x.pt")
    with pytest.raises(ExportError, match="not found"):
        load_exported(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# from training checkpoints and the command line


def eval_model_and_data(run):
    """The model and test batches exactly as ``fsg eval`` builds them (run.evaluate)."""
    from fsg.train.config import TrainConfig
    from fsg.train.build import build_data, build_model

    ckpt = load_checkpoint(run / "last.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    ds, loader = build_data(cfg, splits=("test",))["test"]
    model = build_model(cfg, ds, pretrained=False)
    model.load_state_dict(ckpt["trainer"]["model"])
    return model, loader


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    torch.set_num_threads(1)
    assert main(["train", *TINY, "--quantizer", "bwn", "--activations", "--out", str(run)]) == 0
    return run


def test_cli_round_trip_equals_fsg_eval(tmp_path, capsys, run_dir):
    out = tmp_path / "model.safetensors"
    code, stdout, _ = fsg_cli(capsys, "export", str(run_dir), str(out), "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["output"] == str(out) and info["binarized_layers"] == 3
    model, loader = eval_model_and_data(run_dir)
    assert info["arch"]["name"] == "small-cnn" and info["arch"] == model_spec(model)
    assert {k: info["arch"]["kwargs"][k] for k in ("in_channels", "num_classes", "width")} == \
        {"in_channels": 1, "num_classes": 4, "width": 4}
    assert info["packed_bytes"] == sum((n + 7) // 8 for n in (4 * 9, 8 * 4 * 9, 4 * 8)) + 3 * 4
    assert info["source"]["step"] == 2 and info["source"]["quantizer"] == "bwn"

    plain = load_exported(out)
    for x, _ in loader:
        assert torch.equal(outputs(plain, x), outputs(model, x))
    code, stdout, _ = fsg_cli(capsys, "eval", str(run_dir), "--json")
    loss, acc = fsg.evaluate(plain, loader)
    assert json.loads(stdout)["loss"] == loss and json.loads(stdout)["accuracy"] == acc

    code, stdout, _ = fsg_cli(capsys, "export", str(run_dir / "last.pt"), str(tmp_path / "b.safetensors"))
    assert code == 0 and stdout.startswith(f"wrote {tmp_path / 'b.safetensors'}") and "3 binarized layers" in stdout
    assert read_exported(tmp_path / "b.safetensors").tensors.keys() == read_exported(out).tensors.keys()


def test_checkpoint_without_model_spec_is_inferred_from_shapes(tmp_path, run_dir):
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["model_spec"] == model_spec(eval_model_and_data(run_dir)[0])
    del ckpt["model_spec"]
    save_checkpoint(tmp_path / "old.pt", ckpt)
    a = export_checkpoint(tmp_path / "old.pt", tmp_path / "a.safetensors")
    b = export_checkpoint(run_dir, tmp_path / "b.safetensors")
    ea, eb = read_exported(a), read_exported(b)
    assert ea.arch == eb.arch and ea.layers == eb.layers
    assert all(torch.equal(ea.tensors[k], eb.tensors[k]) for k in eb.tensors)


def test_cli_errors_leave_no_output(tmp_path, capsys, run_dir):
    out = tmp_path / "o.safetensors"
    err = cli_error(capsys, "export", str(tmp_path / "nope"), str(out))
    assert "checkpoint not found" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run_dir / "last.pt").read_bytes()[:3000])
    err = cli_error(capsys, "export", str(bad), str(out))
    assert "truncated or corrupted" in err
    err = cli_error(capsys, "export", str(run_dir), str(tmp_path))
    assert "is a directory" in err
    err = cli_error(capsys, "export", str(run_dir), str(run_dir / "last.pt"))
    assert "the checkpoint itself" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]
    with pytest.raises(CheckpointError):
        export_checkpoint(bad, out)


# ----------------------------------------------------------------------------------------------
# files written before (by the exporter's own byte-level writer)

OLD_FILES = Path(__file__).parent / "data" / "export-v1"


@pytest.mark.parametrize("name,bits", [("old-1w1a", 1), ("old-2bit", 2)])
def test_files_written_by_the_old_exporter_still_load(name, bits):
    from safetensors.torch import load_file

    expected = load_file(str(OLD_FILES / f"{name}.expected.safetensors"))
    out = expected.pop("__output__")
    exp = read_exported(OLD_FILES / f"{name}.safetensors")
    assert exp.metadata["format"] == "fsg-binary" and "data_sha256" in exp.metadata
    assert {r["bits"] for r in exp.layers} == {bits}
    model = load_exported(OLD_FILES / f"{name}.safetensors")
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    torch.manual_seed(0)
    assert torch.equal(outputs(model, torch.randn(2, 1, 8, 8)), out)


def test_old_file_damaged_gives_one_line_errors(tmp_path):
    raw = (OLD_FILES / "old-1w1a.safetensors").read_bytes()
    for damage, message in [(raw[:-1] + bytes([raw[-1] ^ 4]), "checksum"), (raw[:-3], "truncated"),
                            (raw + b"x", "bytes after the last tensor")]:
        (tmp_path / "d.safetensors").write_bytes(damage)
        with pytest.raises(ExportError) as info:
            load_exported(tmp_path / "d.safetensors")
        assert message in str(info.value) and "\n" not in str(info.value)


def test_written_with_the_safetensors_package(tmp_path, monkeypatch):
    """export_model writes through safetensors.torch.save, read_exported reads through
    safetensors.torch.load; the checksum covers the data buffer the package wrote."""
    import hashlib

    import safetensors.torch

    calls = []
    for fn in ("save", "load"):
        real = getattr(safetensors.torch, fn)
        monkeypatch.setattr(safetensors.torch, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    model, x, _ = trained("small-cnn", "dorefa", False, steps=1)
    path = export_model(model, tmp_path / "m.safetensors")
    assert "save" in calls and "load" not in calls
    assert torch.equal(outputs(load_exported(path), x), outputs(model, x))
    assert "load" in calls
    _, meta, buffer = read_header(path)
    assert meta["data_sha256"] == hashlib.sha256(buffer).hexdigest()
    with pytest.raises(ExportError, match="metadata must map strings to strings"):
        fsg.io.export.write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(1)}, {"a": 1})
    with pytest.raises(ExportError, match="cannot hold"):
        fsg.io.export.write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(1, dtype=torch.complex64)})
