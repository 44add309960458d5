"""fsg.data: CIFAR python-format loading (folder, archive, download), image folders (directory,
tarball, cache), batched augmentation/normalisation and the resumable DataLoader. All offline, with
tiny fixtures written in tmp_path."""

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fsg.data
import fsg.data.datasets as D
from fsg.data import (ChecksumError, DataError, DataLoader, DataNotFoundError, ImageDataset,
                      load_cifar, load_dataset, load_image_folder, normalize, random_crop_flip)


# --------------------------------------------------------------------------------------------------
# CIFAR fixtures: the official python format, tiny


def _batch(rng, n, label_key, n_classes, str_keys=False):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, n_classes, size=n)]
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    return {k("batch_label"): b"fake", k("data"): data, k(label_key): labels,
            k("filenames"): [b"x.png"] * n}


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, n=4, seed=0):
    """cifar-10-batches-py/ with 5 train batches of n images, a test batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    train = [_batch(rng, n, "labels", 10) for _ in range(5)]
    for i, b in enumerate(train):
        _dump(b, os.path.join(folder, f"data_batch_{i + 1}"))
    test = _batch(rng, n, "labels", 10)
    _dump(test, os.path.join(folder, "test_batch"))
    _dump({b"label_names": [c.encode() for c in D.CIFAR10_CLASSES], b"num_vis": 3072},
          os.path.join(folder, "batches.meta"))
    return folder, train, test


def write_cifar100(root, n=6, seed=1):
    """cifar-100-python/ with train, test and meta (str keys, as Python 3 pickles would have)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    train = _batch(rng, n, "fine_labels", 100, str_keys=True)
    test = _batch(rng, n, "fine_labels", 100, str_keys=True)
    for b in (train, test):
        b["coarse_labels"] = [0] * n
    _dump(train, os.path.join(folder, "train"))
    _dump(test, os.path.join(folder, "test"))
    names = [f"c{i:03d}" for i in range(100)]
    _dump({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, os.path.join(folder, "meta"))
    return folder, train, test, names


def _val(d, key):
    return d[key] if key in d else d[key.encode()]


def check_cifar(ds, batches, label_key):
    data = np.concatenate([_val(b, "data") for b in batches])
    labels = sum((_val(b, label_key) for b in batches), [])
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(data), 3, 32, 32)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels
    assert torch.equal(ds.images, torch.from_numpy(data).view(-1, 3, 32, 32))
    # CHW layout: row = R plane, then G, then B, each 32 rows of 32 pixels
    i, c, r, col = 1, 2, 5, 7
    assert int(ds.images[i, c, r, col]) == int(data[i, c * 1024 + r * 32 + col])
    assert int(ds.images[0, 0, 0, 1]) == int(data[0, 1])  # second pixel of the red plane


def make_tar(src_dir, tar_path, arcname):
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(src_dir, arcname=arcname)


def test_cifar10_folder(tmp_path):
    folder, train, test = write_cifar10(tmp_path)
    ds = load_cifar(tmp_path, "cifar10", "train")
    check_cifar(ds, train, "labels")
    assert ds.classes == list(D.CIFAR10_CLASSES) and len(ds) == 20
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2023, 0.1994, 0.2010)
    check_cifar(load_cifar(tmp_path, "cifar10", "test"), [test], "labels")
    # root may also be the folder itself; load_dataset routes there
    check_cifar(load_cifar(folder, "cifar10", "test"), [test], "labels")
    check_cifar(load_dataset("cifar10", str(tmp_path), "train"), train, "labels")


def test_cifar100_folder(tmp_path):
    _, train, test, names = write_cifar100(tmp_path)
    ds = load_dataset("cifar100", str(tmp_path), "train")
    check_cifar(ds, [train], "fine_labels")
    assert ds.classes == names and ds.mean == ds.std == (0.5, 0.5, 0.5) and ds.name == "cifar100"
    check_cifar(load_cifar(tmp_path, "cifar100", "test"), [test], "fine_labels")


