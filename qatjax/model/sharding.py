"""Shardings that follow a weight: its quantizer scales and the integers ``convert`` stores for it.

A weight (``kernel``, ``embedding``) may be split over the devices of a mesh
(``NamedSharding(mesh, PartitionSpec(...))``). A tensor derived from it follows it along the axes
they share, so each device keeps the scales of the channels it holds:

* same rank (a per-group LSQ scale, a ``QArray``'s broadcast scale, a dense ``kernel_sum``): an
  axis at the weight's full length keeps the weight's entry, an axis of length 1 (contracted) is
  replicated, a group axis keeps it when whole groups fall on each device;
* a vector over the weight's channels (a per-channel LSQ ``kernel_scale``, a conv ``kernel_sum``, a
  folded bias): the entry of the first channel axis, when no other channel axis is split (the
  flattened channel index then runs in contiguous blocks, one per device);
* anything else (a per-tensor scale, an input scale): replicated.

The channel axes of a vector are the weight's uncontracted axes: the trailing axes of a kernel
(Flax kernels hold their contracted axes first), the rows of an embedding table.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from qatjax.core.qarray import QArray
from qatjax.ops.embed import TABLE_CONTRACT


def spec_entries(spec: PartitionSpec, ndim: int) -> tuple:
  """``spec`` padded with ``None`` to ``ndim`` entries (one per array axis)."""
  entries = tuple(spec)
  return entries + (None,) * (ndim - len(entries))


def entry_size(mesh, entry) -> int:
  """The number of devices a ``PartitionSpec`` entry (``None``, an axis or a tuple) splits over."""
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def channel_axes(weight_name: str, weight_shape, size: int) -> tuple[int, ...] | None:
  """The weight's axes a vector of ``size`` entries runs over (row-major), else ``None``.

  Example:
    >>> from qatjax.model.sharding import channel_axes
    >>> channel_axes("kernel", (3, 3, 8, 16), 16), channel_axes("embedding", (100, 16), 100)
    ((3,), (0,))
  """
  ndim = len(weight_shape)
  if weight_name == "embedding":
    axes = tuple(a for a in range(ndim) if a not in TABLE_CONTRACT)
  else:  # the shortest trailing run of axes holding ``size`` entries
    axes = next(
      (
        tuple(range(start, ndim))
        for start in range(ndim - 1, -1, -1)
        if math.prod(weight_shape[start:]) == size
      ),
      (),
    )
  return axes if axes and math.prod(weight_shape[a] for a in axes) == size else None


def follow_spec(mesh, weight_spec, weight_name: str, weight_shape, shape) -> PartitionSpec:
  """The ``PartitionSpec`` of a tensor of ``shape`` derived from a weight sharded ``weight_spec``.

  Example:
    >>> import numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from qatjax.model.sharding import follow_spec
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> follow_spec(mesh, P(None, "model"), "kernel", (8, 16), (16,))  # per-channel scale
    P('model',)
    >>> follow_spec(mesh, P(None, "model"), "kernel", (8, 16), (1, 16))
    P(None, 'model')
  """
  weight_shape, shape = tuple(weight_shape), tuple(shape)
  entries = spec_entries(weight_spec, len(weight_shape))
  if len(shape) == len(weight_shape) and shape:
    out = []
    for d, n, e in zip(weight_shape, shape, entries):
      k = entry_size(mesh, e)
      whole_groups = n > 1 and d % n == 0 and n % k == 0
      out.append(e if n == d or whole_groups else None)
    return PartitionSpec(*out)
  if len(shape) == 1:
    axes = channel_axes(weight_name, weight_shape, shape[0])
    if axes and all(entries[a] is None for a in axes[1:]):
      return PartitionSpec(entries[axes[0]])
  return PartitionSpec()


def _packed_spec(mesh, stored_entries, stored_shape) -> PartitionSpec:
  """Packed int4 values are one flat byte vector: split it as the first stored axis when that
  is the only split axis and each device's block is a whole number of bytes."""
  first, rest = stored_entries[0] if stored_entries else None, stored_entries[1:]
  if first is None or any(e is not None for e in rest):
    return PartitionSpec()
  per_device = stored_shape[0] // entry_size(mesh, first) * math.prod(stored_shape[1:])
  return PartitionSpec(first) if per_device % 2 == 0 else PartitionSpec()


def place_like_weight(weight, weight_name: str, value):
  """``value`` (an array or a :class:`QArray` derived from ``weight``) placed on ``weight``'s mesh,
  following its sharding; returned unchanged when ``weight`` has no ``NamedSharding``."""
  sharding = getattr(weight, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return value
  mesh, spec, shape = sharding.mesh, sharding.spec, weight.shape
  put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
  follow = lambda x: put(
    x, follow_spec(mesh, spec, weight_name, shape, x.shape) if x.ndim else PartitionSpec()
  )
  if not isinstance(value, QArray):
    return follow(value)
  logical = spec_entries(spec, len(shape))
  perm = value.perm or tuple(range(len(shape)))
  stored = tuple(logical[p] for p in perm)
  values_spec = (
    _packed_spec(mesh, stored, value.stored_shape) if value.packed else PartitionSpec(*stored)
  )
  return value.replace(
    values=put(value.values, values_spec),
    scale=follow(value.scale),
    zero_point=follow(value.zero_point),
  )
