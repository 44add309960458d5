"""What a stop costs: SIGTERM saves like Ctrl-C, --save-every / --save-every-seconds write last.pt
mid-epoch, and a run stopped either way (even by SIGKILL) resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fsg.train.loop
from fsg.train.checkpoint import load_checkpoint
from fsg.train.loop import train

from conftest import fsg_cli
from test_checkpoint import assert_same_run, metric_rows, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

# 480 training images, batch 16: 30 steps in the one epoch
RUN = ["--dataset", "synthetic", "--dataset-option", "n_train=480", "--dataset-option", "n_test=16",
       "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
       "--batch-size", "16", "--num-threads", "1", "--no-progress", "--log-every", "1", "--epochs", "1",
       "--estimator", "multifc", "--hidden", "8", "--optimizer", "sgdm", "--lr", "0.05"]

# `fsg ARGS` in a subprocess whose steps take 0.1 s longer (time to signal it mid-epoch)
SLOW_FSG = """
import sys, time
import fsg
step = fsg.Trainer.step
def slow(self, x, y):
    time.sleep(0.1)
    return step(self, x, y)
fsg.Trainer.step = slow
from fsg.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def spawn(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", SLOW_FSG, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, out, n, timeout=120):
    """Wait until the run in ``out`` has logged ``n`` step rows."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = fsg.train.metrics.MetricsLog.read(out / "metrics.jsonl")
        if sum(r.get("kind") == "step" for r in rows) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the run did not get going")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of RUN (in this process), its metric rows and checkpoint."""
    out = tmp_path_factory.mktemp("reference") / "run"
    from fsg.cli.app import main

    assert main(["train", *RUN, "--out", str(out)]) == 0
    return metric_rows(out), load_checkpoint(out / "last.pt")


def test_sigterm_mid_epoch_saves_exits_143_and_resumes_exactly(tmp_path, reference, capsys):
    out = tmp_path / "run"
    proc = spawn("train", *RUN, "--out", str(out))
    wait_for_steps(proc, out, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("fsg: stopped by SIGTERM at epoch 1, step ") and "checkpoint saved to" in last_line
    assert f"resume with: fsg train --resume {out / 'last.pt'}" in last_line
    ck = load_checkpoint(out / "last.pt")
    assert 8 <= ck["step"] < 30 and ck["batch"] == ck["step"] and ck["epoch"] == 0  # mid-epoch

    code, _, err = fsg_cli(capsys, "train", "--resume", str(out), "--no-progress")
    assert code == 0, err
    rows, ref_ck = reference
    assert metric_rows(out) == rows  # every step's loss, the epoch row: bit for bit
    assert_same_run(ref_ck, load_checkpoint(out / "last.pt"))


def test_sigkill_after_a_periodic_save_loses_at_most_save_every_steps(tmp_path, reference, capsys):
    out = tmp_path / "run"
    proc = spawn("train", *RUN, "--out", str(out), "--save-every", "4")
    wait_for_steps(proc, out, 10)
    proc.kill()  # SIGKILL: nothing runs after this
    proc.communicate(timeout=60)
    ck = load_checkpoint(out / "last.pt")
    logged = sum(r.get("kind") == "step" for r in fsg.train.metrics.MetricsLog.read(out / "metrics.jsonl"))
    assert ck["step"] >= 8 and ck["step"] % 4 == 0 and logged - ck["step"] < 4 + 1 and ck["batch"] == ck["step"]

    code, _, err = fsg_cli(capsys, "train", "--resume", str(out), "--no-progress")
    assert code == 0, err
    rows, ref_ck = reference
    assert metric_rows(out) == rows
    assert_same_run(ref_ck, load_checkpoint(out / "last.pt"))


def saves(monkeypatch):
    """Record (step, epoch, batch) of every checkpoint the loop writes."""
    written = []
    real = fsg.train.loop.save_checkpoint

    def record(path, payload):
        written.append((payload["step"], payload["epoch"], payload["batch"]))
        return real(path, payload)

    monkeypatch.setattr(fsg.train.loop, "save_checkpoint", record)
    return written


@pytest.mark.parametrize("every, expected", [
    (None, [(4, 1, 0), (8, 2, 0)]),                        # the end of every epoch only
    (3, [(3, 0, 3), (4, 1, 0), (6, 1, 2), (8, 2, 0)]),     # + mid-epoch every 3 steps
    (2, [(2, 0, 2), (4, 1, 0), (6, 1, 2), (8, 2, 0)]),     # an epoch's end is written once
])
def test_save_every_writes_at_the_expected_steps(tmp_path, monkeypatch, every, expected):
    written = saves(monkeypatch)
    train(tiny(tmp_path / "run", "multifc", save_every=every), progress=False)
    assert written == expected


def test_save_every_seconds(tmp_path, monkeypatch):
    written = saves(monkeypatch)
    train(tiny(tmp_path / "run", "ste", save_every_seconds=1e-9), progress=False)  # due after every step
    assert [w[0] for w in written] == [1, 2, 3, 4, 5, 6, 7, 8]
    written.clear()
    train(tiny(tmp_path / "run2", "ste", save_every_seconds=3600), progress=False)
    assert [w[0] for w in written] == [4, 8]


def test_save_every_may_change_on_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(tiny(out, "ste", epochs=1), progress=False)
    code, stdout, err = fsg_cli(capsys, "train", "--resume", str(out), "--epochs", "2", "--save-every", "1",
                                "--save-every-seconds", "60", "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 8
    cfg = load_checkpoint(out / "last.pt")["config"]
    assert cfg["save_every"] == 1 and cfg["save_every_seconds"] == 60


# ----------------------------------------------------------------------------------------------
# the run directory's lock, and temporaries left by a killed save

from fsg.train.runlock import LOCK_NAME, RunLock, remove_stale_temporaries  # noqa: E402

from conftest import cli_error  # noqa: E402

TINY = ["--dataset", "synthetic", "--dataset-option", "n_train=48", "--dataset-option", "n_test=16",
        "--dataset-option", "size=8", "--dataset-option", "num_classes=4", "--model", "small-cnn", "--width", "4",
        "--batch-size", "16", "--num-threads", "1", "--no-progress", "--epochs", "1", "--estimator", "ste"]


def listing(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_second_run_on_a_locked_directory_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert fsg_cli(capsys, "train", *TINY, "--out", str(out))[0] == 0
    (out / ".last.pt.abcd1234.tmp").write_bytes(b"being written by the holder")
    with RunLock(out):  # another live process's lock (flock: per open file, so this process counts)
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        before = listing(out)
        err = cli_error(capsys, "train", "--resume", str(out), "--epochs", "2")
        assert f"{str(out)!r} is in use by another fsg run (pid {os.getpid()}" in err
        assert listing(out) == before  # nothing written, the holder's temporary left alone
    fresh = tmp_path / "fresh"
    with RunLock(fresh):  # a fresh run's directory, locked before its first checkpoint
        err = cli_error(capsys, "train", *TINY, "--out", str(fresh))
        assert "is in use by another fsg run" in err
        assert [p.name for p in fresh.iterdir()] == [LOCK_NAME]
    assert not (out / LOCK_NAME).exists()  # released: the file goes
    code, _, err = fsg_cli(capsys, "train", "--resume", str(out), "--epochs", "2")
    assert code == 0, err
    assert "removed 1 temporary file of an interrupted save: .last.pt.abcd1234.tmp" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.csv", "metrics.jsonl"]


def test_a_second_process_is_refused_while_a_run_is_live(tmp_path, capsys):
    out = tmp_path / "run"
    proc = spawn("train", *RUN, "--out", str(out))
    try:
        wait_for_steps(proc, out, 2)
        assert (out / LOCK_NAME).read_text().strip() == str(proc.pid)
        err = cli_error(capsys, "train", *RUN, "--out", str(out))
        assert f"is in use by another fsg run (pid {proc.pid}" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 143 and not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(dead.stdout)  # its flock went with it
    code, _, err = fsg_cli(capsys, "train", *TINY, "--out", str(out))
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()


def test_only_our_own_temporaries_are_removed(tmp_path):
    names = [".last.pt.k2j_x9q1.tmp", ".metrics.jsonl.abcdefgh.tmp", ".config.json.12345678.tmp",
             ".model.pt.zzzzzzzz.tmp", ".metrics.csv.a1b2c3d4.tmp"]
    foreign = [".last.pt.tmp", "last.pt.abcdefgh.tmp", ".notes.txt.abcdefgh.tmp", ".last.pt.ABCDEFGH.tmp",
               ".last.pt.abcdefghi.tmp", "data.tmp", "last.pt"]
    for n in names + foreign:
        (tmp_path / n).write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(foreign)


# the `fsg` command in a subprocess whose checkpoint writes hang once their bytes are out (a save to kill -9)
HANGING_SAVE = """
import sys, time
import torch
real = torch.save
def save(obj, f, *a, **k):
    real(obj, f, *a, **k)
    if isinstance(obj, dict) and obj.get("format") == "fsg-checkpoint":
        f.flush()
        print("SAVING", flush=True)
        time.sleep(600)
torch.save = save
from fsg.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_save_leaves_a_temporary_that_the_next_run_removes(tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HANGING_SAVE, "train", *TINY, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "SAVING"
    proc.kill()
    proc.communicate(timeout=60)
    temps = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".last.pt.") and not (out / "last.pt").exists()
    assert (out / LOCK_NAME).exists()  # the dead process's lock file
    # no checkpoint: a fresh run in the same directory takes over the lock and removes the debris
    code, _, err = fsg_cli(capsys, "train", *TINY, "--out", str(out))
    assert code == 0, err
    assert f"removed 1 temporary file of an interrupted save: {temps[0]}" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.csv", "metrics.jsonl"]


# ----------------------------------------------------------------------------------------------
# a full disk

import errno  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

import fsg.train.checkpoint  # noqa: E402
from fsg.train.checkpoint import save_checkpoint  # noqa: E402


class FullFile:
    """A file on a disk that fills up after ``room`` bytes: later writes raise ENOSPC."""

    def __init__(self, f, room):
        self._f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill_disk(monkeypatch, room=1000, after=0):
    """Every atomic write (after the first ``after`` ones) meets a disk with ``room`` bytes left."""
    real = fsg.files._RecordingFile.__init__
    calls = {"n": 0}

    def init(self, f):
        calls["n"] += 1
        real(self, FullFile(f, room) if calls["n"] > after else f)

    monkeypatch.setattr(fsg.files._RecordingFile, "__init__", init)


def assert_intact(path, before):
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("room", [0, 1000, 100_000])  # torch.save's RuntimeError, or the OSError itself
def test_full_disk_during_torch_save_is_one_clear_line(tmp_path, monkeypatch, room):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"kind": "train", "value": torch.arange(5)})
    before = path.read_bytes()
    fill_disk(monkeypatch, room)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"kind": "train", "value": torch.zeros(100_000)})
    assert str(info.value.strerror) == f"no space left on device writing {path}" and info.value.errno == errno.ENOSPC
    assert_intact(path, before)


TORCH_WRITE_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


@pytest.mark.parametrize("how", ["oserror", "runtimeerror-hiding-oserror", "bare-runtimeerror-disk-full",
                                 "bare-runtimeerror"])
def test_a_writer_failing_with_enospc_or_torchs_runtimeerror(tmp_path, monkeypatch, how):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"kind": "train", "value": torch.arange(5)})
    before = path.read_bytes()

    def failing(obj, f, *a, **k):
        f.write(b"partial")
        if how == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        if how == "runtimeerror-hiding-oserror":  # what torch.save does on a buffered file
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError(TORCH_WRITE_FAILURE)
        raise RuntimeError(TORCH_WRITE_FAILURE)

    monkeypatch.setattr(torch, "save", failing)
    if how == "bare-runtimeerror-disk-full":
        monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255)))
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"kind": "train", "value": torch.arange(7)})
    if how == "bare-runtimeerror":  # the disk is not full: the cause is unknown, said so
        assert info.value.strerror == f"could not write {path} ({TORCH_WRITE_FAILURE})"
    else:
        assert info.value.strerror == f"no space left on device writing {path}"
    assert_intact(path, before)


def test_train_on_a_full_disk_exits_2_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert fsg_cli(capsys, "train", *TINY, "--out", str(out))[0] == 0
    before = (out / "last.pt").read_bytes()
    fill_disk(monkeypatch, room=2000, after=3)  # config.json, metrics.jsonl, metrics.csv fit; last.pt does not
    from fsg.cli.app import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.splitlines()[-1] == f"fsg: error: no space left on device writing {out / 'last.pt'}"
    assert sum(l.startswith("fsg: error") for l in err.splitlines()) == 1
    assert_intact(out / "last.pt", before)
    assert load_checkpoint(out / "last.pt")["step"] == 3
    monkeypatch.undo()
    code, _, err = fsg_cli(capsys, "train", "--resume", str(out), "--epochs", "2", "--no-progress")
    assert code == 0, err


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError(TORCH_WRITE_FAILURE), RuntimeError("anything else")])
def test_image_cache_on_a_full_disk_warns_and_continues(tmp_path, monkeypatch, error):
    from test_data import folder_tar

    from fsg.data import load_image_folder

    tar, _, expected = folder_tar(tmp_path)
    real = torch.save

    def failing(obj, f, *a, **k):
        if isinstance(obj, dict) and "images" in obj:
            f.write(b"partial")
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    cache = tmp_path / "cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_image_folder(tar, "train", cache_dir=cache)
    assert torch.equal(ds.images, expected["train"][0])
    msgs = [str(w.message) for w in caught if "image cache" in str(w.message)]
    assert len(msgs) == 1 and "continuing without it" in msgs[0], msgs
    if not isinstance(error, RuntimeError) or "unexpected pos" in str(error):
        assert "no space left on device writing" in msgs[0] or "could not write" in msgs[0]
    assert list(cache.iterdir()) == []  # no partial cache, no temporary
