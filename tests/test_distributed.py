"""Multi-process training (fsg.distributed): two CPU processes with the gloo backend, launched
like torchrun launches ranks (tests/ddp_worker.py), and `fsg train` under torchrun itself."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

from fsg.data import DataLoader, load_dataset
from fsg.distributed import shard_bounds

WORKER = Path(__file__).with_name("ddp_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict:
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def _launch(out: Path, world: int, *args: str, timeout: float = 300):
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), *args], env=_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"


def _load(path: Path):
    return torch.load(path, weights_only=False)


def _leaves(obj, prefix=""):
    """(path, value) for every leaf of a nested dict/list/tuple structure."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _compare(a, b, exact: bool, rtol=1e-4, atol=1e-6):
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    assert la.keys() == lb.keys()
    for k in la:
        x, y = la[k], lb[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.shape == y.shape, k
            if exact:
                assert torch.equal(x, y), f"{k} differs between ranks"
            else:
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
        elif isinstance(x, float) and not exact:
            assert x == pytest.approx(y, rel=rtol, abs=atol), k
        else:
            assert x == y, k


# ---------------------------------------------------------------------------------------------
# sharding, in one process


def test_shard_bounds_partition():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            spans = [shard_bounds(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("train", [True, False])
def test_sharded_loader_is_the_one_process_batch(train):
    ds = load_dataset("synthetic", split="train", n_train=50, n_test=8, num_classes=3, channels=3, size=8, seed=1)
    single = list(DataLoader(ds, 12, train=train, seed=5, augment=train))
    shards = [list(DataLoader(ds, 12, train=train, seed=5, augment=train, rank=r, world_size=3)) for r in range(3)]
    # 50 = 4·12 + 2: the short last batch has fewer images than processes, so training skips it
    expected = single[:-1] if train else single
    for r in range(3):
        assert len(shards[r]) == (4 if train else (5 if r < 2 else 4))
    for k, (x, y) in enumerate(expected):
        parts = [shards[r][k] for r in range(3) if k < len(shards[r])]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)  # crop/flip drawn for the global batch
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_loader_rejects_bad_sharding():
    ds = load_dataset("synthetic", split="train", n_train=8, n_test=8, num_classes=2, channels=1, size=4)
    with pytest.raises(ValueError, match="rank"):
        DataLoader(ds, 4, train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global batch"):
        DataLoader(ds, 1, train=True, rank=0, world_size=2)


def test_trainer_distributed_needs_a_group():
    import fsg
    from fsg.models import MLP

    with pytest.raises(ValueError, match="torchrun"):
        fsg.Trainer(fsg.binarize(MLP(4, [3], 2)), "ste", distributed=True)


# ---------------------------------------------------------------------------------------------
# two processes


ALL = "ste,fc-grad,multifc,lstmfc,fsg,fsg-fast,fsg-stream"


def test_ranks_stay_identical(tmp_path):
    """Different initialisations and different data per rank: after 4 steps every rank holds the
    same model (BatchNorm statistics included), hypernetworks, optimizer states, histories (HGS),
    carried LSTM/stream states and captured ∂L/∂Ŵ, bit for bit."""
    _launch(tmp_path, 2, "small-cnn", "4", "16", ALL)
    for name in ALL.split(","):
        r0, r1 = _load(tmp_path / f"{name}-rank0.pt"), _load(tmp_path / f"{name}-rank1.pt")
        assert r0["world"] == r1["world"] == 2
        _compare(r0["state"], r1["state"], exact=True)
        assert r0["losses"] == r1["losses"]  # the global loss and accuracy, the same on both
        assert all(n == 16 for _, _, n in r0["losses"])
        if name.startswith("fsg"):
            paths = [p for p, _ in _leaves(r0["state"]["estimator"])]
            assert any("/hgs/" in p for p in paths)  # the history was compared too


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """Without BatchNorm, 2 processes × 8 samples = 1 process × 16 samples, within float tolerance."""
    names = "ste,multifc,fsg,fsg-stream"
    _launch(tmp_path / "two", 2, "mlp", "5", "16", names)
    _launch(tmp_path / "one", 1, "mlp", "5", "16", names)
    for name in names.split(","):
        two, one = _load(tmp_path / "two" / f"{name}-rank0.pt"), _load(tmp_path / "one" / f"{name}-rank0.pt")
        assert one["world"] == 1 and two["world"] == 2
        for key in ("model", "estimator", "recorded"):
            _compare(two["state"][key], one["state"][key], exact=False)
        for (l2, a2, n2), (l1, a1, n1) in zip(two["losses"], one["losses"]):
            assert l2 == pytest.approx(l1, rel=1e-5) and a2 == pytest.approx(a1) and n2 == n1 == 16


def _torchrun_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "fsg", "train", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


TORCHRUN_TINY = ["--dataset", "synthetic", "--model", "small-cnn", "--width", "4", "--estimator", "fsg", "--history", "2",
                 "--batch-size", "16", "--epochs", "1", "--log-every", "1", "--train-subset", "64", "--test-subset", "40",
                 "--num-threads", "1", "--no-progress"]


def test_fsg_train_under_torchrun(tmp_path):
    """`torchrun -m fsg train`: rank 0 alone writes the run directory; the logged loss is the
    global batch's; the checkpoint evaluates with `fsg eval` in one process; a run stopped at
    step 3 and resumed under torchrun ends exactly where an uninterrupted run does."""
    out, full = tmp_path / "run", tmp_path / "full"
    _torchrun_train(*TORCHRUN_TINY, "--max-steps", "3", "--out", str(out))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3]  # written once, not once per rank
    final = [r for r in rows if r["kind"] == "final"]
    assert len(final) == 1 and 0.0 <= final[0]["test_accuracy"] <= 1.0
    ev = subprocess.run([sys.executable, "-m", "fsg", "eval", str(out), "--json"], capture_output=True, text=True,
                        timeout=120)
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["images"] == 40 and res["accuracy"] == pytest.approx(final[0]["test_accuracy"])

    _torchrun_train("--resume", str(out / "last.pt"), "--max-steps", "4")
    _torchrun_train(*TORCHRUN_TINY, "--max-steps", "4", "--out", str(full))
    resumed = torch.load(out / "last.pt", weights_only=True)
    straight = torch.load(full / "last.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 4
    for where in ("model", "estimator"):
        a, b = resumed["trainer"][where], straight["trainer"][where]
        for k, v in _leaves(a):
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, dict(_leaves(b))[k]), (where, k)


def test_fsg_train_under_torchrun_with_a_skipped_last_batch(tmp_path):
    """65 images in global batches of 16 over 2 processes: the last batch (1 image) is smaller than
    the number of processes and every rank skips it, so an epoch is 4 steps, not 5 batches. The
    run still trains both epochs (no "final" row after epoch 1), its checkpoint stands at the
    start of epoch 3, and a run stopped mid-epoch 2 and resumed ends exactly there too."""
    out, part = tmp_path / "run", tmp_path / "part"
    args = [a for a in TORCHRUN_TINY if a not in ("--train-subset", "64")]
    args[args.index("--epochs") + 1] = "2"
    args += ["--train-subset", "65"]
    _torchrun_train(*args, "--out", str(out))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows if r["kind"] != "step"] == ["epoch", "epoch"]
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 9))
    assert [r["step"] for r in rows if r["kind"] == "epoch"] == [4, 8]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (2, 0, 8)
    assert (ckpt["data"]["epoch"], ckpt["data"]["batch"]) == (2, 0)  # the loader agrees with the epoch

    _torchrun_train(*args, "--max-steps", "6", "--out", str(part))
    _torchrun_train("--resume", str(part / "last.pt"), "--max-steps", "100")
    resumed = torch.load(part / "last.pt", weights_only=True)
    assert (resumed["epoch"], resumed["batch"], resumed["step"]) == (2, 0, 8)
    a, b = dict(_leaves(resumed["trainer"]["model"])), dict(_leaves(ckpt["trainer"]["model"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
