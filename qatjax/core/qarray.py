"""``QArray``: an integer tensor with its scale and zero point, as a registered pytree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax


def storage_bits(bits: int) -> int:
  """Bits a :class:`QArray` spends on each value of ``bits`` bits: 2 (four values per byte) at
  2 bits, 4 (two per byte) at 3 and 4 bits, else 8 (one int8 per value).

  Example:
    >>> from qatjax.core.qarray import storage_bits
    >>> [storage_bits(b) for b in (2, 3, 4, 5, 8)]
    [2, 4, 4, 8, 8]
  """
  return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_bits(q, width: int) -> jax.Array:
  """Packs signed integers that fit in ``width`` (2 or 4) bits ``8 // width`` per byte, flattened.

  Value ``i`` of the flat array lands in byte ``i // (8 // width)``, at bit
  ``width * (i % (8 // width))`` (the first value in the low bits); the last byte is padded with
  zeros.

  Example:
    >>> from qatjax.core.qarray import pack_bits
    >>> pack_bits(jnp.array([1, -1, 0, -2, 1], jnp.int8), 2).tolist()   # 0b10_00_11_01, 0b01
    [141, 1]
  """
  if width not in (2, 4):
    raise ValueError(f"pack_bits: width must be 2 or 4, got {width!r}")
  per = 8 // width
  flat = jnp.asarray(q, jnp.int8).reshape(-1)
  pad = -flat.size % per
  if pad:
    flat = jnp.concatenate([flat, jnp.zeros((pad,), jnp.int8)])
  fields = (flat.astype(jnp.uint8) & (2**width - 1)).reshape(-1, per)
  out = fields[:, 0]
  for j in range(1, per):
    out = out | (fields[:, j] << (width * j))
  return out


def unpack_bits(packed, shape, width: int) -> jax.Array:
  """Inverse of :func:`pack_bits`: the signed integers as an int8 array of ``shape``.

  Example:
    >>> from qatjax.core.qarray import unpack_bits
    >>> unpack_bits(jnp.array([141, 1], jnp.uint8), (5,), 2).tolist()
    [1, -1, 0, -2, 1]
  """
  if width not in (2, 4):
    raise ValueError(f"unpack_bits: width must be 2 or 4, got {width!r}")
  p = jnp.asarray(packed, jnp.uint8)
  fields = [(p >> (width * j)) & (2**width - 1) for j in range(8 // width)]
  flat = jnp.stack(fields, axis=-1).reshape(-1)[: math.prod(shape)].astype(jnp.int8)
  half = 2 ** (width - 1)
  return jnp.where(flat >= half, flat - 2 * half, flat).astype(jnp.int8).reshape(shape)


def pack_int4(q) -> jax.Array:
  """Packs signed integers in [-8, 7] two per byte (even index: low nibble), flattened.

  Example:
    >>> pack_int4(jnp.array([-8, 7, 3], jnp.int8)).tolist()   # 0x78, 0x03
    [120, 3]
  """
  return pack_bits(q, 4)


def unpack_int4(packed, shape) -> jax.Array:
  """Inverse of :func:`pack_int4`: int8 array of ``shape``.

  Example:
    >>> unpack_int4(pack_int4(jnp.array([-8, 7, 3], jnp.int8)), (3,))
    Array([-8,  7,  3], dtype=int8)
  """
  return unpack_bits(packed, shape, 4)


@struct.dataclass
class QArray:
  """A quantized tensor: ``float ~= (int - zero_point) * scale``.

  ``values`` holds int8 (bits 5..8) or, packed into a flat uint8 vector, two values per byte at 3
  and 4 bits and four per byte at 2 bits (see :func:`storage_bits` and :func:`pack_bits`).
  ``scale`` and ``zero_point`` broadcast against the unpacked array, except along ``axis`` for
  per-group scales, where they hold one entry per ``group_size`` elements. The scale is float32 or
  float16 / bfloat16 (``QuantConfig(weight_scale_dtype=...)``); a symmetric tensor's zero point is
  one scalar 0.

  ``perm`` (optional) is a storage order: ``values`` then holds ``transpose(q, perm)`` (packed or
  not) while ``shape``, ``unpack()``, ``dequantize()``, ``scale`` and ``axis`` stay in the logical
  order. :func:`qatjax.convert` stores dense kernels ``(K, N)`` as ``(N, K)`` (``perm=(1, 0)``):
  with the contracted dimension minor, XLA:CPU's int8 matmul reads the weights without repacking
  them on every call (about 3x faster at small batch).

  Example:
    >>> qa = QArray.create(jnp.array([[1, -2]], jnp.int8), jnp.float32(0.5), bits=4)
    >>> qa.values.dtype, qa.unpack().tolist(), qa.dequantize().tolist()
    (dtype('uint8'), [[1, -2]], [[0.5, -1.0]])
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  axis: int | None = struct.field(pytree_node=False, default=None)
  group_size: int | None = struct.field(pytree_node=False, default=None)
  perm: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, q, scale, zero_point=None, *, bits: int, axis=None, group_size=None, perm=None):
    """Builds a QArray from unpacked integers (logical order), packing them when ``bits <= 4``
    and storing them transposed by ``perm`` if given.

    Example:
      >>> qa = QArray.create(jnp.array([[1, -2, 0, 1]], jnp.int8), jnp.float32(0.5), bits=2)
      >>> qa.values.shape, qa.unpack().tolist()     # four 2-bit values in one byte
      ((1,), [[1, -2, 0, 1]])
    """
    q = jnp.asarray(q)
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
      scale = scale.astype(jnp.float32)
    # Symmetric integers (no zero point) store one scalar 0, not one per scale.
    zero_point = (
      jnp.zeros((), jnp.float32) if zero_point is None else jnp.asarray(zero_point, jnp.float32)
    )
    if perm is not None:
      perm = tuple(int(p) for p in perm)
      if sorted(perm) != list(range(q.ndim)):
        raise ValueError(
          f"QArray.create: perm={perm!r} is not a permutation of the "
          f"{q.ndim} dims of shape {tuple(q.shape)}"
        )
      q_stored = jnp.transpose(q, perm)
    else:
      q_stored = q
    width = storage_bits(bits)
    values = pack_bits(q_stored, width) if width < 8 else q_stored.astype(jnp.int8)
    return cls(values, scale, zero_point, tuple(q.shape), bits, axis, group_size, perm)

  def with_perm(self, perm) -> QArray:
    """The same integers, scale and zero point stored in the order ``perm`` (``None``: logical).

    Example:
      >>> qa = QArray.create(jnp.array([[1, -2, 3]], jnp.int8), 1.0, bits=8)
      >>> qa.with_perm((1, 0)).stored().tolist(), qa.with_perm((1, 0)).unpack().tolist()
      ([[1], [-2], [3]], [[1, -2, 3]])
    """
    return QArray.create(
      self.unpack(),
      self.scale,
      self.zero_point,
      bits=self.bits,
      axis=self.axis,
      group_size=self.group_size,
      perm=perm,
    )

  @property
  def ndim(self) -> int:
    """Number of logical dimensions (``len(shape)``).

    Example:
      >>> QArray.create(jnp.ones((2, 3, 4), jnp.int8), 1.0, bits=8).ndim
      3
    """
    return len(self.shape)

  @property
  def packed(self) -> bool:
    """Whether ``values`` holds several values per byte (``bits <= 4``).

    Example:
      >>> QArray.create(jnp.ones(3, jnp.int8), 1.0, bits=4).packed
      True
    """
    return self.bits <= 4

  @property
  def storage_bits(self) -> int:
    """Bits spent per stored value: 2, 4 or 8 (see :func:`storage_bits`).

    Example:
      >>> QArray.create(jnp.ones(3, jnp.int8), 1.0, bits=3).storage_bits
      4
    """
    return storage_bits(self.bits)

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """``shape`` in storage order (``shape`` permuted by ``perm``).

    Example:
      >>> QArray.create(jnp.ones((2, 3), jnp.int8), 1.0, bits=8, perm=(1, 0)).stored_shape
      (3, 2)
    """
    return self.shape if self.perm is None else tuple(self.shape[p] for p in self.perm)

  def stored(self) -> jax.Array:
    """The integers as an int8 array of ``stored_shape`` (no transpose).

    Example:
      >>> qa = QArray.create(jnp.array([[1, -2, 3]], jnp.int8), 0.5, bits=4, perm=(1, 0))
      >>> qa.stored().tolist()                       # unpacked from two per byte, (3, 1)
      [[1], [-2], [3]]
    """
    if not self.packed:
      return self.values
    return unpack_bits(self.values, self.stored_shape, self.storage_bits)

  def unpack(self) -> jax.Array:
    """The integers as an int8 array of ``shape``.

    Example:
      >>> qa = QArray.create(jnp.array([[1, -2, 3]], jnp.int8), 0.5, bits=4, perm=(1, 0))
      >>> qa.unpack().tolist()
      [[1, -2, 3]]
    """
    q = self.stored()
    return q if self.perm is None else jnp.transpose(q, tuple(np.argsort(self.perm)))

  def expanded(self, p):
    """A scale or zero point broadcast against the unpacked array (groups repeated).

    Example:
      >>> qa = QArray.create(jnp.ones((1, 4), jnp.int8), jnp.array([[0.5, 2.0]]), bits=8,
      ...                    axis=1, group_size=2)
      >>> qa.expanded(qa.scale).tolist()             # one scale per 2 elements along axis 1
      [[0.5, 0.5, 2.0, 2.0]]
    """
    if self.group_size is None or jnp.ndim(p) == 0:
      return p
    full = jnp.repeat(p, self.group_size, axis=self.axis)
    return lax.slice_in_dim(full, 0, self.shape[self.axis], axis=self.axis)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``(int - zero_point) * scale`` as floats.

    Example:
      >>> qa = QArray.create(jnp.array([-2, 0, 1], jnp.int8), jnp.float32(0.25), bits=2)
      >>> qa.dequantize().tolist()
      [-0.5, 0.0, 0.25]
    """
    q = self.unpack().astype(jnp.float32)
    scale = self.expanded(self.scale).astype(jnp.float32)
    return ((q - self.expanded(self.zero_point)) * scale).astype(dtype)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored integers, scale and zero point.

    Example:
      >>> # 32 2-bit values in 8 bytes, 4 float32 scales, one scalar zero point
      >>> QArray.create(jnp.ones((8, 4), jnp.int8), jnp.ones(4), bits=2).nbytes   # 8 + 16 + 4
      28
    """
    return int(self.values.nbytes + self.scale.nbytes + self.zero_point.nbytes)
