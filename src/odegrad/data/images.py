"""Image classification data that works offline: scikit-learn's digits, MNIST from IDX files."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Images", "load_digits", "load_mnist", "default_mnist_dir", "read_idx", "MNIST_FILES"]

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass
class Images:
    """Standardised images (N, 1, H, W) as float32 and labels (N,) as int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _standardise(x_train: np.ndarray, x_test: np.ndarray, scale: float) -> tuple[Tensor, Tensor]:
    """Scale pixels to [0, 1], then centre and normalise with the training set's statistics."""
    # np.array copies: a memory-mapped or read-only array must not back the tensors
    x_train = torch.from_numpy(np.array(x_train, dtype=np.float32)) / scale
    x_test = torch.from_numpy(np.array(x_test, dtype=np.float32)) / scale
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Images:
    """scikit-learn's 1797 handwritten digits (8x8, 16 grey levels), a stratified split.

    The split depends only on `split_seed`, so runs with different training seeds share it.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = digits.images[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, stratify=digits.target,
        random_state=split_seed,
    )
    x_train, x_test = _standardise(x_train, x_test, 16.0)
    return Images(x_train, torch.as_tensor(y_train), x_test, torch.as_tensor(y_test))


def default_mnist_dir() -> Path:
    """$ODEGRAD_DATA/mnist when ODEGRAD_DATA is set, else ~/.cache/odegrad/mnist."""
    root = os.environ.get("ODEGRAD_DATA")
    return Path(root) / "mnist" if root else Path.home() / ".cache" / "odegrad" / "mnist"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format: magic 0x0000_08_ND, big-endian dims, uint8 data), gzip ok."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(data) - offset != count:
        raise ValueError(
            f"{path} is truncated or corrupt: header says {dims} ({count} bytes), file holds "
            f"{len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def load_mnist(directory: str | Path | None = None) -> Images:
    """MNIST (28x28) read from the four IDX files in `directory` (default: default_mnist_dir()).

    Nothing is downloaded: when a file is missing the error says which and where to put it.
    """
    directory = Path(directory) if directory is not None else default_mnist_dir()
    found = {key: _find(directory, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST files not found in {directory}: missing {', '.join(missing)} (plain or "
            f".gz). odegrad does not download data: copy the four IDX files "
            f"({', '.join(MNIST_FILES.values())}) into that folder, or pass --data-dir DIR, or "
            f"set ODEGRAD_DATA so that $ODEGRAD_DATA/mnist holds them."
        )
    arrays = {key: read_idx(path) for key, path in found.items()}
    x_train, x_test = _standardise(arrays["x_train"][:, None], arrays["x_test"][:, None], 255.0)
    y_train = torch.as_tensor(arrays["y_train"].astype(np.int64))
    y_test = torch.as_tensor(arrays["y_test"].astype(np.int64))
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise ValueError(f"MNIST files in {directory} disagree on the number of examples")
    return Images(x_train, y_train, x_test, y_test)
