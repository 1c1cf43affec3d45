"""Integer products on bfloat16 matrix units, exactly.

An int8 x int8 product is an integer of at most 15 bits, and bfloat16 holds every integer up to
256 exactly. A ``dot_general`` of integer-valued bfloat16 operands that accumulates in float32
(``preferred_element_type=float32``) is therefore the int32 product *exactly* as long as every
partial sum stays at or below ``2**24`` (float32's last exact integer), i.e. when
``K * max|qx| * max|qw| <= 2**24`` for a contraction of length ``K``: ``K <= 1032`` for 8-bit
weights, ``K <= 16384`` for 4-bit ones (activations shifted into int8, as the kernels do).

Where bfloat16 matrix instructions exist and int8 ones are slow (XLA:CPU on x86 with
``avx512_bf16`` / ``amx_bf16``: a 256 x 784 x 512 product takes 0.64 ms in bfloat16, 0.91 ms in
int8 and 1.08 ms in float32 on the 2-core AVX-512 machine this was measured on), the integer
kernels compute their int32 sums this way; the result is the same integers either way.
"""

from __future__ import annotations

import functools
import math
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


def bf16_matmul_fast() -> bool:
  """Whether integer products run faster as exact bfloat16 products here: the default backend
  is a CPU with bfloat16 matrix instructions (``avx512_bf16`` or ``amx_bf16``). Elsewhere
  (GPUs, TPUs, other CPUs) the kernels keep int8 ``dot_general``.

  Example:
    >>> from qatjax.core.exact_dot import bf16_matmul_fast
    >>> isinstance(bf16_matmul_fast(), bool)
    True
  """
  return jax.default_backend() == "cpu" and _cpu_has_bf16_matmul()


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
