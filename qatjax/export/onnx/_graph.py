"""Building the ONNX graph: tensors, the node / initializer builder and the NHWC <-> NCHW layout.

A graph tensor (:class:`Tensor`) keeps its logical (JAX, channels-last) shape and whether it is
stored channels-first; the builder transposes a tensor between the two layouts at most once each
way (cached), so a chain of convolutions and pools stays in NCHW.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from qatjax.core.qarray import pack_int4


def onnx_module():
  """The ``onnx`` package (an optional dependency), imported on first use."""
  try:
    import onnx
  except ImportError as e:  # pragma: no cover
    raise ImportError("export_onnx needs the `onnx` package: pip install 'qatjax[export]'") from e
  return onnx


def to_channels_first(rank: int) -> list[int]:
  """The ``Transpose`` perm from ``(N, *spatial, C)`` to ``(N, C, *spatial)``."""
  return [0, rank - 1] + list(range(1, rank - 1))


def to_channels_last(rank: int) -> list[int]:
  """The ``Transpose`` perm from ``(N, C, *spatial)`` to ``(N, *spatial, C)``."""
  return [0] + list(range(2, rank)) + [1]


@dataclasses.dataclass
class Tensor:
  """A graph tensor: ONNX name, logical (JAX, channels-last) shape, whether it is stored
  channels-first (physically transposed by :func:`to_channels_first`), and its dtype."""

  name: str
  shape: tuple[int, ...]
  cf: bool = False
  dtype: Any = np.float32


@dataclasses.dataclass
class Scaled:
  """A lazy ``tensor * factor`` (``reduce_window_sum`` = ``AveragePool * window``): a following
  division by the same factor (``nn.avg_pool``) cancels it."""

  t: Tensor
  factor: float


class Builder:
  """Collects the nodes and initializers of one graph, with unique names.

  Attributes:
    batch: the example input's leading dimension.
    dynamic: whether that dimension is symbolic in the graph.
    int4: whether weights of 4 bits or fewer are stored as ``INT4``.
  """

  def __init__(self, batch: int, dynamic: bool, int4: bool):
    self.onnx = onnx_module()
    self.nodes, self.inits = [], []
    self.names: dict[str, int] = {}
    self.batch, self.dynamic, self.int4 = batch, dynamic, int4
    self.layout_cache: dict[tuple[str, bool], Tensor] = {}
    self.shared: dict[str, str] = {}

  def once(self, key: str, make) -> str:
    """``make()``'s output name, built on the first call with ``key`` only (a tied weight that
    several calls of one layer read is stored once)."""
    if key not in self.shared:
      self.shared[key] = make()
    return self.shared[key]

  def fresh(self, base: str) -> str:
    """A name not used yet, derived from ``base`` (``/`` becomes ``.``)."""
    base = base.replace("/", ".")
    n = self.names.get(base, 0)
    self.names[base] = n + 1
    return base if n == 0 else f"{base}_{n}"

  def init(self, array, base: str, int4: bool = False) -> str:
    """A constant initializer (``int4``: an ``INT4`` tensor, two values per byte)."""
    name = self.fresh(base)
    a = np.asarray(array)
    if int4:
      packed = np.asarray(pack_int4(a)).tobytes()
      tensor = self.onnx.helper.make_tensor(name, self.onnx.TensorProto.INT4, a.shape, packed, True)
      self.inits.append(tensor)
    else:
      a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (keeps 0-d arrays 0-d)
      self.inits.append(self.onnx.numpy_helper.from_array(a, name))
    return name

  def node(self, op: str, inputs, base: str, **attrs) -> str:
    """Appends one ``op`` node; returns its output's name."""
    out = self.fresh(base)
    self.nodes.append(
      self.onnx.helper.make_node(op, list(inputs), [out], name=self.fresh("n." + base), **attrs)
    )
    return out

  def tensor(self, v: Tensor | Scaled) -> Tensor:
    """A graph value as a tensor (a lazy :class:`Scaled` is multiplied out)."""
    if isinstance(v, Scaled):
      f = self.init(np.float32(v.factor), v.t.name + ".factor")
      return Tensor(self.node("Mul", [v.t.name, f], v.t.name + ".sum"), v.t.shape, v.t.cf)
    return v

  def plain(self, t: Tensor) -> Tensor:
    """``t`` in its logical (channels-last) layout."""
    return self._layout(t, False) if t.cf else t

  def cfirst(self, t: Tensor) -> Tensor:
    """``t`` stored channels-first."""
    return t if t.cf else self._layout(t, True)

  def _layout(self, t: Tensor, cf: bool) -> Tensor:
    key = (t.name, cf)
    if key not in self.layout_cache:
      rank = len(t.shape)
      perm, suffix = (to_channels_first(rank), ".nchw") if cf else (to_channels_last(rank), ".nhwc")
      out = self.node("Transpose", [t.name], t.name + suffix, perm=perm)
      self.layout_cache[key] = Tensor(out, t.shape, cf, t.dtype)
    return self.layout_cache[key]

  def reshape(self, t: Tensor, shape, base: str) -> Tensor:
    """``t`` (logical layout) reshaped to ``shape``; with a dynamic batch, the leading dim must
    stay the batch (ONNX's ``0`` copies it)."""
    t = self.plain(t)
    target = self.reshape_target(t.shape, shape)
    return Tensor(self.node("Reshape", [t.name, target], base), tuple(shape), False, t.dtype)

  def reshape_target(self, old, new) -> str:
    """The ``Reshape`` shape initializer from ``old`` to ``new``.

    Raises:
      ValueError: with a dynamic batch, when ``new`` does not keep the batch dimension first.
    """
    new = list(new)
    if self.dynamic:
      if not (new and old and new[0] == old[0] == self.batch):
        raise ValueError(
          f"export_onnx: reshape {tuple(old)} -> {tuple(new)} does not keep the "
          "batch dimension first; export with dynamic_batch=False"
        )
      new[0] = 0  # ONNX Reshape: 0 copies the input's dim
    return self.shape_const(new, "shape")

  def shape_const(self, shape, base: str) -> str:
    """An ``int64`` shape for ``Reshape`` / ``Expand``."""
    return self.init(np.asarray(shape, np.int64), base)

  def cast(self, t: Tensor, dtype) -> Tensor:
    """``t`` cast to ``dtype`` (same layout)."""
    to = self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return Tensor(self.node("Cast", [t.name], "cast", to=to), t.shape, t.cf, np.dtype(dtype))