def test_cifar_from_archive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    folder, train, _ = write_cifar10(src)
    root = tmp_path / "root"
    root.mkdir()
    make_tar(folder, root / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    check_cifar(load_cifar(root, "cifar10", "train"), train, "labels")
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    check_cifar(load_cifar(root, "cifar10", "train"), train, "labels")  # now from the folder

    folder100, train100, _, _ = write_cifar100(src)
    make_tar(folder100, root / "cifar-100-python.tar.gz", "cifar-100-python")
    check_cifar(load_cifar(root, "cifar100", "train"), [train100], "fine_labels")


def test_cifar_archive_unsafe_member_rejected(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match="unsafe member"):
        load_cifar(root, "cifar10")
    assert not (tmp_path / "evil.txt").exists()
    assert os.listdir(root) == ["cifar-10-python.tar.gz"]  # temp extraction folder cleaned up


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_cifar(tmp_path / "nothing", "cifar10", "train")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, RuntimeError)
    assert "\n" not in msg
    assert os.path.join(str(tmp_path / "nothing"), "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "cifar-10-python.tar.gz" in msg and "download=True" in msg
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path), "test")


class _FakeResponse(io.BytesIO):
    pass


def _fake_urlopen(payload, calls):
    def urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(payload)
    return urlopen


def test_cifar_download_checksum_mismatch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(b"not the archive", calls))
    with pytest.raises(ChecksumError) as e:
        load_cifar(tmp_path, "cifar10", download=True)
    assert calls == [D.CIFAR_URLS["cifar10"]]
    assert "checksum" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # no archive and no temp file left behind


def test_cifar_download_network_error(tmp_path, monkeypatch):
    def urlopen(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError, match="network") as e:
        load_cifar(tmp_path, "cifar100", download=True)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_cifar_download_ok(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    folder, _, test = write_cifar10(src)
    make_tar(folder, tmp_path / "archive.tar.gz", "cifar-10-batches-py")
    payload = (tmp_path / "archive.tar.gz").read_bytes()
    monkeypatch.setitem(D.CIFAR_MD5, "cifar10", hashlib.md5(payload).hexdigest())
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(payload, calls))
    root = tmp_path / "root"
    ds = load_cifar(root, "cifar10", "test", download=True)
    check_cifar(ds, [test], "labels")
    assert (root / "cifar-10-python.tar.gz").read_bytes() == payload
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    load_cifar(root, "cifar10", "train", download=True)  # present now: no second download
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# Image folders


