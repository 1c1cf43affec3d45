"""Integer inference kernels: int8 x int8 -> int32 dot and convolution, then rescale.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference". With input ``x ~ (qx - zx) * sx`` and symmetric weights
``w ~ qw * sw``::

  x @ w ~ sx * sw * (qx @ qw - zx * sum_k qw)

``qx`` is stored as int8: an unsigned 8-bit range ``[0, 255]`` is shifted by -128 (and ``zx``
with it), so every product runs on int8 operands with int32 accumulation.
"""

from __future__ import annotations

import math

import jax
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


# Up to this many input rows, a dense layer computes ``(W @ x.T).T``: with the weights as the left
# operand XLA:CPU streams them instead of packing them per call (1.3-1.5x faster at 8-32 rows of
# a 4096 x 4096 layer; no gain from 256 rows).
SWAP_ROWS = 64


def int_dot_kernel(qx, zx, qa: QArray, kernel_sum):
  """``qx @ q - zx * kernel_sum`` in int32 for a 2-D ``(K, N)`` :class:`QArray` kernel ``q``.

  A kernel stored as ``(N, K)`` (``perm=(1, 0)``, what :func:`qatjax.convert` writes) is read in
  that order, contracting the minor dimension of both operands: no transpose and no repacking of
  the weights per call. Packed 4-bit ``(N, K)`` kernels with an even ``K`` are not interleaved
  either: the low nibbles hold the even ``k`` and the high nibbles the odd ``k``, so the product is
  ``qx[..., 0::2] @ low.T + qx[..., 1::2] @ high.T`` (the same int32 sums). For few rows the
  product is computed as ``(q.T @ qx.T).T`` (see ``SWAP_ROWS``), and a single row is padded to
  two: XLA:CPU lowers a one-row int8 dot to an int32 one that converts the whole kernel (20-50x
  slower). Every variant gives the same int32 values.
  """
  if qa.perm != (1, 0):
    return int_dot(qx, zx, qa.unpack(), kernel_sum, 1)
  n, k = qa.stored_shape
  lead = qx.shape[:-1]
  x = qx.reshape(-1, k)
  rows = x.shape[0] if isinstance(x.shape[0], int) else None  # None: symbolic (jax.export)
  if rows == 1:
    x = jnp.concatenate([x, jnp.zeros_like(x)])
  swap = rows is not None and rows <= SWAP_ROWS
  nt = (((1,), (1,)), ((), ()))

  def dot(a, w):  # a (m, kk) . w (n, kk) over kk -> (m, n), or (n, m) when swapped
    return lax.dot_general(w, a, nt, preferred_element_type=jnp.int32) if swap else \
        lax.dot_general(a, w, nt, preferred_element_type=jnp.int32)

  if qa.packed and k % 2 == 0:
    lo, hi = int4_nibbles(qa.values)
    acc = dot(x[:, 0::2], lo.reshape(n, k // 2)) + dot(x[:, 1::2], hi.reshape(n, k // 2))
  else:
    acc = dot(x, qa.stored())
  if swap:  # the barrier keeps XLA from folding the transpose back into the dot
    acc = lax.optimization_barrier(acc).T
  if rows == 1:
    acc = acc[:1]
  return acc.reshape(lead + (n,)) - zx * kernel_sum


def int4_nibbles(packed):
  """Signed low and high nibbles of packed 4-bit values, int8 (sign-extended by shifts)."""
  p = lax.bitcast_convert_type(jnp.asarray(packed, jnp.uint8), jnp.int8)
  four = jnp.int8(4)
  return lax.shift_right_arithmetic(lax.shift_left(p, four), four), \
      lax.shift_right_arithmetic(p, four)


# Largest contraction size whose float32 sums of (qx - zx) * qw are exact integers:
# |qx - zx| <= 255, |qw| <= 128, so every partial sum is an integer of magnitude < 2**24.
EXACT_F32_K = (2**24 - 1) // (255 * 128)  # 514
# Convolutions with this many input channels (per group) or fewer -- an image model's first
# layer, depthwise layers -- are evaluated exactly in float32 on CPU (see int_conv).
FEW_CHANNELS = 4


def int_conv(qx, zx, qw, kernel_sum, *, strides, pads, lhs_dilation, rhs_dilation,
             feature_group_count: int):
  """Integer convolution (NHWC / HWIO). The input is padded with its own zero point, so the
  correction ``zx * kernel_sum`` is the same at every output position.

  Returns ``conv(qx, qw) - zx * kernel_sum``: int32, or, for few-channel kernels on CPU (at most
  ``FEW_CHANNELS`` input channels per group and at most ``EXACT_F32_K`` products per output),
  the same integers as float32. That case computes ``conv(float(qx - zx), float(qw))``, whose
  every partial sum is an integer below 2**24, hence exact: bitwise the int32 result. XLA:CPU
  fuses such a float conv with its rescale / ReLU / pooling / requantization, while an int8 conv
  with a handful of input channels is slower than its float counterpart and writes an int32
  tensor that needs another pass (measured: first layer of an MNIST CNN at batch 256, about 25 ms
  -> 3 ms).
  """
  k = math.prod(qw.shape[:-1])
  if qw.shape[-2] <= FEW_CHANNELS and k <= EXACT_F32_K and jax.default_backend() == "cpu":
    x = qx.astype(jnp.float32) - zx.astype(jnp.float32)  # padding value 0 == zero point
    dn = lax.conv_dimension_numbers(x.shape, qw.shape, _dims(x.ndim))
    return lax.conv_general_dilated(x, qw.astype(jnp.float32), strides,
                                    [(int(lo), int(hi)) for lo, hi in pads],
                                    lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                    dimension_numbers=dn, feature_group_count=feature_group_count,
                                    precision=lax.Precision.HIGHEST)
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
