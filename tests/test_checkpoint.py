"""Checkpoints: exact resume (every estimator, mid-epoch), Ctrl-C, corrupted/foreign/missing
files, atomic writes, and the trainer's state_dict."""

import io
import os
import pickle
import shutil
import signal

import pytest
import torch

import fsg
import fsg.data
from fsg.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fsg.train.config import TrainConfig
from fsg.train.interrupt import TrainingInterrupted
from fsg.train.loop import train

from conftest import interrupt_at_batch, make_mlp, make_task

TIME_FIELDS = ("epoch_time", "eval_time", "elapsed", "train_time")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out, estimator="multifc", **kw):
    """small-cnn width 4 on a tiny synthetic task: 64 train images, batch 16 → 4 steps/epoch."""
    opts = {"fsg": dict(expand=4, fast_hidden=8, d_state=4, d_conv=4), "multifc": dict(hidden=8),
            "fc-grad": dict(hidden=8), "lstmfc": dict(hidden=4),
            "fsg-stream": dict(expand=4, fast_hidden=8, d_state=4, d_conv=4, layout="stream"),
            "fsg-lstm-fc": dict(slow_net="lstm-fc", fast_hidden=8)}.get(estimator, {})
    estimator = "fsg" if estimator.startswith("fsg-") else estimator
    base = dict(model="small-cnn", width=4, dataset="synthetic",
                dataset_options=dict(n_train=64, n_test=16, size=8, num_classes=4),
                estimator=estimator, estimator_options=opts, optimizer="sgdm", lr=0.05, lr_step=1,
                lr_gamma=0.5, epochs=2, batch_size=16, out=str(out), log_every=1, num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def assert_same(a, b, path="root"):
    """Recursive exact equality of checkpoint contents (tensors: torch.equal, same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def strip_times(rows):
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]


def assert_same_run(ck_a, ck_b):
    for key in ("trainer", "data", "scheduler", "epoch", "batch", "step", "rng", "running"):
        if key == "running":
            ra = {k: v for k, v in ck_a[key].items() if k != "train_time"}
            rb = {k: v for k, v in ck_b[key].items() if k != "train_time"}
            assert_same(ra, rb, key)
        else:
            assert_same(ck_a[key], ck_b[key], key)
    epochs = lambda ck: strip_times([r for r in ck["history"] if r["kind"] == "epoch"])  # noqa: E731
    assert_same(epochs(ck_a), epochs(ck_b), "history")


_reference_cache = {}


def reference(tmp_path_factory, estimator):
    """The uninterrupted run (8 steps over 2 epochs), computed once per estimator."""
    if estimator not in _reference_cache:
        out = tmp_path_factory.mktemp(f"ref-{estimator}")
        res = train(tiny(out, estimator), progress=False)
        _reference_cache[estimator] = (res, load_checkpoint(out / "last.pt"), out)
    return _reference_cache[estimator]


def metric_rows(out):
    return strip_times(fsg.train.metrics.MetricsLog.read(out / "metrics.jsonl"))


# ----------------------------------------------------------------------------------------------
# (a) exact resume, mid-epoch, every estimator


@pytest.mark.parametrize("estimator", ["ste", "multifc", "lstmfc", "fsg", "fsg-stream", "fsg-lstm-fc"])
def test_resume_mid_epoch_is_exact(tmp_path, tmp_path_factory, estimator):
    ref, ref_ck, ref_out = reference(tmp_path_factory, estimator)
    assert ref.steps == 8 and len(ref.losses) == 8

    out = tmp_path / "run"
    first = train(tiny(out, estimator, max_steps=5), progress=False)  # stops at step 5: epoch 2, batch 1 of 4
    assert first.stopped == "max_steps" and first.steps == 5
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 5 and ck["epoch"] == 1 and ck["batch"] == 1  # mid-epoch
    assert ck["data"] == {"epoch": 1, "batch": 1, "seed": 0}

    # a fresh process would do exactly this: build everything from the checkpoint
    second = train(tiny(out, estimator), resume=out / "last.pt", progress=False)
    assert second.steps == 8 and second.stopped == "epochs"
    assert first.losses + second.losses == ref.losses  # exact, float for float
    ck = load_checkpoint(out / "last.pt")
    assert_same_run(ref_ck, ck)

    # what makes the comparison meaningful: hypernetwork state and histories are in there
    est = ck["trainer"]["estimator"]
    if estimator == "fsg":
        hgs = est["_extra_state"]["hgs"]
        assert len(hgs) == 3 and all(len(h) == 5 for h in hgs)  # L = 5 gradients per layer
        assert any(k.startswith("slow.") for k in est) and "lre.weight" in est
    if estimator == "fsg-stream":
        assert all(s is not None for s in est["_extra_state"]["stream"])  # the carried per-weight states
    if estimator == "lstmfc":
        assert all(s is not None for s in est["_extra_state"]["states"])
    if estimator == "fsg-lstm-fc":  # the slow-net's carried (h, c) per layer
        states = est["slow._extra_state"]["states"]
        assert len(states) == 3 and all(s is not None for s in states)
    if estimator != "ste":
        assert ck["trainer"]["meta_optimizers"]
    rec = ck["trainer"]["recorded"]
    assert set(rec) == {"conv1", "conv2", "fc"} and all(r["grad"] is not None for r in rec.values())
    assert "fc.bias" in ck["trainer"]["grads"]["model"]

    # the metric files hold each step exactly once, and the same numbers as the reference
    rows = metric_rows(out)
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 9))
    ref_rows = [r for r in metric_rows(ref_out)]
    assert [r for r in rows if r["kind"] != "final"] == ref_rows


def test_resumed_epoch_metrics_and_schedule(tmp_path, tmp_path_factory):
    ref, ref_ck, _ = reference(tmp_path_factory, "multifc")
    epochs = [r for r in ref.history if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["lr"] for r in epochs] == [0.05, 0.025]  # lr_step 1, lr_gamma 0.5
    assert all(0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0 for r in epochs)
    assert ref_ck["scheduler"]["last_epoch"] == 2


# ----------------------------------------------------------------------------------------------
# (b) Ctrl-C


def before_step(monkeypatch, n, action):
    """Patch ``fsg.Trainer.step`` so that its ``n``-th call runs ``action()`` first (which may
    raise), then the real step; returns the real step."""
    original = fsg.Trainer.step
    calls = {"n": 0}

    def step(self, x, y):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return original(self, x, y)

    monkeypatch.setattr(fsg.Trainer, "step", step)
    return original


def raise_keyboard_interrupt():
    """Raise KeyboardInterrupt, as Python's SIGINT handler does."""
    raise KeyboardInterrupt


def test_ctrl_c_signal_mid_epoch_saves_and_resumes_exactly(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """A real SIGINT arriving during step 3: the step completes, a checkpoint is written, resume is exact."""
    ref, ref_ck, _ = reference(tmp_path_factory, "fsg")
    out = tmp_path / "run"
    original = before_step(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGINT))  # during the step
    handler = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN if started ignoring it
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny(out, "fsg"), progress=False)
    e = info.value
    assert isinstance(e, KeyboardInterrupt)
    assert e.step == 3 and e.checkpoint == out / "last.pt"
    assert "\n" not in e.message and "--resume" in e.message and str(out / "last.pt") in e.message
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 3 and ck["epoch"] == 0 and ck["batch"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # handler restored

    monkeypatch.setattr(fsg.Trainer, "step", original)
    rest = train(None, resume=out / "last.pt", progress=False)
    assert rest.losses == ref.losses[3:]
    assert_same_run(ref_ck, load_checkpoint(out / "last.pt"))


def test_keyboard_interrupt_between_steps_resumes_exactly(tmp_path, tmp_path_factory, monkeypatch):
    """KeyboardInterrupt raised by the data pipeline when fetching the 7th batch (epoch 2)."""
    ref, ref_ck, _ = reference(tmp_path_factory, "multifc")
    out = tmp_path / "run"
    interrupt_at_batch(monkeypatch, 7)
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny(out, "multifc"), progress=False)
    assert info.value.step == 6
    ck = load_checkpoint(out / "last.pt")
    assert (ck["step"], ck["epoch"], ck["batch"]) == (6, 1, 2)
    assert ck["data"] == {"epoch": 1, "batch": 2, "seed": 0}

    monkeypatch.undo()  # the data pipeline works again
    rest = train(None, resume=out / "last.pt", progress=False)
    assert rest.losses == ref.losses[6:]
    assert_same_run(ref_ck, load_checkpoint(out / "last.pt"))