def write_folder(root, classes=("dog", "cat", "bird"), per_class=3, size=(6, 8), ext="png",
                 splits=("train", "test"), seed=0, sizes=None):
    """root/split/class/NN.ext with random RGB images of ``size`` (H, W); returns the expected
    {split: (images uint8 (N,3,H,W), labels, sorted classes)} in loader order."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split in splits:
        imgs, labels = {}, {}
        for cls in classes:
            os.makedirs(os.path.join(root, split, cls))
            for j in range(per_class):
                h, w = (sizes or {}).get((split, cls, j), size)
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, cls, f"{j:02d}.{ext}"))
                imgs[(cls, j)] = arr
        order = sorted(classes)
        x = [torch.from_numpy(imgs[(c, j)]).permute(2, 0, 1) for c in order for j in range(per_class)
             if (c, j) in imgs]
        y = [i for i, c in enumerate(order) for j in range(per_class)]
        expected[split] = (torch.stack(x) if sizes is None else None, y, order)
    return expected


def folder_tar(tmp_path, name="imgs", top="mydata", **kw):
    src = tmp_path / f"{name}-src"
    src.mkdir()
    expected = write_folder(src, **kw)
    tar = tmp_path / f"{name}.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        for entry in sorted(os.listdir(src)):
            tf.add(src / entry, arcname=f"{top}/{entry}" if top else entry)
    return tar, src, expected


def test_image_folder_tarball_png(tmp_path):
    tar, _, expected = folder_tar(tmp_path)
    cache = tmp_path / "cache"
    before = sorted(os.listdir(tmp_path))
    for split in ("train", "test"):
        ds = load_image_folder(tar, split, cache_dir=cache)
        x, y, classes = expected[split]
        assert ds.classes == ["bird", "cat", "dog"] == classes
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == y
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (9, 3, 6, 8)
        assert torch.equal(ds.images, x)
        assert ds.name == "imgs" and ds.split == split and len(ds) == 9
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["cache"])  # nothing extracted
    assert len(os.listdir(cache)) == 2  # one cache file per split


def test_image_folder_tarball_without_top_level_folder_and_jpeg(tmp_path):
    tar, _, _ = folder_tar(tmp_path, top=None, ext="jpg", classes=("b", "a"), per_class=2,
                           size=(10, 12))
    ds = load_image_folder(tar, "train", cache_dir=tmp_path / "cache")
    assert ds.images.shape == (4, 3, 10, 12) and ds.images.dtype == torch.uint8
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1]


def test_image_folder_directory_form_matches_tarball(tmp_path):
    tar, src, expected = folder_tar(tmp_path)
    before = sorted(p for p, _, _ in os.walk(src))
    a = load_image_folder(src, "test", cache_dir=tmp_path / "cache")
    b = load_image_folder(tar, "test", cache_dir=tmp_path / "cache")
    assert torch.equal(a.images, expected["test"][0]) and torch.equal(a.images, b.images)
    assert a.labels.tolist() == b.labels.tolist() and a.classes == b.classes
    assert sorted(p for p, _, _ in os.walk(src)) == before  # nothing written into the data
    assert load_dataset("imagefolder", str(src), "test", cache_dir=tmp_path / "c2").classes == a.classes


def _no_decoding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(Image, "open", boom)


def test_image_folder_cache_hit_and_invalidation(tmp_path, monkeypatch):
    tar, _, expected = folder_tar(tmp_path)
    cache = tmp_path / "cache"
    first = load_image_folder(tar, "train", cache_dir=cache)
    with monkeypatch.context() as m:
        _no_decoding(m)
        again = load_image_folder(tar, "train", cache_dir=cache)  # from the cache
        assert torch.equal(again.images, first.images) and again.labels.tolist() == first.labels.tolist()
        assert again.classes == first.classes

    # rewrite the tarball with other pixels: the cache no longer applies
    os.unlink(tar)
    tar2, _, expected2 = folder_tar(tmp_path, name="imgs2", seed=5)
    os.replace(tar2, tar)
    st = os.stat(tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with monkeypatch.context() as m:
        _no_decoding(m)
        with pytest.raises(DataError, match="could not decode"):
            load_image_folder(tar, "train", cache_dir=cache)
    fresh = load_image_folder(tar, "train", cache_dir=cache)
    assert torch.equal(fresh.images, expected2["train"][0])
    assert not torch.equal(fresh.images, first.images)
    assert len(os.listdir(cache)) == 1  # the stale cache of this source was removed


def test_image_folder_directory_cache_invalidated_by_changed_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    write_folder(src, splits=("train",))
    cache = tmp_path / "cache"
    a = load_image_folder(src, "train", cache_dir=cache)
    path = src / "train" / "cat" / "01.png"
    arr = np.zeros((6, 8, 3), dtype=np.uint8)
    arr[0, 0] = (1, 2, 3)
    Image.fromarray(arr).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b = load_image_folder(src, "train", cache_dir=cache)
    i = 3 + 1  # class "cat" is index 1 of sorted (bird, cat, dog), file 01 is its second
    assert b.images[i].permute(1, 2, 0).tolist() == torch.from_numpy(arr).tolist()
    assert not torch.equal(a.images[i], b.images[i])


def test_image_folder_default_cache_dir_from_env(tmp_path, monkeypatch):
    tar, _, _ = folder_tar(tmp_path, splits=("train",))
    monkeypatch.setenv("FSG_CACHE", str(tmp_path / "envcache"))
    load_image_folder(tar, "train")
    assert len(os.listdir(tmp_path / "envcache")) == 1


def test_image_folder_mixed_sizes_error(tmp_path):
    tar, _, _ = folder_tar(tmp_path, splits=("train",), sizes={("train", "cat", 1): (7, 8)})
    with pytest.raises(DataError, match="same size") as e:
        load_image_folder(tar, "train", cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value) and "cat/01.png" in str(e.value)


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataNotFoundError):
        load_image_folder(tmp_path / "nope.tar.gz", "train", cache_dir=tmp_path / "c")
    tar, _, _ = folder_tar(tmp_path, splits=("train",))
    with pytest.raises(DataNotFoundError, match="test/<class>") as e:
        load_image_folder(tar, "test", cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value)


def test_image_folder_mean_std(tmp_path):
    # non-CIFAR classes: statistics of the *training* images, for both splits
    tar, _, expected = folder_tar(tmp_path)
    x = expected["train"][0].double() / 255
    mean = x.mean((0, 2, 3))
    std = x.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False)
    for split in ("train", "test"):
        ds = load_image_folder(tar, split, cache_dir=tmp_path / "cache")
        assert torch.allclose(torch.tensor(ds.mean, dtype=torch.float64), mean, atol=1e-5)
        assert torch.allclose(torch.tensor(ds.std, dtype=torch.float64), std, atol=1e-5)
    # CIFAR-10's class names: CIFAR-10's statistics
    tar10, _, _ = folder_tar(tmp_path, name="c10", classes=D.CIFAR10_CLASSES, per_class=1,
                             splits=("test",))
    ds = load_image_folder(tar10, "test", cache_dir=tmp_path / "cache")
    assert ds.mean == D.CIFAR10_MEAN and ds.std == D.CIFAR10_STD


def test_load_dataset_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("imagefolder")
    ds = load_dataset("synthetic", split="test", n_train=8, n_test=12)
    assert isinstance(ds, ImageDataset) and len(ds) == 12 and ds.images.dtype == torch.float32
    assert ds.images.shape == (12, 1, 16, 16) and ds.labels.dtype == torch.int64
    assert ds.mean == (0.0,) and ds.std == (1.0,) and len(ds.classes) == 10
    batch = next(iter(DataLoader(ds, 5, train=False)))[0]
    assert torch.equal(batch, ds.images[:5])  # normalisation is the identity for synthetic


# --------------------------------------------------------------------------------------------------
# Augmentation, normalisation, loader


def reference_crop_flip(images, seed, padding=4):
    """Slow per-image reference: re-draws the documented random numbers from a fresh generator
    (offsets = randint(0, 2p+1, (n, 2)) -> (dy, dx); then flip = rand(n) < 0.5), pads each image
    with zeros, crops H×W at (dy, dx) and mirrors it if flipped."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = []
    for i in range(n):
        p = F.pad(images[i], (padding,) * 4)
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = p[:, dy:dy + h, dx:dx + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out), offsets, flip


