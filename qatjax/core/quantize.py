"""Real integer quantization: float arrays to int8/uint8 and back."""

from __future__ import annotations

import jax.numpy as jnp

from qatjax.core.fake_quant import _prepare, _round, clamp_scale
from qatjax.core.granularity import check_axis, expand_qparam
from qatjax.core.ranges import EPS


def int_dtype(qmin: int, qmax: int):
  """Smallest integer dtype that holds ``[qmin, qmax]`` (int8, uint8, else int32).

  Example:
    >>> int_dtype(-8, 7), int_dtype(0, 255), int_dtype(0, 65535)
    (<class 'jax.numpy.int8'>, <class 'jax.numpy.uint8'>, <class 'jax.numpy.int32'>)
  """
  if qmin >= -128 and qmax <= 127:
    return jnp.int8
  if qmin >= 0 and qmax <= 255:
    return jnp.uint8
  return jnp.int32


def quantize(
  x,
  scale,
  zero_point,
  qmin: int,
  qmax: int,
  *,
  axis: int | None = None,
  group_size: int | None = None,
  dtype=None,
  key=None,
  eps: float = EPS,
):
  """Quantizes ``x`` to integers: ``clip(round(x / scale) + zero_point, qmin, qmax)``.

  Same arguments and numerics as :func:`qatjax.fake_quant`, so that
  ``dequantize(quantize(x, ...), ...) == fake_quant(x, ...)`` exactly.

  Args:
    x: floating-point array.
    scale: step size(s).
    zero_point: zero point(s), or ``None`` for 0.
    qmin: smallest integer.
    qmax: largest integer.
    axis: channel or group axis, or ``None``.
    group_size: group length along ``axis``.
    dtype: integer dtype of the result; default :func:`int_dtype` of the range.
    key: PRNG key for stochastic rounding, or ``None``.
    eps: smallest scale.

  Returns:
    Integer array of ``x``'s shape.

  Example:
    >>> quantize(jnp.array([-1.0, 0.3, 2.0]), 0.01, 0, -128, 127)
    Array([-100,   30,  127], dtype=int8)
  """
  _, xc, s, z, noise, stochastic = _prepare(
    x, scale, zero_point, qmin, qmax, axis, group_size, key, eps
  )
  q = jnp.clip(_round(xc * (1.0 / s), noise, stochastic) + z, qmin, qmax)
  return q.astype(dtype or int_dtype(qmin, qmax))


def broadcast_quantize(x, scale, qmin: int, qmax: int, *, eps: float = EPS):
  """:func:`quantize` with a zero point of 0 and a scale that already broadcasts against ``x``
  (no validation; for the quantized ops). Same grid as :func:`broadcast_fake_quant`."""
  compute = jnp.promote_types(x.dtype, jnp.float32)
  s = clamp_scale(jnp.asarray(scale, jnp.float32), eps).astype(compute)
  q = jnp.clip(jnp.round(x.astype(compute) * (1.0 / s)), qmin, qmax)
  return q.astype(int_dtype(qmin, qmax))


def dequantize(
  q,
  scale,
  zero_point=None,
  *,
  axis: int | None = None,
  group_size: int | None = None,
  dtype=jnp.float32,
  eps: float = EPS,
):
  """Maps integers back to floats: ``(q - zero_point) * scale``.

  Example:
    >>> dequantize(jnp.array([-100, 30], jnp.int8), 0.5)
    Array([-50.,  15.], dtype=float32)
  """
  q = jnp.asarray(q)
  axis = check_axis(axis, q.ndim)
  if zero_point is None:
    zero_point = jnp.zeros_like(jnp.asarray(scale, jnp.float32))
  s = clamp_scale(expand_qparam(scale, q.shape, axis, group_size, "scale"), eps)
  z = expand_qparam(zero_point, q.shape, axis, group_size, "zero_point")
  return ((q.astype(jnp.float32) - z) * s).astype(dtype)
