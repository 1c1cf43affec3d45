"""``QArray``: an integer tensor with its scale and zero point, as a registered pytree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax


def pack_int4(q) -> jax.Array:
  """Packs signed integers in [-8, 7] two per byte (even index: low nibble), flattened.

  Example:
    >>> unpack_int4(pack_int4(jnp.array([-8, 7, 3], jnp.int8)), (3,))
    Array([-8,  7,  3], dtype=int8)
  """
  flat = jnp.asarray(q, jnp.int8).reshape(-1)
  if flat.size % 2:
    flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.int8)])
  u = flat.astype(jnp.uint8) & 0xF
  return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed, shape) -> jax.Array:
  """Inverse of :func:`pack_int4`: int8 array of ``shape``."""
  p = jnp.asarray(packed, jnp.uint8)
  lo = (p & 0xF).astype(jnp.int8)
  hi = (p >> 4).astype(jnp.int8)
  both = jnp.stack([lo, hi], axis=-1).reshape(-1)[: math.prod(shape)]
  both = jnp.where(both >= 8, both - 16, both).astype(jnp.int8)
  return both.reshape(shape)


@struct.dataclass
class QArray:
  """A quantized tensor: ``float ~= (int - zero_point) * scale``.

  ``values`` holds int8 (bits 5..8) or, for ``bits <= 4``, two values per byte packed into a flat
  uint8 vector (see :func:`pack_int4`). ``scale`` and ``zero_point`` are float32 and broadcast
  against the unpacked array, except along ``axis`` for per-group scales, where they hold one entry
  per ``group_size`` elements. The scale may be stored in float16 / bfloat16
  (``QuantConfig(weight_scale_dtype=...)``); a symmetric tensor's zero point is one scalar 0.

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
    and storing them transposed by ``perm`` if given."""
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
    values = pack_int4(q_stored) if bits <= 4 else q_stored.astype(jnp.int8)
    return cls(values, scale, zero_point, tuple(q.shape), bits, axis, group_size, perm)

  def with_perm(self, perm) -> QArray:
    """The same integers, scale and zero point stored in the order ``perm`` (``None``: logical)."""
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
    """Number of logical dimensions (``len(shape)``)."""
    return len(self.shape)

  @property
  def packed(self) -> bool:
    return self.bits <= 4

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """``shape`` in storage order (``shape`` permuted by ``perm``)."""
    return self.shape if self.perm is None else tuple(self.shape[p] for p in self.perm)

  def stored(self) -> jax.Array:
    """The integers as an int8 array of ``stored_shape`` (no transpose)."""
    return unpack_int4(self.values, self.stored_shape) if self.packed else self.values

  def unpack(self) -> jax.Array:
    """The integers as an int8 array of ``shape``."""
    q = self.stored()
    return q if self.perm is None else jnp.transpose(q, tuple(np.argsort(self.perm)))

  def expanded(self, p):
    """A scale or zero point broadcast against the unpacked array (groups repeated)."""
    if self.group_size is None or jnp.ndim(p) == 0:
      return p
    full = jnp.repeat(p, self.group_size, axis=self.axis)
    return lax.slice_in_dim(full, 0, self.shape[self.axis], axis=self.axis)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``(int - zero_point) * scale`` as floats."""
    q = self.unpack().astype(jnp.float32)
    scale = self.expanded(self.scale).astype(jnp.float32)
    return ((q - self.expanded(self.zero_point)) * scale).astype(dtype)

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.scale.nbytes + self.zero_point.nbytes)
