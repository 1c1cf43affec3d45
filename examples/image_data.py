"""Small datasets for examples, tests and benchmarks: MNIST (IDX files) and scikit-learn digits.

Images are returned as float32 in ``[0, 1]`` with shape ``(N, H, W, 1)`` (channels-last, ready
for ``QConv``) and labels as int32.
"""

from __future__ import annotations

import gzip
import os
from typing import NamedTuple

import numpy as np

MNIST_FILES = {
  "train_images": ("train-images-idx3-ubyte.gz", 0x00000803, (60000, 28, 28)),
  "train_labels": ("train-labels-idx1-ubyte.gz", 0x00000801, (60000,)),
  "test_images": ("t10k-images-idx3-ubyte.gz", 0x00000803, (10000, 28, 28)),
  "test_labels": ("t10k-labels-idx1-ubyte.gz", 0x00000801, (10000,)),
}


class Dataset(NamedTuple):
  """Train and test splits as numpy arrays."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def read_idx(path: str, magic: int, shape: tuple[int, ...]) -> np.ndarray:
  """Reads one gzip-compressed IDX file, checking its magic number, dims and size.

  Raises:
    ValueError: naming the file when it is missing, not gzip, or has a wrong header or length.
  """
  if not os.path.isfile(path):
    raise ValueError(f"MNIST file not found: {path}")
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path} is not a readable gzip file: {e}") from None
  ndim = len(shape)
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its IDX header")
  got_magic = int.from_bytes(data[:4], "big")
  if got_magic != magic:
    raise ValueError(f"{path} has IDX magic number {got_magic:#010x}, expected {magic:#010x}")
  dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  if dims != shape:
    raise ValueError(f"{path} has dimensions {dims}, expected {shape}")
  if len(data) != header + int(np.prod(shape)):
    raise ValueError(
      f"{path} holds {len(data) - header} data bytes, expected "
      f"{int(np.prod(shape))} for dimensions {shape}"
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_mnist(data_dir: str) -> Dataset:
  """Loads MNIST from the four standard IDX ``.gz`` files in ``data_dir``.

  Args:
    data_dir: folder with ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
      ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.

  Returns:
    A :class:`Dataset` with images ``(N, 28, 28, 1)`` in ``[0, 1]``.

  Raises:
    ValueError: naming the file that is missing or corrupt (magic number, dims, length).

  Example:
    >>> load_mnist("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: MNIST file not found: /nonexistent/train-images-idx3-ubyte.gz
  """
  arrays = {
    k: read_idx(os.path.join(data_dir, fname), magic, shape)
    for k, (fname, magic, shape) in MNIST_FILES.items()
  }
  img = lambda a: (a.astype(np.float32) / 255.0)[..., None]
  for k in ("train_labels", "test_labels"):
    if arrays[k].max() > 9:
      raise ValueError(f"{os.path.join(data_dir, MNIST_FILES[k][0])} has labels > 9")
  return Dataset(
    img(arrays["train_images"]),
    arrays["train_labels"].astype(np.int32),
    img(arrays["test_images"]),
    arrays["test_labels"].astype(np.int32),
    "mnist",
  )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images), split into train and test.

  Example:
    >>> d = load_digits()
    >>> d.x_train.shape[1:], d.x_train.dtype, int(d.y_train.max())
    ((8, 8, 1), dtype('float32'), 9)
  """
  from sklearn.datasets import load_digits as sk_digits  # optional dependency

  bunch = sk_digits()
  x = (bunch.images.astype(np.float32) / 16.0)[..., None]
  y = bunch.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(len(x) * test_fraction)
  test, train = order[:n_test], order[n_test:]
  return Dataset(x[train], y[train], x[test], y[test], "digits")