def test_random_crop_flip_matches_reference():
    x = torch.randint(1, 256, (64, 3, 5, 7), dtype=torch.uint8)  # no zeros: padding is visible
    out = random_crop_flip(x, torch.Generator().manual_seed(3))
    ref, offsets, flip = reference_crop_flip(x, 3)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, ref)
    # the draws cover shifted, centred and flipped cases, and padding shows up as black
    assert flip.any() and (~flip).any() and (offsets == 0).any() and (offsets == 8).any()
    assert (out == 0).any()
    centred = (offsets == 4).all(1) & ~flip
    assert torch.equal(out[centred], x[centred])
    # other padding / float images
    out2 = random_crop_flip(x.float(), torch.Generator().manual_seed(4), padding=2)
    assert torch.equal(out2, reference_crop_flip(x.float(), 4, padding=2)[0])


def test_random_crop_flip_seeds():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, torch.Generator().manual_seed(0))
    c = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalize():
    x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize(x, mean, std)
    hand = torch.empty(4, 3, 2, 2)
    for c in range(3):
        hand[:, c] = (x[:, c].float() / 255 - mean[c]) / std[c]
    assert out.dtype == torch.float32 and torch.allclose(out, hand, atol=1e-6)


def toy_dataset(n=23, h=6, w=6):
    images = torch.randint(1, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    return ImageDataset(images, torch.arange(n), [str(i) for i in range(n)], (0.4, 0.5, 0.6),
                        (0.2, 0.25, 0.3), name="toy")


def epoch_batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_eval_is_ordered_normalised_unaugmented():
    ds = toy_dataset()
    loader = DataLoader(ds, 10, train=False)
    assert len(loader) == 3 and not loader.augment
    batches = epoch_batches(loader)
    assert [len(y) for _, y in batches] == [10, 10, 3]
    x = torch.cat([b[0] for b in batches])
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(23))
    m = torch.tensor(ds.mean).view(1, 3, 1, 1)
    s = torch.tensor(ds.std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, (ds.images.float() / 255 - m) / s, atol=1e-6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, epoch_batches(loader)))


