"""Batches from in-memory numpy arrays: shuffled, fixed-size (so a step compiles once)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import numpy as np


def check_arrays(arrays, name: str = "data") -> tuple[np.ndarray, ...]:
  """``arrays`` as a tuple of numpy arrays with one common length (axis 0)."""
  if not isinstance(arrays, (tuple, list)) or not arrays:
    raise ValueError(
      f"{name} must be a tuple of arrays (inputs, labels), got {type(arrays).__name__}"
    )
  arrays = tuple(np.asarray(a) for a in arrays)
  lengths = {a.shape[0] if a.ndim else None for a in arrays}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(
      f"{name} arrays must share their length along axis 0, got shapes {[a.shape for a in arrays]}"
    )
  return arrays


def _check_batch_size(batch_size):
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def iterate_batches(
  arrays: Sequence, batch_size: int, *, rng=None, drop_last: bool = True
) -> Iterator[tuple[np.ndarray, ...]]:
  """Batches ``(x[i], y[i], ...)`` of ``batch_size`` rows from equal-length arrays.

  Args:
    arrays: a tuple of arrays sharing axis 0, e.g. ``(x, y)``.
    batch_size: rows per batch.
    rng: a PRNG key (or int seed) to shuffle the rows; ``None`` keeps their order.
    drop_last: drop the last incomplete batch (keeps every batch the same shape).

  Example:
    >>> import numpy as np
    >>> from qatjax.training import iterate_batches
    >>> x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
    >>> [b[1].tolist() for b in iterate_batches((x, y), 2)]
    [[0, 1], [2, 3]]
  """
  arrays = check_arrays(arrays, "arrays")
  _check_batch_size(batch_size)
  n = arrays[0].shape[0]
  if rng is None:
    order = np.arange(n)
  else:
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    order = np.asarray(jax.random.permutation(rng, n))
  stop = n - n % batch_size if drop_last else n
  for start in range(0, stop, batch_size):
    idx = order[start : start + batch_size]
    yield tuple(a[idx] for a in arrays)


def padded_batches(arrays: Sequence, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
  """Every row once, in order, as ``(*arrays, mask)`` batches of exactly ``batch_size`` rows; the
  last batch is padded with zeros and ``mask`` 0 (for :func:`make_eval_step`)."""
  arrays = check_arrays(arrays, "eval_data")
  _check_batch_size(batch_size)
  n = arrays[0].shape[0]
  for start in range(0, n, batch_size):
    part = tuple(a[start : start + batch_size] for a in arrays)
    k = part[0].shape[0]
    mask = np.ones((batch_size,), np.float32)
    if k < batch_size:
      part = tuple(
        np.concatenate([p, np.zeros((batch_size - k,) + p.shape[1:], p.dtype)]) for p in part
      )
      mask[k:] = 0
    yield part + (mask,)
