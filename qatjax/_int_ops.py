"""Integer inference kernels: int8 x int8 -> int32 dot and convolution, then rescale.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference". With input ``x ~ (qx - zx) * sx`` and symmetric weights
``w ~ qw * sw``::

  x @ w ~ sx * sw * (qx @ qw - zx * sum_k qw)

``qx`` is stored as int8: an unsigned 8-bit range ``[0, 255]`` is shifted by -128 (and ``zx``
with it), so every product runs on int8 operands with int32 accumulation.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from qatjax._qarray import QArray


def quantize_input_int8(x, scale, zero_point, qmin: int, qmax: int):
  """Quantizes ``x`` to int8 for an integer kernel: returns ``(qx, zx)`` with ``zx`` int32."""
  shift = 128 if qmax > 127 else 0
  q = jnp.clip(jnp.round(x.astype(jnp.float32) * (1.0 / scale)) + zero_point, qmin, qmax)
  return (q - shift).astype(jnp.int8), (jnp.asarray(zero_point) - shift).astype(jnp.int32)


def kernel_sums(qw, contract_axes) -> jnp.ndarray:
  """``sum_k qw`` over the contracting axes, int32 (precomputed by :func:`qatjax.convert`)."""
  return jnp.sum(qw.astype(jnp.int32), axis=tuple(contract_axes))


def int_dot(qx, zx, qw, kernel_sum, n_contract: int):
  """``qx @ qw - zx * kernel_sum`` in int32, contracting the last ``n_contract`` axes of ``qx``
  with the first ``n_contract`` axes of ``qw``."""
  dims = ((tuple(range(qx.ndim - n_contract, qx.ndim)), tuple(range(n_contract))), ((), ()))
  acc = lax.dot_general(qx, qw, dims, preferred_element_type=jnp.int32)
  return acc - zx * kernel_sum


def int_conv(qx, zx, qw, kernel_sum, *, strides, pads, lhs_dilation, rhs_dilation,
             feature_group_count: int):
  """Integer convolution (NHWC / HWIO). The input is padded with its own zero point, so the
  correction ``zx * kernel_sum`` is the same at every output position."""
  config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation)] + [(0, 0, 0)]
  qx = lax.pad(qx, zx.astype(jnp.int8), config)
  nd = qx.ndim
  dn = lax.conv_dimension_numbers(qx.shape, qw.shape, _dims(nd))
  acc = lax.conv_general_dilated(qx, qw, strides, "VALID", rhs_dilation=rhs_dilation,
                                 dimension_numbers=dn, feature_group_count=feature_group_count,
                                 preferred_element_type=jnp.int32)
  return acc - zx * kernel_sum


def _dims(nd: int):
  spatial = {1: "W", 2: "HW", 3: "DHW"}[nd - 2]
  return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