def test_loader_train_matches_reference_and_shuffles():
    ds = toy_dataset()
    loader = DataLoader(ds, 8, train=True, seed=7)
    assert loader.augment and len(loader) == 3
    # reference for epoch 0: perm, then per batch random_crop_flip, from one epoch generator
    g = fsg.data.epoch_generator(7, 0)
    perm = torch.randperm(23, generator=g)
    batches = epoch_batches(loader)
    for k, (x, y) in enumerate(batches):
        idx = perm[8 * k: 8 * k + 8]
        assert y.dtype == torch.int64 and torch.equal(y, idx)
        ref = normalize(random_crop_flip(ds.images[idx], g), ds.mean, ds.std)
        assert torch.equal(x, ref)
    # each epoch is a permutation of all samples, epochs differ
    ys = [torch.cat([y for _, y in batches])] + [torch.cat([y for _, y in epoch_batches(loader)])
                                                 for _ in range(2)]
    for y in ys:
        assert sorted(y.tolist()) == list(range(23))
    assert not torch.equal(ys[0], ys[1]) and not torch.equal(ys[1], ys[2])
    assert loader.epoch == 3 and loader.batch == 0
    # epoch 2's order/augmentation does not depend on having run epochs 0 and 1
    other = DataLoader(ds, 8, train=True, seed=7)
    other.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in epoch_batches(other)]), ys[2])
    # same seed same batches, different seed differs
    a = epoch_batches(DataLoader(ds, 8, train=True, seed=7))
    b = epoch_batches(DataLoader(ds, 8, train=True, seed=8))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a, batches))
    assert not torch.equal(a[0][1], b[0][1])
    # train without augmentation: shuffled, not augmented
    x, y = next(iter(DataLoader(ds, 8, train=True, seed=7, augment=False)))
    assert torch.equal(y, perm[:8]) and torch.equal(x, normalize(ds.images[perm[:8]], ds.mean, ds.std))


def test_loader_drop_last():
    ds = toy_dataset()
    loader = DataLoader(ds, 8, train=True, drop_last=True)
    assert len(loader) == 2
    assert [len(y) for _, y in loader] == [8, 8]
    assert len(DataLoader(ds, 23, train=False, drop_last=True)) == 1
    assert len(DataLoader(ds, 24, train=False, drop_last=True)) == 0


