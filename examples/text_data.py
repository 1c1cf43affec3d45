"""Byte-level text for language-model examples: the Python standard library's own source files.

Every Python installation ships them, so the examples need no download. Files are split, by
file, into a training and a test set (every ``test_every``-th file in sorted order is test).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

VOCAB = 256  # bytes


def stdlib_sources() -> list[pathlib.Path]:
  """The standard library's top-level ``*.py`` files, sorted (deterministic across machines)."""
  root = pathlib.Path(os.__file__).resolve().parent
  files = sorted(p for p in root.glob("*.py") if p.is_file())
  if not files:
    raise ValueError(f"no Python source files found in {root}")
  return files


def load_text(max_bytes: int, test_every: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """``(train, test)`` uint8 byte arrays of at most ``max_bytes`` each, from stdlib sources."""
  if max_bytes < 1 or test_every < 2:
    raise ValueError(f"need max_bytes >= 1 and test_every >= 2, got {max_bytes}, {test_every}")
  train, test = [], []
  sizes = [0, 0]
  for i, path in enumerate(stdlib_sources()):
    part = 1 if i % test_every == test_every - 1 else 0
    if sizes[part] >= max_bytes:
      continue
    data = path.read_bytes()[: max_bytes - sizes[part]]
    (test if part else train).append(data)
    sizes[part] += len(data)
    if min(sizes) >= max_bytes:
      break
  return (
    np.frombuffer(b"".join(train), np.uint8).copy(),
    np.frombuffer(b"".join(test), np.uint8).copy(),
  )


def windows(data: np.ndarray, seq_len: int, count: int | None = None, *, offset: int = 0):
  """``(inputs, targets)`` int32 arrays ``(n, seq_len)``: consecutive non-overlapping windows,
  the targets shifted by one byte. ``count`` limits the number; ``offset`` skips windows."""
  n = (len(data) - 1) // seq_len
  starts = np.arange(offset, n) * seq_len
  if count is not None:
    starts = starts[:count]
  if len(starts) == 0:
    raise ValueError(f"{len(data)} bytes hold no window of {seq_len} after offset {offset}")
  idx = starts[:, None] + np.arange(seq_len + 1)[None]
  chunk = data[idx].astype(np.int32)
  return chunk[:, :-1], chunk[:, 1:]
