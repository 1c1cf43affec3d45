"""Integer ranges and (scale, zero point) from a float range."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

EPS = 2.0**-23  # float32 machine epsilon; PyTorch's observer eps.


def check_bits(bits, name: str = "bits") -> int:
  """Returns ``bits`` if it is an int in 2..8, else raises ``ValueError``."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"{name} must be an int in 2..8, got {bits!r}")
  return bits


def check_qrange(qmin, qmax) -> tuple[int, int]:
  """Validates a static integer range ``qmin < qmax``."""
  for name, v in (("qmin", qmin), ("qmax", qmax)):
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"{name} must be a Python int, got {v!r}")
  if qmin >= qmax:
    raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
  return qmin, qmax


def qrange(bits: int, *, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
  """Integer range ``(qmin, qmax)`` for a bit width.

  Args:
    bits: 2..8.
    signed: two's complement range (``[-2**(b-1), 2**(b-1) - 1]``) or unsigned (``[0, 2**b - 1]``).
    narrow: drop the most negative value (signed, making the range symmetric) or the largest
      value (unsigned).

  Returns:
    ``(qmin, qmax)`` as Python ints.

  Example:
    >>> qrange(8)
    (-128, 127)
    >>> qrange(4, signed=False)
    (0, 15)
    >>> qrange(8, narrow=True)
    (-127, 127)
  """
  check_bits(bits)
  if signed:
    return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
  return 0, 2**bits - 1 - int(narrow)


def _reciprocal(steps) -> np.float32:
  return np.float32(1.0) / np.float32(steps)


def scale_zero_point(min_val, max_val, qmin: int, qmax: int, *, symmetric: bool, eps: float = EPS):
  """Scale and zero point that map ``[min_val, max_val]`` onto ``[qmin, qmax]``.

  The range is first widened to contain 0 so that zero is exactly representable (Jacob et al.
  2018). Formulas are PyTorch's observers':

  * symmetric: ``s = max(-min, max) / ((qmax - qmin) / 2)``, ``z = 0`` for a signed range and the
    mid-point ``(qmin + qmax + 1) // 2`` for an unsigned one;
  * affine: ``s = (max - min) / (qmax - qmin)``, ``z = clip(qmin - round(min / s), qmin, qmax)``.

  ``s`` is clamped to at least ``eps``, so an all-zero range never gives a zero or NaN scale.

  Args:
    min_val: array of range minima (any shape: scalar per tensor, vector per channel).
    max_val: array of range maxima, same shape.
    qmin: integer range minimum.
    qmax: integer range maximum.
    symmetric: symmetric or affine quantization.
    eps: smallest scale.

  Returns:
    ``(scale, zero_point)``, float32 arrays of the input shape; the zero point holds integers.

  Example:
    >>> s, z = scale_zero_point(jnp.float32(-1.0), jnp.float32(3.0), 0, 255, symmetric=False)
    >>> float(s), float(z)
    (0.01568627543747425, 64.0)
  """
  check_qrange(qmin, qmax)
  min_neg = jnp.minimum(jnp.asarray(min_val, jnp.float32), 0.0)
  max_pos = jnp.maximum(jnp.asarray(max_val, jnp.float32), 0.0)
  # Multiplying by the float32 reciprocal of the step count (what XLA makes of a division by a
  # constant in a compiled program anyway) gives every program, compiled or eager, one value.
  if symmetric:
    scale = jnp.maximum(-min_neg, max_pos) * _reciprocal((qmax - qmin) / 2)
    scale = jnp.maximum(scale, eps)
    zp = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    zero_point = jnp.full_like(scale, zp)
  else:
    scale = jnp.maximum((max_pos - min_neg) * _reciprocal(qmax - qmin), eps)
    zero_point = jnp.clip(qmin - jnp.round(min_neg / scale), qmin, qmax)
  return scale, zero_point
