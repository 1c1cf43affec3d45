"""Integer inference kernels: int8 x int8 -> int32 dot and convolution, then rescale.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference". With input ``x ~ (qx - zx) * sx`` and symmetric weights
``w ~ qw * sw``::

  x @ w ~ sx * sw * (qx @ qw - zx * sum_k qw)

``qx`` is stored as int8: an unsigned 8-bit range ``[0, 255]`` is shifted by -128 (and ``zx``
with it), so every product runs on int8 operands with int32 accumulation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from qatjax.core.exact_dot import bf16_matmul_fast, exact_in_bf16, int_dot_general
from qatjax.core.qarray import storage_bits, unpack_bits


def _int8_shift(qmax: int) -> int:
  """What :func:`quantize_input_int8` subtracts to bring ``[qmin, qmax]`` into int8."""
  return 128 if qmax > 127 else 0


def int8_input_magnitude(qmin: int, qmax: int) -> int:
  """The largest ``|qx|`` :func:`quantize_input_int8` produces for the range ``[qmin, qmax]``."""
  shift = _int8_shift(qmax)
  return max(abs(qmin - shift), abs(qmax - shift))


def quantize_input_int8(x, scale, zero_point, qmin: int, qmax: int):
  """Quantizes ``x`` to int8 for an integer kernel: returns ``(qx, zx)`` with ``zx`` int32."""
  shift = _int8_shift(qmax)
  q = jnp.clip(jnp.round(x.astype(jnp.float32) * (1.0 / scale)) + zero_point, qmin, qmax)
  return (q - shift).astype(jnp.int8), (jnp.asarray(zero_point) - shift).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DotLayout:
  """A ``dot_general`` of an activation ``lhs`` and a weight ``rhs`` as a batched matmul
  ``(B, M, K) x (B, N, K) -> (B, M, N)``.

  ``B`` collects the batch dimensions, ``M`` the activation's free dimensions, ``N`` the weight's
  free dimensions and ``K`` the contracted ones, the group axis (if any) last. ``rhs_perm`` is the
  order in which :func:`qatjax.convert` stores a weight (``QArray.perm``): the weight is then read
  as ``(B, N, K)`` with no transpose (the layout XLA:CPU's int8 matmul reads fastest). The output
  is ``dot_general``'s: batch, then ``lhs`` free, then ``rhs`` free dimensions.
  """

  lhs_perm: tuple[int, ...]
  rhs_perm: tuple[int, ...]
  b: int
  m: int
  n: int
  k: int
  out_shape: tuple[int, ...]

  @classmethod
  def of(cls, lhs_shape, rhs_shape, dimension_numbers, group_axis=None) -> DotLayout:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
    r_contract = sorted(rc, key=lambda a: (a == group_axis, a))  # group axis innermost
    l_contract = [lc[rc.index(a)] for a in r_contract]
    l_free = [a for a in range(len(lhs_shape)) if a not in lc and a not in lb]
    r_free = [a for a in range(len(rhs_shape)) if a not in rc and a not in rb]
    size = lambda shape, axes: math.prod(shape[a] for a in axes)
    out = (
      tuple(lhs_shape[a] for a in lb)
      + tuple(lhs_shape[a] for a in l_free)
      + tuple(rhs_shape[a] for a in r_free)
    )
    return cls(
      tuple(lb) + tuple(l_free) + tuple(l_contract),
      tuple(rb) + tuple(r_free) + tuple(r_contract),
      size(lhs_shape, lb),
      size(lhs_shape, l_free),
      size(rhs_shape, r_free),
      size(rhs_shape, rc),
      out,
    )

  def lhs3(self, x):
    """An activation as ``(B, M, K)``."""
    return jnp.transpose(x, self.lhs_perm).reshape(self.b, self.m, self.k)

  def rhs3(self, w):
    """A weight in its logical order as ``(B, N, K)``."""
    return jnp.transpose(w, self.rhs_perm).reshape(self.b, self.n, self.k)

  def lhs_param(self, p):
    """A parameter of the activation (1 along every contracted axis, per row or per tensor) as
    ``(B, M, 1)``, or a scalar."""
    p = jnp.asarray(p)
    if p.size == 1:
      return p.reshape(())
    return jnp.transpose(p, self.lhs_perm).reshape(self.b, self.m, 1)

  def rhs_param(self, p):
    """A parameter of the weight (1 along contracted axes but the groups', per channel) as
    ``(B, N, G)`` (``G`` = 1, or the number of groups), or a scalar."""
    p = jnp.asarray(p)
    if p.size == 1:
      return p.reshape(())
    return jnp.transpose(p, self.rhs_perm).reshape(self.b, self.n, -1)

  def out(self, y3):
    """A ``(B, M, N)`` result in ``dot_general``'s output shape."""
    return y3.reshape(self.out_shape)


def rescaled(v, factors):
  """``v * (factors[0] * factors[1] * ...)``: an integer kernel's last step, one expression shared
  by the converted model and the training forward (``qatjax.ops.product.integer_forward``), so
  that XLA fuses it with what follows (e.g. a bias add, into a multiply-add) the same way in both.

  Example:
    >>> rescaled(jnp.array([2.0, 4.0]), (jnp.float32(0.5), jnp.array([1.0, 0.25])))
    Array([1. , 0.5], dtype=float32)
  """
  if not factors:
    return v
  m = factors[0]
  for f in factors[1:]:
    m = m * f
  return v * m


def int_matmul(qx3, zx3, w3, kernel_sum3):
  """``(B, M, K) x (B, N, K) -> (B, M, N)`` int32, minus ``zx * kernel_sum``."""
  acc = lax.dot_general(qx3, w3, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.int32)
  return acc - zx3 * kernel_sum3


def int_matmul_grouped(
  qx3, zx3, qw3, scale3, group_size: int, grouped_len: int, bf16: bool = False
):
  """Per-group weights: ``sum_g scale_g * (qx_g . qw_g - zx * sum qw_g)`` in float32.

  With ``bf16`` the int32 group products are computed on bfloat16 matrix units (the same
  integers: :func:`qatjax.core.exact_dot.int_dot_general`; the caller checks that they are exact).

  ``qx3`` is ``(B, M, K)`` and ``qw3`` ``(B, N, K)``, where ``K`` flattens the contracted axes
  with the grouped one (of length ``grouped_len``) innermost; ``scale3`` is ``(B, N, G)``. Both
  operands are padded with zeros to whole groups (a zero weight adds nothing to the product or to
  its zero-point sum), so a short last group works.
  """
  k = qx3.shape[-1]
  groups = scale3.shape[-1]
  inner, outer = grouped_len, k // grouped_len
  pad = groups * group_size - inner

  def split(a):
    a = a.reshape(a.shape[:2] + (outer, inner))
    if pad:
      a = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return a.reshape(a.shape[:2] + (outer, groups, group_size))

  x5, w5 = split(qx3), split(qw3)
  # bfloat16 products come out as float32. |qx|, |qw| <= 128: every group product, zero-point
  # term and their difference is an integer below 2**24 when 2 * group_size * 128 * 128 <= 2**24,
  # hence exact in float32, where the correction fuses into the rescaling (through int32 it took
  # one more pass over the (B, G, M, N) sums: 1.81 -> 1.56 ms at M = 1024, K = 512, N = 128).
  exact_f32 = bf16 and 2 * group_size * 128 * 128 <= 2**24
  dtype = jnp.float32 if exact_f32 else jnp.int32
  dims = (((2, 4), (2, 4)), ((0, 3), (0, 3)))
  acc = int_dot_general(x5, w5, dims, bf16=bf16, dtype=dtype)  # (B, G, M, N)
  sums = jnp.sum(w5.astype(jnp.int32), axis=(2, 4))  # (B, N, G)
  zx4 = zx3 if jnp.ndim(zx3) == 0 else zx3[:, None]  # per row: (B, 1, M, 1)
  correction = (zx4 * jnp.transpose(sums, (0, 2, 1))[:, :, None, :]).astype(dtype)
  return _rescale_groups(acc, scale3, correction)


# Up to this many groups the rescaled group products are summed one group at a time.
UNROLLED_GROUPS = 32


def _rescale_groups(acc, scale3, correction):
  """``sum_g (acc[:, g] - correction[:, g]) * scale_g`` in float32: ``acc`` ``(B, G, M, N)``
  (int32, or float32 holding exact integers), ``correction`` ``(B, G, 1 or M, N)``, ``scale3``
  ``(B, N, G)``. XLA:CPU runs ``jnp.sum(..., axis=1)`` of this product 100x slower than the same
  sum written group by group (2.7 ms against 24 us at G = 3, M = 64, N = 384), so few groups are
  added one by one and many go through a batched ``dot_general`` over the group axis."""
  groups = acc.shape[1]
  if groups <= UNROLLED_GROUPS:
    st = jnp.transpose(scale3.astype(jnp.float32), (0, 2, 1))  # (B, G, N)

    def term(g):  # correction: (B, G, 1 or M, N)
      return (acc[:, g] - correction[:, g]).astype(jnp.float32) * st[:, g, None, :]

    y = term(0)
    for g in range(1, groups):
      y = y + term(g)
    return y
  y = lax.dot_general(
    (acc - correction).astype(jnp.float32),
    scale3.astype(jnp.float32),
    (((1,), (2,)), ((0, 3), (0, 1))),
  )  # (B, N, M)
  return jnp.transpose(y, (0, 2, 1))


# Up to this many input rows, a dense layer computes ``(W @ x.T).T``: with the weights as the left
# operand XLA:CPU streams them instead of packing them per call (1.3-1.5x faster at 8-32 rows of
# a 4096 x 4096 layer; no gain from 256 rows).
SWAP_ROWS = 64


def int_matmul_nk(x, zx, values, n: int, k: int, bits: int, kernel_sum):
  """``x @ w.T - zx * kernel_sum`` in int32 for int8 ``x`` ``(M, K)`` and ``bits``-bit weights
  stored ``(N, K)`` (``values``: int8, or for ``bits <= 4`` the flat packed bytes of a
  :class:`~qatjax.core.qarray.QArray`).

  The weights are read in their stored order, contracting the minor dimension of both operands:
  no transpose and no repacking of the weights per call. Packed weights whose ``K`` is a multiple
  of the values per byte ``p`` (2 at 3..4 bits, 4 at 2 bits) are not interleaved either: field
  ``j`` of every byte holds the ``k`` with ``k % p == j``, so the product is
  ``sum_j x[:, j::p] @ field_j.T`` (the same int32 sums).
  For few rows the product is computed as ``(w @ x.T).T`` (see ``SWAP_ROWS``), and a single row
  is padded to two: XLA:CPU lowers a one-row int8 dot to an int32 one that converts the whole
  kernel (20-50x slower). Every variant gives the same int32 values. ``zx`` is a scalar or one
  zero point per row (``(M, 1)``).
  """
  rows = x.shape[0] if isinstance(x.shape[0], int) else None  # None: symbolic (jax.export)
  if rows == 1:
    x = jnp.concatenate([x, jnp.zeros_like(x)])
  swap = rows is not None and rows <= SWAP_ROWS
  nt = (((1,), (1,)), ((), ()))
  # Many rows: compute-bound, where exact bfloat16 products beat int8 ones (see exact_dot).
  bf16 = not swap and bf16_matmul_fast() and exact_in_bf16(k, 128, 2 ** (bits - 1))

  def dot(a, w):  # a (m, kk) . w (n, kk) over kk -> (m, n), or (n, m) when swapped
    if swap:
      return lax.dot_general(w, a, nt, preferred_element_type=jnp.int32)
    return int_dot_general(a, w, nt, bf16=bf16)

  width = storage_bits(bits)
  per = 8 // width
  if per > 1 and k % per == 0:
    fields = packed_fields(values, width)
    acc = sum(dot(x[:, j::per], f.reshape(n, k // per)) for j, f in enumerate(fields))
  else:
    w = unpack_bits(values, (n, k), width) if per > 1 else values.reshape(n, k)
    acc = dot(x, w)
  if swap:  # the barrier keeps XLA from folding the transpose back into the dot
    acc = lax.optimization_barrier(acc).T
  if rows == 1:
    acc = acc[:1]
  return acc - zx * kernel_sum


def packed_fields(packed, width: int) -> list[jax.Array]:
  """The ``8 // width`` signed fields of packed ``width``-bit values (low bits first), each an
  int8 array of the bytes' shape, sign-extended by shifts (no lookup, no ``where``).

  Example:
    >>> from qatjax.core.int_kernels import packed_fields
    >>> [f.tolist() for f in packed_fields(jnp.array([141], jnp.uint8), 2)]  # 0b10_00_11_01
    [[1], [-1], [0], [-2]]
  """
  p = lax.bitcast_convert_type(jnp.asarray(packed, jnp.uint8), jnp.int8)
  right = jnp.int8(8 - width)
  return [
    lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(8 - width * (j + 1))), right)
    for j in range(8 // width)
  ]


# Largest contraction size whose float32 sums of (qx - zx) * qw are exact integers:
# |qx - zx| <= 255, |qw| <= 128, so every partial sum is an integer of magnitude < 2**24.
EXACT_F32_K = (2**24 - 1) // (255 * 128)  # 514
# Convolutions with this many input channels (per group) or fewer -- an image model's first
# layer, depthwise layers -- are evaluated exactly in float32 on CPU (see int_conv).
FEW_CHANNELS = 4


def int_conv(
  qx, zx, qw, kernel_sum, *, strides, pads, lhs_dilation, rhs_dilation, feature_group_count: int
):
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
    return lax.conv_general_dilated(
      x,
      qw.astype(jnp.float32),
      strides,
      [(int(lo), int(hi)) for lo, hi in pads],
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dn,
      feature_group_count=feature_group_count,
      precision=lax.Precision.HIGHEST,
    )
  config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation)] + [(0, 0, 0)]
  qx = lax.pad(qx, zx.astype(jnp.int8), config)
  if _im2col_pays(qx.shape, qw.shape, strides, rhs_dilation, feature_group_count):
    return _im2col_conv(qx, qw, strides, rhs_dilation) - zx * kernel_sum
  nd = qx.ndim
  dn = lax.conv_dimension_numbers(qx.shape, qw.shape, _dims(nd))
  acc = lax.conv_general_dilated(
    qx,
    qw,
    strides,
    "VALID",
    rhs_dilation=rhs_dilation,
    dimension_numbers=dn,
    feature_group_count=feature_group_count,
    preferred_element_type=jnp.int32,
  )
  return acc - zx * kernel_sum


# Convolutions whose patch matrix (output positions x kernel taps x input channels, int8) is at
# most this large run as an im2col GEMM on CPU (see _im2col_conv).
IM2COL_MAX_BYTES = 1 << 28


def _out_size(n: int, k: int, stride: int, dilation: int) -> int:
  return (n - (k - 1) * dilation - 1) // stride + 1


def _im2col_pays(x_shape, w_shape, strides, rhs_dilation, feature_group_count) -> bool:
  """Whether an (already padded) int8 convolution runs as :func:`_im2col_conv`: on CPU, without
  feature groups, when its patch matrix fits ``IM2COL_MAX_BYTES``."""
  if feature_group_count != 1 or jax.default_backend() != "cpu":
    return False
  spatial = w_shape[:-2]
  positions = x_shape[0] * math.prod(
    _out_size(n, k, s, d) for n, k, s, d in zip(x_shape[1:-1], spatial, strides, rhs_dilation)
  )
  return positions * math.prod(w_shape[:-1]) <= IM2COL_MAX_BYTES


def _im2col_conv(qx, qw, strides, rhs_dilation):
  """``VALID`` int8 convolution (NHWC / HWIO) as one int8 GEMM: the strided slices of ``qx`` for
  each kernel tap, concatenated along channels (taps major, as HWIO flattens), times the kernel
  as a ``(taps x channels, out channels)`` matrix. XLA:CPU's int8 GEMM reads both operands in
  this layout fastest: a 3x3 conv of 14 x 14 x 32 -> 64 at batch 256 takes 9.1 ms against
  15.6 ms for the int8 convolution and 20.6 ms for the float32 one (the same int32 sums)."""
  spatial = qw.shape[:-2]
  out = [
    _out_size(n, k, s, d) for n, k, s, d in zip(qx.shape[1:-1], spatial, strides, rhs_dilation)
  ]
  cols = []
  for taps in itertools.product(*(range(k) for k in spatial)):
    start = [0] + [t * d for t, d in zip(taps, rhs_dilation)] + [0]
    limit = (
      [qx.shape[0]]
      + [b + (n - 1) * s + 1 for b, n, s in zip(start[1:-1], out, strides)]
      + [qx.shape[-1]]
    )
    cols.append(lax.slice(qx, start, limit, [1, *strides, 1]))
  k = math.prod(qw.shape[:-1])
  patches = jnp.concatenate(cols, axis=-1).reshape(-1, k)
  acc = lax.dot_general(
    patches, qw.reshape(k, qw.shape[-1]), (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )
  return acc.reshape(qx.shape[0], *out, qw.shape[-1])


def _dims(nd: int):
  spatial = {1: "W", 2: "HW", 3: "DHW"}[nd - 2]
  return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
