"""Non-finite steps: a NaN batch under nonfinite="raise" and "skip" leaves the trainer exactly as
it was (weights, hypernetworks, FSG's history and carried stream states, optimizer states,
BatchNorm statistics), and a skipped run continues exactly like a run that never saw the batch."""

import io

import pytest
import torch

import fsg
from fsg.models import SmallCNN
from fsg.trainer import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")

ESTIMATORS = {
    "ste": ("ste", {}),
    "multifc": ("multifc", dict(hidden=8)),
    "fsg-flat": ("fsg", dict(expand=4, fast_hidden=8, d_state=4, d_conv=4)),
    "fsg-stream": ("fsg", dict(layout="stream", expand=4, fast_hidden=8, d_state=4, d_conv=4)),
}

g = torch.Generator().manual_seed(0)
X = torch.randn(8, 16, 1, 8, 8, generator=g)
Y = torch.randint(0, 4, (8, 16), generator=g)
BAD = X[0].clone()
BAD[3, 0, 2, 5] = float("nan")  # one NaN pixel


def build(name, optimizer="sgdm", **kw):
    est, opts = ESTIMATORS[name]
    torch.manual_seed(0)
    model = fsg.binarize(SmallCNN(in_channels=1, num_classes=4, width=4), "dorefa")
    return fsg.Trainer(model, est, optimizer=optimizer, lr=0.05, **kw, **opts)


def frozen(trainer):
    """A deep copy of everything the trainer's next step depends on (through torch.save)."""
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a, b, path="state", skip=("skipped",)):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.nan_to_num(), b.nan_to_num())), f"{path} differs"
    elif isinstance(a, dict):
        ka, kb = set(a) - set(skip), set(b) - set(skip)
        assert ka == kb, f"{path}: keys {sorted(map(str, ka ^ kb))}"
        for k in ka:
            assert_same(a[k], b[k], f"{path}[{k!r}]", skip=())
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]", skip=())
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_finite(state, path="state"):
    if isinstance(state, torch.Tensor):
        assert not state.is_floating_point() or bool(state.isfinite().all()), f"{path} is not finite"
    elif isinstance(state, dict):
        for k, v in state.items():
            assert_finite(v, f"{path}[{k!r}]")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            assert_finite(v, f"{path}[{i}]")


@pytest.mark.parametrize("at", [0, 3])  # the observe step 0 of look-ahead estimators, and a meta step
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_nan_batch_raises_before_anything_is_updated(name, at):
    t = build(name)
    for i in range(at):
        t.step(X[i], Y[i])
    before = frozen(t)
    with pytest.raises(NonFiniteError) as info:
        t.step(BAD, Y[0])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"step {at + 1}: non-finite loss nan") and info.value.step == at + 1
    assert isinstance(info.value, RuntimeError)
    assert t.step_count == at and t.skipped == 0
    after = frozen(t)
    assert_same(before, after, skip=())  # weights, BN statistics, hypernetworks, HGS, stream states, optimizers
    assert_finite(after)
    if name == "fsg-stream" and at:
        assert any(s is not None for s in after["estimator"]["_extra_state"]["stream"])


@pytest.mark.parametrize("at", [0, 3])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_skipped_nan_batch_continues_like_a_run_without_it(name, at):
    ref = build(name)
    ref_losses = [ref.step(X[i], Y[i]).loss for i in range(6)]

    t = build(name, nonfinite="skip")
    losses = [t.step(X[i], Y[i]).loss for i in range(at)]
    before = frozen(t)
    r = t.step(BAD, Y[0])
    assert r.skipped and r.loss != r.loss and r.step == at
    assert r.nonfinite.startswith(f"step {at + 1}: non-finite loss nan") and "skipped (1 in a row, 1 in all)" in r.nonfinite
    assert (t.step_count, t.skipped, t.skipped_in_a_row) == (at, 1, 1)
    assert_same(before, frozen(t))  # bit for bit what it was (but the skip counters)
    losses += [t.step(X[i], Y[i]).loss for i in range(at, 6)]
    assert losses == ref_losses
    assert t.skipped_in_a_row == 0 and t.skipped == 1
    assert_same(frozen(ref), frozen(t))
    assert frozen(t)["skipped"] == {"total": 1, "in_a_row": 0}


