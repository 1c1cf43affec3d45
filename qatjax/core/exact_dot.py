"""Integer products on bfloat16 matrix units, exactly.

An int8 x int8 product is an integer of at most 15 bits, and bfloat16 holds every integer up to
256 exactly. A ``dot_general`` of integer-valued bfloat16 operands that accumulates in float32
(``preferred_element_type=float32``) is therefore the int32 product *exactly* as long as every
partial sum stays at or below ``2**24`` (float32's last exact integer), i.e. when
``K * max|qx| * max|qw| <= 2**24`` for a contraction of length ``K``: ``K <= 1032`` for 8-bit
weights, ``K <= 16384`` for 4-bit ones (activations shifted into int8, as the kernels do).

Where bfloat16 products are fast (XLA:CPU on some x86 CPUs with ``avx512_bf16`` /
``amx_bf16``: a 256 x 784 x 512 product takes 0.64 ms in bfloat16, 0.91 ms in int8 and 1.08 ms
in float32 on a 2-core AMD EPYC), the integer kernels compute their int32 sums this way; the
result is the same integers either way. The instruction set alone does not decide it: on a
2-core Intel Xeon with ``avx512_bf16`` the same product takes 1.38 ms in bfloat16 against
0.83 ms in float32. So :func:`bf16_matmul_fast` times the two once per process, and
``QATJAX_BF16_MATMUL=1`` / ``0`` sets the answer instead (the programs traced then no longer
depend on a timing: processes of a multi-host job must trace the same programs).
"""

from __future__ import annotations

import functools
import math
import os
import pathlib

import jax
import jax.numpy as jnp
from jax import lax

EXACT_LIMIT = 2**24  # float32 holds every integer up to here


@functools.cache
def _cpu_has_bf16_matmul() -> bool:
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return False
  flags = set()
  for line in text.splitlines():
    if line.startswith("flags"):
      flags.update(line.split(":", 1)[1].split())
      break
  return bool(flags & {"avx512_bf16", "amx_bf16"})


BF16_MATMUL_ENV = "QATJAX_BF16_MATMUL"  # "1" / "0": overrides the timing
FAST_RATIO = 0.8  # bfloat16 counts as fast when it takes at most this share of float32's time
_PROBE_SHAPE = (256, 512, 512)  # (M, K, N) of the timed products: a dense layer at batch 256


def best_time_ratio(run_a, run_b, *, rounds: int = 15, warmup: int = 3) -> float:
  """The best time of ``run_a()`` over the best time of ``run_b()`` (functions of no arguments
  that return when their work is done), timed interleaved: ``warmup`` untimed rounds, then
  ``rounds`` timed ones.

  Example:
    >>> import time
    >>> from qatjax.core.exact_dot import best_time_ratio
    >>> best_time_ratio(lambda: time.sleep(0.002), lambda: time.sleep(0.001), rounds=3) > 1
    True
  """
  import time

  best = [math.inf, math.inf]
  for i in range(warmup + rounds):
    for j, run in enumerate((run_a, run_b)):
      t0 = time.perf_counter()
      run()
      if i >= warmup:
        best[j] = min(best[j], time.perf_counter() - t0)
  return best[0] / best[1]


@functools.cache
def bf16_over_f32_time() -> float:
  """The time of a ``_PROBE_SHAPE`` bfloat16 product (float32 accumulation) over that of the
  float32 product on the default device (:func:`best_time_ratio` of 15 rounds), measured once
  per process (about 0.2 s with compilation). Safe to call while a function is being traced.

  Example:
    >>> from qatjax.core.exact_dot import bf16_over_f32_time
    >>> bf16_over_f32_time() > 0
    True
  """
  import ml_dtypes
  import numpy as np

  m, k, n = _PROBE_SHAPE
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  runs = []
  with jax.ensure_compile_time_eval():  # concrete arrays and calls, even inside a trace
    for a, b in ((x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16)), (x, w)):
      a, b = jax.device_put(a), jax.device_put(b)
      product = jax.jit(lambda a, b: lax.dot(a, b, preferred_element_type=jnp.float32))
      compiled = product.lower(a, b).compile()
      runs.append(lambda c=compiled, a=a, b=b: c(a, b).block_until_ready())
    return best_time_ratio(*runs)


