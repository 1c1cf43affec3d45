"""Helpers shared by the tests: bitwise comparison of pytrees, scripts on forced CPU devices."""

import os
import subprocess
import sys

import jax
import numpy as np


def assert_bitwise(a, b):
  """``a`` and ``b`` have the same tree, dtypes and bits."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    u, v = np.asarray(u), np.asarray(v)
    assert u.dtype == v.dtype and np.array_equal(u, v), jax.tree_util.keystr(path)


def run_on_cpu_devices(script: str, devices: int, done: str, timeout: int = 400) -> str:
  """Runs ``script`` in a new process with ``devices`` CPU devices (the count must be set before
  jax is imported); asserts it succeeded and printed ``done``; returns its stdout."""
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0 and done in proc.stdout, proc.stdout + proc.stderr[-5000:]
  return proc.stdout