def test_interrupt_inside_a_step_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A KeyboardInterrupt escaping from inside a step (e.g. a second Ctrl-C) may leave a torn
    state: nothing is saved, the last epoch checkpoint stays as it was."""
    out = tmp_path / "run"
    before_step(monkeypatch, 6, raise_keyboard_interrupt)
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny(out, "multifc"), progress=False)
    assert "not saved" in info.value.message and "\n" not in info.value.message
    assert info.value.checkpoint == out / "last.pt"
    ck = load_checkpoint(out / "last.pt")
    assert (ck["step"], ck["epoch"], ck["batch"]) == (4, 1, 0)  # the end-of-epoch-1 checkpoint


# ----------------------------------------------------------------------------------------------
# (c) bad files


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    train(tiny(out, "ste", epochs=1), progress=False)
    return out / "last.pt"


def snapshot_dir(d):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 300
    assert isinstance(info.value, ValueError)
    return msg


def test_truncated_checkpoint(tmp_path, real_checkpoint):
    data = real_checkpoint.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad = tmp_path / "last.pt"
        bad.write_bytes(data[:cut])
        before = snapshot_dir(tmp_path)
        one_line_error(bad, "truncated or corrupted")
        assert snapshot_dir(tmp_path) == before


def test_empty_missing_and_directory(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(tmp_path / "empty.pt", "empty")
    one_line_error(tmp_path / "nope.pt", "not found")
    one_line_error(tmp_path, "not a file")


class Foreign:
    pass


def test_foreign_files(tmp_path):
    torch.save({"weight": torch.ones(3)}, tmp_path / "sd.pt")  # a plain state_dict
    one_line_error(tmp_path / "sd.pt", "not an fsg checkpoint")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    one_line_error(tmp_path / "list.pt", "not an fsg checkpoint")
    (tmp_path / "rand.pt").write_bytes(os.urandom(4096))
    one_line_error(tmp_path / "rand.pt", "not an fsg checkpoint")
    (tmp_path / "obj.pt").write_bytes(pickle.dumps(Foreign()))  # a random pickle: never unpickled
    one_line_error(tmp_path / "obj.pt", "not an fsg checkpoint")
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04" + os.urandom(2000))  # zip magic, garbage after
    one_line_error(tmp_path / "zip.pt", "truncated or corrupted")
    torch.save({"x": Foreign()}, tmp_path / "obj2.pt")
    one_line_error(tmp_path / "obj2.pt", "refusing to unpickle")
    save_checkpoint(tmp_path / "newer.pt", {"kind": "train"})
    d = torch.load(tmp_path / "newer.pt", weights_only=True)
    one_line_error(tmp_path / "newer.pt", "incomplete: missing config")
    d["version"] = 99
    torch.save(d, tmp_path / "newer.pt")
    one_line_error(tmp_path / "newer.pt", "newer fsg")


def test_resume_from_bad_file_touches_nothing(tmp_path, real_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(real_checkpoint.parent, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    before = snapshot_dir(run)
    with pytest.raises(CheckpointError):
        train(None, resume=run / "last.pt", progress=False)
    with pytest.raises(CheckpointError):
        train(tiny(run, "ste", epochs=1), resume=run / "last.pt", progress=False)
    assert snapshot_dir(run) == before
    assert sorted(before) == ["config.json", "last.pt", "metrics.csv", "metrics.jsonl"]


def test_resume_refuses_changed_configuration(tmp_path, real_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(real_checkpoint.parent, run)
    before = snapshot_dir(run)
    with pytest.raises(ValueError, match="cannot change lr when resuming"):
        train(tiny(run, "ste", epochs=1, lr=0.1), resume=run / "last.pt", progress=False)
    with pytest.raises(ValueError, match="cannot change estimator"):
        train(tiny(run, "multifc", epochs=1), resume=run / "last.pt", progress=False)
    assert snapshot_dir(run) == before


def test_fresh_run_refuses_existing_checkpoint(tmp_path, real_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(real_checkpoint.parent, run)
    before = snapshot_dir(run)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(run, "ste", epochs=1), progress=False)
    assert snapshot_dir(run) == before


# ----------------------------------------------------------------------------------------------
# (d) atomic writes


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, exc):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"kind": "train", "value": torch.arange(5)})
    before = path.read_bytes()
    real_save = torch.save

    def failing(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the bytes are written ...
        f.write(b"garbage")
        raise exc  # ... and then it fails

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(type(exc)):
        save_checkpoint(path, {"kind": "train", "value": torch.arange(7)})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    assert path.read_bytes() == before
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.arange(5))


def test_failed_save_in_the_loop_keeps_the_epoch_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def failing(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == "fsg-checkpoint":
            saves["n"] += 1
            if saves["n"] == 2:
                f.write(b"partial")
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError):
        train(tiny(out, "ste"), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.csv", "metrics.jsonl"]
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 4)
    res = train(None, resume=out / "last.pt", progress=False)  # and the run continues from there
    assert res.steps == 8


def test_save_checkpoint_refuses_objects_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match="cannot be stored"):
        save_checkpoint(tmp_path / "x.pt", {"kind": "train", "bad": Foreign()})
    with pytest.raises(TypeError, match="cannot be stored"):
        save_checkpoint(tmp_path / "x.pt", {"kind": "train", "bad": torch.__version__})  # a str subclass
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# the trainer's state_dict on its own


x, y = make_task(n=96)


def build(estimator, optimizer):
    torch.manual_seed(0)
    model = fsg.binarize(make_mlp(0), "dorefa")
    opts = {"fsg": dict(expand=4, fast_hidden=8), "fsg-lstm-fc": dict(slow_net="lstm-fc", fast_hidden=8)}
    return fsg.Trainer(model, "fsg" if estimator.startswith("fsg") else estimator, optimizer=optimizer, lr=0.05,
                       **opts.get(estimator, {}))


def batch(i):
    j = i % 4
    return x[j * 24:(j + 1) * 24], y[j * 24:(j + 1) * 24]


def run_split(estimator, optimizer, k=3, n=7, drop=()):
    full = build(estimator, optimizer)
    ref = [full.step(*batch(i)).loss for i in range(n)]
    part = build(estimator, optimizer)
    got = [part.step(*batch(i)).loss for i in range(k)]
    buf = io.BytesIO()
    state = part.state_dict()
    for key in drop:
        if key == "recorded":
            state[key] = {l: {"grad": None, "w_tilde": None} for l in state["recorded"]}
        elif key == "applied":
            state[key] = {}
        else:
            state[key] = {"model": {}, "estimator": {}}
    torch.save(state, buf)
    buf.seek(0)
    fresh = build(estimator, optimizer)
    torch.manual_seed(1234)  # the fresh trainer must not depend on the global RNG
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    try:
        got += [fresh.step(*batch(i)).loss for i in range(k, n)]
    except RuntimeError:
        return ref, None, full, fresh
    return ref, got, full, fresh


@pytest.mark.parametrize("optimizer", ["sgd", "sgdm", "adam"])
@pytest.mark.parametrize("estimator", ["ste", "fc-grad", "multifc", "lstmfc", "fsg", "fsg-lstm-fc"])
def test_trainer_state_dict_resumes_exactly(estimator, optimizer):
    ref, got, full, fresh = run_split(estimator, optimizer)
    assert got == ref
    assert_same(full.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("drop", [("grads", "applied"), ("recorded",)])
def test_trainer_state_needs_grads_and_recorded_observations(drop):
    """Without the previous update directions (the applied d, or W.grad / b.grad standing in for
    them), or without the recorded ∂L/∂Ŵ and W̃, a resumed MetaQuant run is not the
    uninterrupted one (or cannot step at all)."""
    ref, got, _, _ = run_split("multifc", "sgd", drop=drop)
    assert got != ref


def test_trainer_load_state_dict_rejects_other_trainers():
    a, b = build("multifc", "sgd"), build("fsg", "sgd")
    a.step(*batch(0))
    with pytest.raises(ValueError, match="estimator"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        a.load_state_dict({"model": {}})


# ---------------------------------------------------------------------------------------------
# checkpoints written by earlier versions

#: The commit before the run loop became fsg.train.loop.Run (and the package was laid out by layer).
OLD_COMMIT = "7ad17b2"
#: The old run: stopped by --max-steps 3 in the middle of epoch 1 (64 images, batch 16: 4 steps an epoch).
OLD_ARGS = ["--model", "small-cnn", "--dataset", "synthetic", "--dataset-option", "n_train=64", "--dataset-option",
            "n_test=32", "--batch-size", "16", "--epochs", "2", "--max-steps", "3", "--estimator", "multifc",
            "--hidden", "8", "--width", "2", "--log-every", "1", "--no-progress", "--num-threads", "1"]
VERSION_FIELDS = ("fsg_version", "torch_version")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A run directory (last.pt, metrics.jsonl) written by the code of :data:`OLD_COMMIT`, taken
    from this repository's git history (skipped where the history is not there)."""
    import subprocess
    import sys
    import tarfile

    try:
        blob = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", OLD_COMMIT, "src"],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history of the repository (commit {OLD_COMMIT})")
    root = tmp_path_factory.mktemp("old-code")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    out = root / "run"
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1", FSG_NO_COMPILE="1")
    subprocess.run([sys.executable, "-m", "fsg", "train", *OLD_ARGS, "--out", str(out)], check=True,
                   capture_output=True, env=env, cwd=root)
    return str(out)


