"""Readers for the standard local files of MNIST, Fashion-MNIST, CIFAR-10 and SVHN.

Nothing is downloaded: point `root` at a directory holding the files as their
publishers distribute them. A missing directory or file is an error that names the
directory and every file expected there.
"""

import gzip
import pathlib
import pickle
import struct

import numpy as np


SPLITS = ("train", "test")

_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_SVHN = {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset directory or one of its files is missing (the message names them)."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


def _root(root, dataset: str, expected: list[str]) -> pathlib.Path:
    if root is None:
        raise DatasetNotFoundError(
            f"{dataset}: no data directory given (set `data.dir`); it must hold "
            f"{', '.join(expected)}."
        )
    path = pathlib.Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{dataset}: the data directory {str(path)!r} does not exist; it must hold "
            f"{', '.join(expected)}. Nothing is downloaded: put the files there."
        )
    return path


def _find(path: pathlib.Path, dataset: str, names: tuple[str, ...],
          suffixes: tuple[str, ...] = ("",)) -> list[pathlib.Path]:
    found, missing = [], []
    for name in names:
        for suffix in suffixes:
            if (path / (name + suffix)).is_file():
                found.append(path / (name + suffix))
                break
        else:
            missing.append(name + (" (or .gz)" if ".gz" in suffixes else ""))
    if missing:
        raise DatasetNotFoundError(
            f"{dataset}: missing in {str(path)!r}: {', '.join(missing)}."
        )
    return found


def read_idx(path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number).")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{str(path)!r}: header says shape {shape} but the file holds {data.size} "
            "values (truncated?)."
        )
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def _load_idx(root, split: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    _check_split(split)
    expected = [n + "[.gz]" for s in SPLITS for n in _IDX[s]]
    path = _root(root, dataset, expected)
    images, labels = _find(path, dataset, _IDX[split], ("", ".gz"))
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{dataset}: expected images (N, H, W) and labels (N,), got {x.shape} and "
            f"{y.shape}."
        )
    return (x.astype(np.float32) / 255.0)[:, None], y.astype(np.int32)


def load_mnist(root, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from its IDX files in `root` (`train-images-idx3-ubyte[.gz]`, ...):
    images `(N, 1, 28, 28)` in [0, 1], labels `(N,)` int32."""
    return _load_idx(root, split, "MNIST")


def load_fashion_mnist(root, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (same IDX files and names as MNIST)."""
    return _load_idx(root, split, "Fashion-MNIST")


def load_cifar10(root, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the python batches (`data_batch_1..5`, `test_batch`) in `root` or
    in `root/cifar-10-batches-py`: images `(N, 3, 32, 32)` in [0, 1], labels int32."""
    _check_split(split)
    expected = list(_CIFAR["train"] + _CIFAR["test"])
    path = _root(root, "CIFAR-10", expected)
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    xs, ys = [], []
    for file in _find(path, "CIFAR-10", _CIFAR[split]):
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"CIFAR-10: {str(file)!r} has no 'data'/'labels' entries.")
        xs.append(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, np.int32))
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


def load_svhn(root, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """SVHN (cropped digits) from `train_32x32.mat` / `test_32x32.mat` in `root`:
    images `(N, 3, 32, 32)` in [0, 1], labels int32 with the file's 10 mapped to 0."""
    _check_split(split)
    path = _root(root, "SVHN", list(_SVHN["train"] + _SVHN["test"]))
    (file,) = _find(path, "SVHN", _SVHN[split])
    from scipy.io import loadmat

    mat = loadmat(file)
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"SVHN: {str(file)!r} has no 'X'/'y' arrays.")
    x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.float32) / 255.0
    y = mat["y"].reshape(-1).astype(np.int32) % 10
    return x, y
