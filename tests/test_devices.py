"""Devices: clear errors for unusable --device values, checkpoints that move between devices, and
(marked ``cuda``, skipped without a GPU) the real CUDA paths: device-resident data, bf16 autocast,
a CUDA → CPU → CUDA resume."""

import math
import warnings

import pytest
import torch

import fsg
import fsg.train.checkpoint
from fsg.train.checkpoint import load_checkpoint
from fsg.train.config import TrainConfig, parse_device, require_device
from fsg.data import DataLoader, ImageDataset
from fsg.models import SmallCNN
from fsg.train.loop import train
from fsg.data.synthetic import batches, make_synthetic

from conftest import cli_error

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.cuda.is_available()

TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=32", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress"]


# ----------------------------------------------------------------------------------------------
# clear device errors


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu") and parse_device("cuda:1") == torch.device("cuda", 1)
    for bad in ("foo", "cuda:x", "", "cpu cuda", 3):
        with pytest.raises(ValueError, match=r"is not a torch device \(e\.g\. cpu, cuda, cuda:1\)$"):
            parse_device(bad)
    with pytest.raises(ValueError, match="^device 'foo' is not a torch device"):
        TrainConfig(device="foo").validate()
    TrainConfig(device="cuda:3").validate()  # well-formed: whether it exists is checked at run start


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without a CUDA GPU")
def test_require_device_without_cuda():
    assert require_device("cpu") == torch.device("cpu")
    for dev in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError) as info:
            require_device(dev)
        msg = str(info.value)
        assert msg.startswith(f"--device {dev}: no CUDA GPU is visible to PyTorch (torch {torch.__version__}")
        assert msg.endswith("; use --device cpu") and "\n" not in msg


def test_require_device_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert require_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device cuda:2: PyTorch sees 2 CUDA GPUs \(cuda:0 to cuda:1\); use one "
                                         r"of them or --device cpu$"):
        require_device("cuda:2")


@pytest.mark.parametrize("device, fragment", [("foo", "device 'foo' is not a torch device (e.g. cpu, cuda, cuda:1)"),
                                              ("cuda:x", "is not a torch device")]
                         + ([] if CUDA else [("cuda", "--device cuda: no CUDA GPU is visible to PyTorch"),
                                             ("cuda:1", "--device cuda:1: no CUDA GPU is visible")]))
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_cli_bad_device_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, device, fragment, command):
    out = tmp_path / "run"
    err = cli_error(capsys, command, *TINY, "--device", device, "--out", str(out))
    assert fragment in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, fragment", [("foo", "device 'foo' is not a torch device")]
                         + ([] if CUDA else [("cuda", "--device cuda: no CUDA GPU is visible to PyTorch")]))
def test_grid_bad_device_is_one_line_and_writes_nothing(tmp_path, capsys, device, fragment):
    out = tmp_path / "grid"
    err = cli_error(capsys, "grid", *TINY, "--estimators", "ste", "--device", device, "--out", str(out))
    assert fragment in err and not out.exists()