def bf16_matmul_fast() -> bool:
  """Whether integer products run faster as exact bfloat16 products here: the default backend
  is a CPU with bfloat16 matrix instructions (``avx512_bf16`` or ``amx_bf16``) on which a
  bfloat16 product takes at most ``FAST_RATIO`` of the float32 one's time
  (:func:`bf16_over_f32_time`), or the environment variable ``QATJAX_BF16_MATMUL`` is ``"1"``
  (``"0"``: never). Elsewhere (GPUs, TPUs, other CPUs) the kernels keep int8 ``dot_general``.
  Either way the integer kernels compute the same integers; the answer chooses their speed and
  whether ``qat_forward("auto")`` trains on the integer forward.

  Raises:
    ValueError: ``QATJAX_BF16_MATMUL`` set to anything but ``"0"`` or ``"1"``.

  Example:
    >>> from qatjax.core.exact_dot import bf16_matmul_fast
    >>> isinstance(bf16_matmul_fast(), bool)
    True
  """
  forced = os.environ.get(BF16_MATMUL_ENV)
  if forced is not None:
    if forced not in ("0", "1"):
      raise ValueError(f"{BF16_MATMUL_ENV} must be '0' or '1' (or unset), got {forced!r}")
    return forced == "1"
  if jax.default_backend() != "cpu" or not _cpu_has_bf16_matmul():
    return False
  return bf16_over_f32_time() <= FAST_RATIO


def exact_in_bf16(k: int, amax_lhs: int, amax_rhs: int) -> bool:
  """Whether a contraction of length ``k`` of integers of magnitude at most ``amax_lhs`` and
  ``amax_rhs`` is exact in bfloat16 with float32 accumulation.

  Example:
    >>> from qatjax.core.exact_dot import exact_in_bf16
    >>> exact_in_bf16(1024, 128, 127), exact_in_bf16(1040, 128, 127), exact_in_bf16(4096, 128, 8)
    (True, False, True)
  """
  return max(amax_lhs, amax_rhs) <= 256 and k * amax_lhs * amax_rhs <= EXACT_LIMIT


def int_dot_general(qx, qw, dimension_numbers, *, bf16: bool, dtype=jnp.int32):
  """``lax.dot_general`` of two int8 arrays as int32: through bfloat16 (exact; see the module
  docstring: the caller checks :func:`exact_in_bf16`) or as an int8 product. ``dtype=float32``
  returns the same integers as float32 (the caller checks that they are below ``2**24``):
  the bfloat16 product's own output, no conversion pass.

  Example:
    >>> import jax.numpy as jnp
    >>> from qatjax.core.exact_dot import int_dot_general
    >>> qx = jnp.array([[127, -128, 3]], jnp.int8)
    >>> qw = jnp.array([[127], [127], [-5]], jnp.int8)
    >>> dims = (((1,), (0,)), ((), ()))
    >>> int_dot_general(qx, qw, dims, bf16=True), int_dot_general(qx, qw, dims, bf16=False)
    (Array([[-142]], dtype=int32), Array([[-142]], dtype=int32))
  """
  if not bf16:
    acc = lax.dot_general(qx, qw, dimension_numbers, preferred_element_type=jnp.int32)
    return acc.astype(dtype)
  acc = lax.dot_general(
    qx.astype(jnp.bfloat16),
    qw.astype(jnp.bfloat16),
    dimension_numbers,
    preferred_element_type=jnp.float32,
  )
  return acc.astype(dtype)


def contracted_length(shape, axes) -> int:
  """The number of terms each output of a contraction over ``axes`` of ``shape`` sums."""
  return math.prod(shape[a] for a in axes)
