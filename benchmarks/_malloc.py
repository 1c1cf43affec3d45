"""Fixed glibc allocator thresholds for timing runs.

XLA:CPU allocates a step's buffers with ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB at start) with fresh ``mmap`` pages, which fault in again on every step, and raises that
threshold by itself only when a large mmapped block is freed: how fast a step runs then depends
on what ran earlier in the process (measured here: the float LM step of ``bench_peers`` took
35 ms on its own and 25.5 ms after the MNIST sections; qatjax's and qwix's by different amounts).
XLA also puts all of a program's temporaries in one block (tens of MiB for a train step). Fixing
the thresholds up front (blocks up to 1 GiB from the heap, which is neither trimmed nor grown by
less than 256 MiB) gives every variant the heap reuse a long training run reaches anyway,
whatever ran before.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
SETTINGS = {
  "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 1 << 30),
  "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 1 << 30),
  "M_TOP_PAD": (_M_TOP_PAD, 256 << 20),
}


def fix_malloc_thresholds() -> str:
  """Sets :data:`SETTINGS` with glibc's ``mallopt``; returns what was done, for the results'
  header (``"default allocator"`` where there is no glibc or it refuses a value)."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return "default allocator (no glibc mallopt)"
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  refused = [key for key, (param, value) in SETTINGS.items() if mallopt(param, value) != 1]
  if refused:
    return f"default allocator (glibc refused {', '.join(refused)})"
  return "glibc malloc: " + ", ".join(f"{k}={v >> 20} MiB" for k, (_, v) in SETTINGS.items())
