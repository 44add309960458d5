"""bf16 autocast of the main network (Trainer(autocast_dtype=...), TrainConfig.amp, --amp), on the
CPU: torch.autocast("cpu", torch.bfloat16) runs the convolutions and linear layers in bfloat16
here exactly as on a GPU; the hypernetworks, the captured ∂L/∂Ŵ and the optimizers stay float32."""

import json
import math

import pytest
import torch
from torch import nn

import fsg
from fsg.train.config import TrainConfig, amp_dtype
from fsg.models import SmallCNN
from fsg.train.build import FullPrecisionTrainer
from fsg.train.loop import train
from fsg.data.synthetic import batches, make_synthetic

from conftest import cli_error, fsg_cli

pytestmark = pytest.mark.usefixtures("one_thread")

ESTIMATORS = {"ste": {}, "multifc": {"hidden": 8},
              "fsg": {"expand": 4, "fast_hidden": 8, "d_state": 4, "d_conv": 4}}


def _batch():
    train_set, _ = make_synthetic(n_train=64, n_test=8, size=12, num_classes=4, seed=1)
    return next(iter(batches(train_set, 32, shuffle=False)))


def _trainer(estimator, dtype):
    torch.manual_seed(0)
    model = fsg.binarize(SmallCNN(num_classes=4, width=4), "dorefa")
    return fsg.Trainer(model, estimator, optimizer="sgd", lr=0.05, autocast_dtype=dtype, **ESTIMATORS[estimator])


def _record_matmul_dtypes(model):
    """Output dtypes of every conv/linear forward, appended to the returned list."""
    seen = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_bf16_autocast_steps_are_finite_close_to_float32_and_keep_float32_state(estimator):
    x, y = _batch()
    ref = _trainer(estimator, None)
    ref_seen = _record_matmul_dtypes(ref.model)
    ref_losses = [ref.step(x, y).loss for _ in range(4)]
    assert set(ref_seen) == {torch.float32}  # the default: no autocast at all

    tr = _trainer(estimator, torch.bfloat16)
    seen = _record_matmul_dtypes(tr.model)
    losses = []
    for step in range(4):  # observe step, then look-ahead (meta) steps for multifc/fsg
        seen.clear()
        losses.append(tr.step(x, y).loss)
        # the network's forward (plain or look-ahead) ran in bfloat16 ...
        assert seen and set(seen) == {torch.bfloat16}, (step, seen)
        # ... while ∂L/∂Ŵ, W̃, the latent weights, their update and every hypernetwork stay float32
        for layer in tr.layers:
            assert layer.parametrization.grad.dtype == torch.float32
            assert layer.parametrization.w_tilde.dtype == torch.float32
            assert layer.latent.dtype == torch.float32
            if layer.latent.grad is not None:
                assert layer.latent.grad.dtype == torch.float32
        for p in tr.estimator.parameters():
            assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
        for state in tr.optimizer.state.values():
            for v in state.values():
                assert not torch.is_tensor(v) or v.dtype == torch.float32
    assert all(math.isfinite(v) for v in losses)
    # the same weights at step 0: only the bf16 rounding differs
    assert losses[0] == pytest.approx(ref_losses[0], rel=2e-2)
    assert losses[0] != ref_losses[0]  # autocast did change the arithmetic
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=0.1)
    if estimator != "ste":  # the hypernetworks learned from the bf16 look-ahead forward
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.estimator.parameters())


def test_float16_is_refused_with_one_line():
    model = fsg.binarize(SmallCNN(num_classes=4, width=4), "dorefa")
    with pytest.raises(ValueError, match="float16 needs loss scaling.*use torch.bfloat16"):
        fsg.Trainer(model, "ste", autocast_dtype=torch.float16)
    with pytest.raises(ValueError, match="autocast_dtype must be None or torch.bfloat16"):
        fsg.Trainer(model, "ste", autocast_dtype=torch.float64)
    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        FullPrecisionTrainer(SmallCNN(), autocast_dtype=torch.float16)
    assert amp_dtype(None) is None and amp_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="^amp fp16 needs loss scaling, which fsg does not do; use bf16$"):
        TrainConfig(amp="fp16").validate()
    with pytest.raises(ValueError, match="amp must be one of bf16, fp16"):
        TrainConfig(amp="int8").validate()


TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=32", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress", "--log-every", "1"]


def test_cli_amp_flag_trains_records_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(capsys, "train", *TINY, "--amp", "fp16", "--out", str(out))
    assert "fp16 needs loss scaling" in err and "use bf16" in err and not out.exists()
    code, _, _ = fsg_cli(capsys, "train", *TINY, "--estimator", "multifc", "--hidden", "8", "--amp", "bf16",
                         "--epochs", "1", "--out", str(out))
    assert code == 0
    assert json.loads((out / "config.json").read_text())["amp"] == "bf16"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "step")
    # amp is part of the optimisation: a resume cannot change it, but continues with it
    err = cli_error(capsys, "train", "--resume", str(out), "--amp", "none", "--epochs", "2")
    assert "cannot change amp" in err
    code, _, _ = fsg_cli(capsys, "train", "--resume", str(out), "--epochs", "2", "--no-progress")
    assert code == 0


def test_pretrain_with_amp(tmp_path):
    cfg = TrainConfig(model="small-cnn", width=4, dataset="synthetic", full_precision=True, amp="bf16",
                      dataset_options=dict(n_train=32, n_test=16, size=8, num_classes=4), optimizer="sgdm",
                      lr=0.05, epochs=1, batch_size=16, out=str(tmp_path / "fp"), num_threads=1)
    res = train(cfg, progress=False, log=lambda m: None)
    assert res.steps == 2 and all(math.isfinite(v) for v in res.losses)
    assert all(p.dtype == torch.float32 for p in torch.load(tmp_path / "fp" / "model.pt").values()
               if p.is_floating_point())