def test_max_skips_counts_skips_in_a_row():
    t = build("multifc", nonfinite="skip", max_skips=2)
    t.step(X[0], Y[0])
    assert t.step(BAD, Y[0]).skipped and t.step(BAD, Y[0]).skipped
    assert not t.step(X[1], Y[1]).skipped  # a clean step resets the count
    assert t.step(BAD, Y[0]).skipped and t.step(BAD, Y[0]).skipped
    before = frozen(t)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row skipped, more than max_skips=2"):
        t.step(BAD, Y[0])
    assert_same(before, frozen(t))
    assert t.skipped == 5 and t.step_count == 2


def test_an_infinite_gradient_with_a_finite_loss_is_caught():
    """A finite loss whose backward overflows: the gradients are checked, not only the loss."""
    t = build("ste")
    t.step(X[0], Y[0])
    before = frozen(t)
    h = t.model.fc.register_full_backward_hook(lambda m, gi, go: (gi[0] * float("inf"),))
    try:
        with pytest.raises(NonFiniteError, match=r"^step 2: non-finite gradient of") as info:
            t.step(X[1], Y[1])
    finally:
        h.remove()
    assert "loss" not in str(info.value).split(";")[0]
    assert_same(before, frozen(t), skip=())


def test_options_are_checked():
    with pytest.raises(ValueError, match="nonfinite must be one of raise, skip"):
        build("ste", nonfinite="ignore")
    with pytest.raises(ValueError, match="max_skips must be an integer >= 0"):
        build("ste", max_skips=-1)


def test_skip_restores_a_16_bit_stream_state_updated_in_place():
    ref = build("fsg-stream", state_dtype="bfloat16")
    ref_losses = [ref.step(X[i], Y[i]).loss for i in range(5)]
    t = build("fsg-stream", nonfinite="skip", state_dtype="bfloat16")
    losses = [t.step(X[i], Y[i]).loss for i in range(3)]
    before = frozen(t)
    assert t.step(BAD, Y[0]).skipped
    assert_same(before, frozen(t))
    losses += [t.step(X[i], Y[i]).loss for i in range(3, 5)]
    assert losses == ref_losses
    assert_same(frozen(ref), frozen(t))


# ----------------------------------------------------------------------------------------------
# fsg train --nonfinite raise|skip, and no checkpoint of non-finite state

from fsg.train.checkpoint import load_checkpoint  # noqa: E402

from conftest import fsg_cli  # noqa: E402

TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=48", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress", "--log-every", "1", "--epochs", "2",
        "--estimator", "multifc", "--hidden", "8"]


def poison_batch(monkeypatch, n):
    """Put a NaN pixel into the ``n``-th training batch fetched (counted over every epoch)."""
    import fsg.data

    original = fsg.data.DataLoader.__iter__
    fetched = {"n": 0}

    def iterate(self):
        for x, y in original(self):
            if self.train:
                fetched["n"] += 1
                if fetched["n"] == n:
                    x = x.clone()
                    x[0, 0, 0, 0] = float("nan")
            yield x, y

    monkeypatch.setattr(fsg.data.DataLoader, "__iter__", iterate)


def test_train_stops_on_a_nan_batch_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    poison_batch(monkeypatch, 5)  # epoch 2, its second step (3 steps per epoch)
    code, _, err = fsg_cli(capsys, "train", *TINY, "--out", str(out))
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("fsg: error")]
    assert len(lines) == 1, err
    assert lines[0].startswith("fsg: error: step 5: non-finite loss nan, gradient of")
    assert f"the last checkpoint {out / 'last.pt'} (step 3) is kept" in lines[0]
    assert f"fsg train --resume {out / 'last.pt'} --nonfinite skip" in lines[0]
    before = (out / "last.pt").read_bytes()
    ck = load_checkpoint(out / "last.pt")
    assert (ck["step"], ck["epoch"]) == (3, 1)

    # resumed with --nonfinite skip (the same batch is poisoned again): the step is skipped
    poison_batch(monkeypatch, 2)
    code, _, err = fsg_cli(capsys, "train", "--resume", str(out), "--nonfinite", "skip", "--no-progress")
    assert code == 0, err
    assert "fsg: step 5: non-finite loss nan" in err and "skipped (1 in a row, 1 in all)" in err
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 5 and ck["config"]["nonfinite"] == "skip" and ck["trainer"]["skipped"]["total"] == 1
    rows = [r for r in fsg.train.metrics.MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r.get("skipped") for r in rows] == [None, 1]
    assert before != (out / "last.pt").read_bytes()


