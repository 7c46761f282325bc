"""The embedded default: scikit-learn's 8×8 handwritten digits (1,797 images, UCI
"Optical Recognition of Handwritten Digits", CC BY 4.0), shipped inside the package:
nothing is downloaded."""

import importlib.resources

import numpy as np


def load_digits(split: str = "train", *, seed: int = 0, test_size: int = 360,
                dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits as `(images, labels)`: images `(N, 1, 8, 8)` scaled to
    [0, 1], labels `(N,)` int32. A fixed-seed permutation splits off `test_size`
    images for `split="test"`; `split="all"` returns everything unshuffled."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"`split` must be 'train', 'test' or 'all', got {split!r}.")
    with importlib.resources.files("implicit_kit.data").joinpath("digits.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    x = (images.astype(dtype) / 16.0)[:, None]
    y = labels.astype(np.int32)
    if split == "all":
        return x, y
    if not 0 < test_size < len(y):
        raise ValueError(f"`test_size` must be in (0, {len(y)}), got {test_size}.")
    perm = np.random.default_rng(seed).permutation(len(y))
    idx = perm[:test_size] if split == "test" else perm[test_size:]
    return x[idx], y[idx]