def test_loader_resume_mid_epoch():
    ds = toy_dataset(n=30)
    full = DataLoader(ds, 4, train=True, seed=3)
    full.set_epoch(1)
    expected = epoch_batches(full)  # 8 batches of epoch 1
    assert len(expected) == 8

    run = DataLoader(ds, 4, train=True, seed=3)
    run.set_epoch(1)
    it = iter(run)
    for _ in range(3):
        next(it)
    state = run.state_dict()
    assert state == {"epoch": 1, "batch": 3, "seed": 3}

    resumed = DataLoader(ds, 4, train=True, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the usual call at the top of an epoch keeps the resumed position
    rest = epoch_batches(resumed)
    assert len(rest) == 5
    for (x, y), (ex, ey) in zip(rest, expected[3:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # afterwards the loader moves on to epoch 2, like the uninterrupted one
    assert resumed.state_dict() == {"epoch": 2, "batch": 0, "seed": 3}
    assert torch.equal(torch.cat([y for _, y in resumed]), torch.cat([y for _, y in full]))


# --------------------------------------------------------------------------------------------------
# Device-resident data (the GPU path, exercised on the CPU with resident=True and on "meta")


def slow_reference_epoch(ds, batch_size, seed, epoch, padding=4):
    """One training epoch by hand, image by image: the documented draws (perm, then per batch
    offsets and flips) from the epoch generator, zero padding, crop, mirror, normalise."""
    g = fsg.data.epoch_generator(seed, epoch)
    n = len(ds)
    perm = torch.randperm(n, generator=g)
    mean = torch.tensor(ds.mean).view(3, 1, 1)
    std = torch.tensor(ds.std).view(3, 1, 1)
    out = []
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        offsets = torch.randint(0, 2 * padding + 1, (len(idx), 2), generator=g)
        flip = torch.rand(len(idx), generator=g) < 0.5
        xs = []
        for k, i in enumerate(idx.tolist()):
            img = F.pad(ds.images[i], (padding,) * 4)
            _, h, w = ds.images[i].shape
            dy, dx = int(offsets[k, 0]), int(offsets[k, 1])
            crop = img[:, dy:dy + h, dx:dx + w]
            if flip[k]:
                crop = crop.flip(-1)
            xs.append((crop.float() / 255 - mean) / std)
        out.append((torch.stack(xs), ds.labels[idx]))
    return out


@pytest.mark.parametrize("resident", [False, True])
def test_loader_batches_equal_a_slow_per_image_reference(resident):
    ds = toy_dataset(n=21)
    loader = DataLoader(ds, 8, train=True, seed=5, resident=resident)
    assert loader.resident is resident
    for epoch in range(2):
        got = epoch_batches(loader)
        ref = slow_reference_epoch(ds, 8, 5, epoch)
        assert len(got) == len(ref) == 3
        for (x, y), (rx, ry) in zip(got, ref):
            assert torch.equal(y, ry)
            assert torch.equal(x, rx)  # bit for bit: the same float ops in the same order


def test_resident_loader_equals_the_host_path_in_every_mode():
    ds = toy_dataset(n=30)
    for kw in (dict(train=True), dict(train=True, augment=False), dict(train=False),
               dict(train=True, drop_last=True), dict(train=True, rank=1, world_size=3)):
        a = epoch_batches(DataLoader(ds, 7, seed=2, resident=False, **kw))
        b = epoch_batches(DataLoader(ds, 7, seed=2, resident=True, **kw))
        assert len(a) == len(b) > 0, kw
        assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b)), kw
    # resumed mid-epoch on the resident path: the remaining batches of the uninterrupted epoch
    full = epoch_batches(DataLoader(ds, 4, train=True, seed=3, resident=True))
    run = DataLoader(ds, 4, train=True, seed=3, resident=True)
    it = iter(run)
    next(it), next(it)
    resumed = DataLoader(ds, 4, train=True, seed=0, resident=True)
    resumed.load_state_dict(run.state_dict())
    rest = epoch_batches(resumed)
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(rest, full[2:]))


def test_non_cpu_loader_moves_the_dataset_once_and_batches_stay_on_the_device(monkeypatch):
    ds = toy_dataset(n=20)
    assert not DataLoader(ds, 8, train=True).resident  # the CPU default: unchanged host path
    loader = DataLoader(ds, 8, train=True, seed=1, device="meta")  # any non-CPU device
    assert loader.resident and loader._resident_cache is None  # nothing moved before iterating
    moves = []
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.numel() >= ds.images.numel():
            moves.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    for _ in range(3):  # three epochs
        for x, y in loader:
            assert x.device.type == "meta" and y.device.type == "meta"
            assert x.shape == (len(y), 3, 6, 6) and x.dtype == torch.float32
    assert moves == [ds.images.shape]  # the images went to the device once, not per step
    cached = loader._resident_cache[2]
    next(iter(loader))
    assert loader._resident_cache[2] is cached
    # a replaced dataset tensor is moved again
    ds.images = ds.images.clone()
    next(iter(loader))
    assert loader._resident_cache[2] is not cached and len(moves) == 2