from conftest import tensor_leaves as _tensor_leaves  # noqa: E402


def _no_tensors(obj):
    """``obj`` with its tensors replaced by their place, and times dropped from rows."""
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, dict):
        return {k: _no_tensors(v) for k, v in obj.items() if k not in TIME_FIELDS}
    if isinstance(obj, (list, tuple)):
        return [_no_tensors(v) for v in obj]
    return obj


def _assert_same_tensors(a, b):
    ta, tb = dict(_tensor_leaves(a)), dict(_tensor_leaves(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _old_config(old_run, out, **changes):
    from fsg.train.checkpoint import read_config

    return TrainConfig.from_dict(read_config(os.path.join(old_run, "last.pt"))).replace(out=str(out), **changes)


def test_this_version_writes_the_old_checkpoint(tmp_path, old_run):
    """The same run now writes the same checkpoint: the same entries in the same order, the
    same values (times and version strings aside), every tensor bit for bit."""
    old = load_checkpoint(os.path.join(old_run, "last.pt"))
    train(_old_config(old_run, tmp_path / "new"), progress=False, log=lambda m: None)
    new = load_checkpoint(tmp_path / "new" / "last.pt")
    assert list(new) == list(old)
    assert list(new["running"]) == list(old["running"])
    for k in old:
        if k not in VERSION_FIELDS + ("elapsed", "config"):
            assert _no_tensors(new[k]) == _no_tensors(old[k]), k
    assert {k: new["config"][k] for k in old["config"] if k != "out"} == \
        {k: v for k, v in old["config"].items() if k != "out"}
    _assert_same_tensors(new, old)


def test_an_old_checkpoint_resumes_exactly(tmp_path, old_run):
    """Resuming the old checkpoint continues exactly like an uninterrupted run of this version:
    the same losses, the same rows, the same final checkpoint, tensor for tensor."""
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    resumed = train(_old_config(old_run, run, max_steps=None), resume=run / "last.pt", progress=False,
                    log=lambda m: None)
    straight = train(_old_config(old_run, tmp_path / "straight", max_steps=None), progress=False, log=lambda m: None)
    assert resumed.stopped == straight.stopped == "epochs" and resumed.steps == straight.steps == 8
    assert len(straight.losses) == 8 and resumed.losses == straight.losses[3:]
    assert (resumed.test_loss, resumed.test_accuracy) == (straight.test_loss, straight.test_accuracy)
    # the old run's rows up to step 3 are kept (its "final" row too), then the same rows as straight
    rows = [_no_tensors(r) for r in fsg.train.metrics.MetricsLog.read(run / "metrics.jsonl")]
    straight_rows = [_no_tensors(r) for r in fsg.train.metrics.MetricsLog.read(tmp_path / "straight" / "metrics.jsonl")]
    assert [r for r in rows if r["kind"] != "final"] == straight_rows
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    for k in ("data", "scheduler", "epoch", "batch", "step", "running"):
        assert _no_tensors(a[k]) == _no_tensors(b[k]), k
    _assert_same_tensors(a["trainer"], b["trainer"])
    _assert_same_tensors(a["rng"], b["rng"])


def test_read_header_and_config_skip_the_tensors(tmp_path, monkeypatch, old_run):
    """read_header / read_config: the light entries, from a memory-mapped file; bad files fail
    as load_checkpoint does."""
    from fsg.train.checkpoint import read_config, read_header

    path = os.path.join(old_run, "last.pt")
    full = load_checkpoint(path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or real_load(*a, **k))
    head = read_header(path)
    assert calls == [True]
    assert "trainer" not in head and "rng" not in head
    for k in ("config", "epoch", "batch", "step", "history", "data", "scheduler", "running", "kind"):
        assert _no_tensors(head[k]) == _no_tensors(full[k]), k
    assert read_config(path) == full["config"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_config(bad)


def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch, old_run):
    """train(resume=...) reads the whole checkpoint once (the CLI reads only its config)."""
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    cfg = _old_config(old_run, run, max_steps=4)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or real_load(*a, **k))
    train(cfg, resume=run / "last.pt", progress=False, log=lambda m: None)
    assert calls == [False]


def test_run_state_round_trip():
    """RunState / EpochSums: state_dict → load_state_dict gives the same entries; "skipped"
    appears in "running" only once a step was skipped; stop reasons are checked."""
    from fsg.train.state import RunState

    st = RunState(epoch=2, batch=3, history=[{"kind": "epoch", "epoch": 2, "epoch_time": 1.5}], elapsed=7.0)
    st.sums.add(0.5, 0.25, 16)
    assert "skipped" not in st.state_dict()["running"]
    st.sums.skipped = 2
    saved = st.state_dict()
    assert saved["running"]["skipped"] == 2 and saved["elapsed"] == 7.0
    back = RunState()
    back.load_state_dict(saved)
    assert back.state_dict() == saved
    assert back.trained_seconds() == 1.5
    with pytest.raises(ValueError, match="stop reason"):
        back.stop("bored")
    back.next_epoch()
    assert (back.epoch, back.batch, back.sums.n) == (3, 0, 0)