def test_train_skip_goes_on_and_max_skips_stops(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    poison_batch(monkeypatch, 2)
    code, out_json, err = fsg_cli(capsys, "train", *TINY, "--out", str(out), "--nonfinite", "skip", "--json")
    assert code == 0
    import json

    assert json.loads(out_json)["steps"] == 5 and err.count("skipped (1 in a row") == 1
    steps = [r["step"] for r in fsg.train.metrics.MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5]

    out2 = tmp_path / "run2"
    poison_batch(monkeypatch, 1)
    code, _, err = fsg_cli(capsys, "train", *TINY, "--out", str(out2), "--nonfinite", "skip", "--max-skips", "0")
    assert code == 2 and "more than max_skips=0" in err and "no checkpoint was written" in err
    assert not (out2 / "last.pt").exists()


def test_no_checkpoint_of_non_finite_state(tmp_path, capsys, monkeypatch):
    """Whatever put a NaN into the weights (here: written behind the trainer's back), it is not saved."""
    out = tmp_path / "run"
    original = fsg.Trainer.step

    def step(self, x, y):
        r = original(self, x, y)
        if self.step_count == 3:  # the last step of epoch 1, then its checkpoint
            with torch.no_grad():
                self.model.fc.bias[0] = float("inf")
        return r

    monkeypatch.setattr(fsg.Trainer, "step", step)
    code, _, err = fsg_cli(capsys, "train", *TINY, "--out", str(out))
    assert code == 2
    assert err.strip().splitlines()[-1] == ("fsg: error: refusing to write a checkpoint holding non-finite values "
                                           "(model fc.bias); no checkpoint was written")
    assert not (out / "last.pt").exists() and not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_full_precision_trainer_rejects_non_finite_steps_too():
    from fsg.train.build import FullPrecisionTrainer

    def make(**kw):
        torch.manual_seed(0)
        return FullPrecisionTrainer(SmallCNN(in_channels=1, num_classes=4, width=4), "sgdm", 0.05, **kw)

    ref = make()
    ref_losses = [ref.step(X[i], Y[i]).loss for i in range(4)]
    t = make()
    t.step(X[0], Y[0])
    before = frozen(t)
    with pytest.raises(NonFiniteError, match=r"^step 2: non-finite loss nan"):
        t.step(BAD, Y[0])
    assert_same(before, frozen(t), skip=())
    t.nonfinite = "skip"
    assert t.step(BAD, Y[0]).skipped and t.skipped == 1
    assert_same(before, frozen(t))
    assert [ref_losses[0]] + [t.step(X[i], Y[i]).loss for i in range(1, 4)] == ref_losses
    assert_same(frozen(ref), frozen(t))


def test_all_finite_is_exact():
    from fsg.trainer import all_finite

    big = torch.full((1000,), 3e38)  # finite, but its sum overflows: the fast path's false alarm is checked
    assert all_finite([torch.ones(3), big]) and all_finite([]) and all_finite([torch.arange(3)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.complex64):
            t = torch.zeros(5, dtype=dtype)
            t[2] = bad
            assert not all_finite([torch.ones(3), t, torch.zeros(0)])


def test_all_finite_checks_many_tensors_in_a_few_operators():
    """The fast path is one multi-tensor norm per device, not an operator per tensor (each a kernel
    launch on a GPU): 50 tensors, a handful of ATen operators."""
    from fsg.cli.bench import aten_ops
    from fsg.trainer import all_finite

    tensors = [torch.randn(7) for _ in range(50)]
    assert aten_ops(lambda: all_finite(tensors)) <= 10