def test_eval_and_resume_need_a_usable_device(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(model="small-cnn", width=4, dataset="synthetic", estimator="ste",
                      dataset_options=dict(n_train=32, n_test=16, size=8, num_classes=4), epochs=1, batch_size=16,
                      out=str(out), num_threads=1), progress=False, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = cli_error(capsys, "eval", str(out), "--device", "foo")
    assert "device 'foo' is not a torch device" in err
    err = cli_error(capsys, "train", "--resume", str(out), "--device", "bar", "--epochs", "2")
    assert "device 'bar' is not a torch device" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----------------------------------------------------------------------------------------------
# checkpoints across devices


from conftest import tensor_leaves as _tensors  # noqa: E402


@pytest.mark.parametrize("estimator, optimizer, options", [
    ("multifc", "sgdm", {"hidden": 8}),
    ("fsg", "adam", {"expand": 4, "fast_hidden": 8, "d_state": 4, "d_conv": 4}),
    ("fsg", "sgdm", {"expand": 4, "fast_hidden": 8, "d_state": 4, "d_conv": 4, "layout": "stream"}),
    ("lstmfc", "adam", {"hidden": 4}),
])
def test_trainer_state_loads_onto_the_trainers_device(estimator, optimizer, options):
    """A state written on one device (here: the CPU) loaded by a trainer on another (here: "meta",
    which needs no hardware): every tensor — model, hypernetworks and their carried state,
    optimizer moments, the applied directions, the recorded ∂L/∂Ŵ and W̃, the .grad — ends up on
    the trainer's device. (torch keeps Adam's scalar ``step`` counters on the CPU, as it does for
    a CUDA model.)"""
    train_set, _ = make_synthetic(n_train=32, n_test=8, size=12, num_classes=4)
    x, y = next(iter(batches(train_set, 16)))

    def make(device):
        torch.manual_seed(0)
        model = fsg.binarize(SmallCNN(num_classes=4, width=4), "dorefa").to(device)
        return fsg.Trainer(model, estimator, optimizer=optimizer, lr=0.01, **options)

    src = make("cpu")
    for _ in range(3):
        src.step(x, y)
    state = src.state_dict()
    assert state["applied"] and state["optimizer"]["state"]
    dst = make("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op"
        dst.load_state_dict(state)
    moved = dict(_tensors(dst.state_dict()))
    assert any(".applied." in k for k in moved) and any(".recorded." in k for k in moved)
    assert any(k.startswith("state.optimizer.state.") and not k.endswith(".step") for k in moved)
    left = [k for k, t in moved.items() if t.device.type != "meta" and not k.endswith(".step")]
    assert left == []
    assert all(moved[k].device.type == "cpu" and moved[k].dim() == 0 for k in moved if k.endswith(".step"))


def test_resume_reads_the_checkpoint_onto_the_cpu_first(tmp_path, monkeypatch):
    """A checkpoint is read with ``map_location="cpu"`` (so one written on a GPU opens on a machine
    without one); the trainer then moves what it loads to the run's device."""
    cfg = TrainConfig(model="small-cnn", width=4, dataset="synthetic", estimator="multifc",
                      estimator_options={"hidden": 8}, optimizer="sgdm",
                      dataset_options=dict(n_train=32, n_test=16, size=8, num_classes=4), epochs=1, batch_size=16,
                      out=str(tmp_path / "run"), num_threads=1)
    train(cfg, progress=False, log=lambda m: None)
    seen = []
    real_load = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(fsg.train.checkpoint.torch, "load", load)
    res = train(cfg.replace(epochs=2), resume=tmp_path / "run" / "last.pt", progress=False, log=lambda m: None)
    assert res.epochs == 2 and seen and all(m == "cpu" for m in seen)


# ----------------------------------------------------------------------------------------------
# on a CUDA GPU


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_loader_batches_equal_the_cpu_loader():
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(70) % 10,
                      [str(i) for i in range(10)], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    for train_ in (True, False):
        cpu = DataLoader(ds, 16, train=train_, seed=4)
        gpu = DataLoader(ds, 16, train=train_, seed=4, device="cuda")
        assert gpu.resident
        for _ in range(2):
            for (a, ya), (b, yb) in zip(cpu, gpu):
                assert b.is_cuda and yb.is_cuda
                assert torch.equal(ya, yb.cpu())
                torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-6)  # same crop/flip; normalise on the GPU
    assert gpu._resident_cache[2].is_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("estimator", ["ste", "multifc", "fsg"])
def test_cuda_bf16_autocast_steps(estimator):
    train_set, _ = make_synthetic(n_train=64, n_test=8, size=12, num_classes=4)
    x, y = (t.cuda() for t in next(iter(batches(train_set, 32))))
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = fsg.binarize(SmallCNN(num_classes=4, width=8), "dorefa").cuda()
        tr = fsg.Trainer(model, estimator, optimizer="sgd", lr=0.05, autocast_dtype=dtype)
        losses[dtype] = [tr.step(x, y).loss for _ in range(4)]
        assert all(l.parametrization.grad.dtype == torch.float32 and l.parametrization.grad.is_cuda
                   for l in tr.layers)
    assert all(math.isfinite(v) for v in losses[torch.bfloat16])
    assert losses[torch.bfloat16][0] == pytest.approx(losses[None][0], rel=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("estimator", ["multifc", "fsg"])
def test_cuda_cpu_cuda_resume_round_trip(tmp_path, estimator):
    opts = {"multifc": {"hidden": 8}, "fsg": {"expand": 4, "fast_hidden": 8, "d_state": 4, "d_conv": 4}}[estimator]
    cfg = TrainConfig(model="small-cnn", width=4, dataset="synthetic", estimator=estimator, estimator_options=opts,
                      optimizer="adam", lr=0.01, dataset_options=dict(n_train=64, n_test=16, size=8, num_classes=4),
                      epochs=1, batch_size=16, out=str(tmp_path / "run"), num_threads=1, device="cuda")
    quiet = dict(progress=False, log=lambda m: None)
    train(cfg, **quiet)                                                  # 4 steps on the GPU
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(t.device.type == "cpu" for _, t in _tensors(ck["trainer"]))  # read onto the CPU
    last = tmp_path / "run" / "last.pt"
    mid = train(cfg.replace(epochs=2, device="cpu"), resume=last, **quiet)      # 4 more on the CPU
    assert mid.steps == 8 and math.isfinite(mid.test_loss)
    res = train(cfg.replace(epochs=3, device="cuda"), resume=last, **quiet)     # and back
    assert res.epochs == 3 and res.steps == 12 and math.isfinite(res.test_loss)
    assert all(math.isfinite(v) for v in mid.losses + res.losses)
