"""``model_size``: bytes per layer of float or converted variables, as a report and a comparison."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import traverse_util

from qatjax.core.qarray import QArray
from qatjax.model.nnx_variables import as_variables
from qatjax.ops.registry import ACT_SITES, QUANT_METADATA, RECORD, WEIGHTS, act_leaf

# The converted leaves that hold an activation quantizer's bit width.
_ACT_BITS = tuple(act_leaf(site, "bits") for site in ACT_SITES)


def _nbytes(a) -> int:
  """Bytes of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar."""
  if hasattr(a, "shape") and hasattr(a, "dtype"):
    return int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize
  return int(np.asarray(a).nbytes)


def _size(a) -> int:
  return int(math.prod(a.shape)) if hasattr(a, "shape") else int(np.asarray(a).size)


@dataclasses.dataclass(frozen=True)
class LayerSize:
  """Bytes of one layer (all variables whose parent path is ``name``).

  Attributes:
    name: the layer path (``"Dense_0"``, ``"block/Conv_0"``; ``"<root>"`` for top-level leaves).
    weight_bytes: kernels / embeddings: float bytes, or a :class:`QArray`'s (packed) integers.
    quant_bytes: quantization metadata: a QArray's scale and zero point, input scale and zero
      point, ``kernel_sum``, LSQ / PACT parameters.
    other_bytes: everything else (biases, BatchNorm parameters and statistics, ``quant_stats``).
    n_weights: number of kernel / embedding elements (unpacked).
    weight_bits: the bit width of a converted (:class:`QArray`) weight, else ``None``.
    act_bits: the bit width of the input quantizer of a converted layer (its ``input_bits``),
      else ``None`` (float input, or variables that are not converted).
    dtype: how the weight is stored: ``"int8"``, ``"int4"`` (two per byte), ``"int2"`` (four per
      byte), or its float dtype (``"float32"``, ``"bfloat16"``); ``None`` without a weight.

  Example:
    >>> qa = QArray.create(jnp.ones((8, 4), jnp.int8), jnp.ones(4), bits=2)
    >>> lay = model_size({"params": {"Dense_0": {"kernel": qa, "bias": jnp.zeros(4)}}})["Dense_0"]
    >>> lay.weight_bytes, lay.weight_bits, lay.dtype, lay.total   # 32 values in 8 bytes
    (8, 2, 'int2', 44)
  """

  name: str
  weight_bytes: int = 0
  quant_bytes: int = 0
  other_bytes: int = 0
  n_weights: int = 0
  weight_bits: int | None = None
  act_bits: int | None = None
  dtype: str | None = None

  @property
  def total(self) -> int:
    """Bytes of the layer: weights, quantization metadata and the rest.

    Example:
      >>> LayerSize("Dense_0", weight_bytes=8, quant_bytes=4, other_bytes=2).total
      14
    """
    return self.weight_bytes + self.quant_bytes + self.other_bytes

  def _add(self, weight=0, quant=0, other=0, n=0, **fields) -> LayerSize:
    return dataclasses.replace(
      self,
      weight_bytes=self.weight_bytes + weight,
      quant_bytes=self.quant_bytes + quant,
      other_bytes=self.other_bytes + other,
      n_weights=self.n_weights + n,
      **{k: v for k, v in fields.items() if getattr(self, k) is None},
    )


def _fmt(n: float) -> str:
  for unit in ("B", "KiB", "MiB"):
    if abs(n) < 1024 or unit == "MiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Per-layer byte counts of a variables tree (see :func:`model_size`).

  ``str(report)`` (or :meth:`table`) is a text table; :meth:`compare` puts two reports side by
  side (e.g. float vs converted) with percentages.

  Example:
    >>> report = SizeReport((LayerSize("Dense_0", weight_bytes=64, other_bytes=16,
    ...                                dtype="float32"),))
    >>> report.total, report["Dense_0"].weight_bytes
    (80, 64)
    >>> print(report)
    layer    w bits  a bits  dtype    weights  quant  other        total
    -------  ------  ------  -------  -------  -----  -----  -----------
    Dense_0       -       -  float32     64 B    0 B   16 B         80 B
    total                                64 B    0 B   16 B  80 B (80 B)
  """

  layers: tuple[LayerSize, ...]

  @property
  def total(self) -> int:
    """Total bytes.

    Example:
      >>> SizeReport((LayerSize("a", weight_bytes=8), LayerSize("b", other_bytes=2))).total
      10
    """
    return sum(layer.total for layer in self.layers)

  @property
  def weight_bytes(self) -> int:
    """Bytes of every layer's weights (see :attr:`LayerSize.weight_bytes`).

    Example:
      >>> SizeReport((LayerSize("a", weight_bytes=8), LayerSize("b", weight_bytes=2))).weight_bytes
      10
    """
    return sum(layer.weight_bytes for layer in self.layers)

  @property
  def quant_bytes(self) -> int:
    """Bytes of every layer's quantization metadata.

    Example:
      >>> SizeReport((LayerSize("a", quant_bytes=8), LayerSize("b", weight_bytes=2))).quant_bytes
      8
    """
    return sum(layer.quant_bytes for layer in self.layers)

  @property
  def other_bytes(self) -> int:
    """Bytes of everything else (biases, BatchNorm, ``quant_stats``).

    Example:
      >>> SizeReport((LayerSize("a", other_bytes=8), LayerSize("b", weight_bytes=2))).other_bytes
      8
    """
    return sum(layer.other_bytes for layer in self.layers)

  def __getitem__(self, name: str) -> LayerSize:
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(f"no layer {name!r} in the report; layers: {[lay.name for lay in self.layers]}")

  def ratio(self, baseline: SizeReport) -> float:
    """``self.total / baseline.total`` (e.g. converted / float).

    Example:
      >>> half = SizeReport((LayerSize("Dense_0", weight_bytes=50),))
      >>> half.ratio(SizeReport((LayerSize("Dense_0", weight_bytes=100),)))
      0.5
    """
    return self.total / baseline.total

  def table(self) -> str:
    """A text table: one row per layer (weight and input bit widths, the weight's storage dtype,
    bytes of weights, quantization metadata, other, total); ``-``: float or not known.

    Example:
      >>> qa = QArray.create(jnp.ones((8, 4), jnp.int8), jnp.ones(4), bits=4)
      >>> print(model_size({"params": {"fc": {"kernel": qa}}}).table())
      layer  w bits  a bits  dtype  weights  quant  other        total
      -----  ------  ------  -----  -------  -----  -----  -----------
      fc          4       -  int4      16 B   20 B    0 B         36 B
      total                            16 B   20 B    0 B  36 B (36 B)
    """
    head = ("layer", "w bits", "a bits", "dtype", "weights", "quant", "other", "total")
    dash = lambda v: "-" if v is None else v
    rows = [
      (
        lay.name,
        dash(lay.weight_bits),
        dash(lay.act_bits),
        dash(lay.dtype),
        _fmt(lay.weight_bytes),
        _fmt(lay.quant_bytes),
        _fmt(lay.other_bytes),
        _fmt(lay.total),
      )
      for lay in self.layers
    ]
    rows.append(
      (
        "total",
        "",
        "",
        "",
        _fmt(self.weight_bytes),
        _fmt(self.quant_bytes),
        _fmt(self.other_bytes),
        f"{_fmt(self.total)} ({self.total} B)",
      )
    )
    return _render(head, rows, left=(0, 3))

  def __str__(self) -> str:
    return self.table()

  def compare(self, other: SizeReport, names: tuple[str, str] = ("float", "quantized")) -> str:
    """``self`` (the baseline) and ``other`` per layer, with ``other`` as a % of ``self``.

    Example:
      >>> a, b = (SizeReport((LayerSize("fc", other_bytes=n),)) for n in (80, 20))
      >>> print(a.compare(b))
      layer  float  quantized      %
      -----  -----  ---------  -----
      fc      80 B       20 B  25.0%
      total   80 B       20 B  25.0%
    """
    return compare_sizes(self, other, names)


def _render(head, rows, left=(0,)) -> str:
  """Columns padded to their widest cell: those in ``left`` left-aligned, the others right."""
  widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
  line = lambda r: "  ".join(
    str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
  )
  return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def model_size(variables, *, collections=None) -> SizeReport:
  """Counts the bytes of a model's variables, per layer.

  A :class:`QArray` counts its stored integers (one byte each at 5..8 bits, two per byte at 3
  and 4 bits, four per byte at 2 bits) plus its float32 scale and zero point; ``kernel_sum``,
  biases and input scales count as stored. Works on float variables, QAT variables and converted
  variables alike, and on trees of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` output). Each
  layer also reports its weight's bit width and storage dtype and, converted, its input's bit
  width (so 8-, 4-, 2-bit and float layers of a mixed-precision model are told apart).

  Args:
    variables: a Flax variables dict (``{"params": ..., "batch_stats": ..., ...}``), or an NNX
      model (its variables as :func:`qatjax.nnx.to_variables` groups them).
    collections: the collections to count (default: all but ``quant_record``).

  Returns:
    A :class:`SizeReport`, layers in first-seen order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QDense(4, config=QuantConfig())
    >>> x = jnp.ones((2, 8))
    >>> v = layer.init(jax.random.key(0), x)
    >>> _, stats = layer.apply(v, x, mutable=["quant_stats"])
    >>> qv = convert(layer, {**v, **stats}, x)
    >>> model_size({"params": v["params"]}).total      # (8 * 4 + 4) * 4
    144
    >>> model_size(qv).total   # 32 int8 + (4 scales, 4 kernel sums, 4 biases, one weight
    ...                        #  zero point, input scale, input zero point) * 4 + input bits (1)
    93
    >>> print(model_size(qv))
    layer   w bits  a bits  dtype  weights  quant  other        total
    ------  ------  ------  -----  -------  -----  -----  -----------
    <root>       8       8  int8      32 B   45 B   16 B         93 B
    total                             32 B   45 B   16 B  93 B (93 B)
    >>> print(model_size({"params": v["params"]}).compare(model_size(qv)))
    layer   float  quantized      %
    ------  -----  ---------  -----
    <root>  144 B       93 B  64.6%
    total   144 B       93 B  64.6%
  """
  variables = as_variables(variables)
  cols = [c for c in variables if c != RECORD] if collections is None else list(collections)
  layers: dict[str, LayerSize] = {}
  for col in cols:
    if col not in variables:
      raise ValueError(f"model_size: collection {col!r} not in variables (has {sorted(variables)})")
    tree = variables[col]
    flat = (
      traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, v: isinstance(v, QArray))
      if hasattr(tree, "items")
      else {(): tree}
    )
    for path, leaf in flat.items():
      name = "/".join(str(p) for p in path[:-1]) or "<root>"
      leaf_name = path[-1] if path else col
      cur = layers.get(name) or LayerSize(name)
      if isinstance(leaf, QArray):
        cur = cur._add(
          weight=_nbytes(leaf.values),
          quant=_nbytes(leaf.scale) + _nbytes(leaf.zero_point),
          n=math.prod(leaf.shape),
          weight_bits=leaf.bits,
          dtype=f"int{leaf.storage_bits}",
        )
      elif leaf_name in WEIGHTS:
        cur = cur._add(weight=_nbytes(leaf), n=_size(leaf), dtype=np.dtype(leaf.dtype).name)
      elif leaf_name in _ACT_BITS and not isinstance(leaf, jax.ShapeDtypeStruct):
        cur = cur._add(quant=_nbytes(leaf), act_bits=int(np.asarray(leaf)))
      elif leaf_name in QUANT_METADATA:
        cur = cur._add(quant=_nbytes(leaf))
      else:
        cur = cur._add(other=_nbytes(leaf))
      layers[name] = cur
  return SizeReport(tuple(layers.values()))


def compare_sizes(baseline, other, names: tuple[str, str] = ("float", "quantized")) -> str:
  """Side-by-side table of two models' sizes, ``other`` as a percentage of ``baseline``.

  Args:
    baseline: a :class:`SizeReport` or a variables dict (e.g. the float model's).
    other: a :class:`SizeReport` or a variables dict (e.g. the converted one).
    names: column titles.

  Returns:
    The table as text; one row per layer present in either model, and a total.

  Example:
    >>> f32 = {"params": {"Dense_0": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)}}}
    >>> bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), f32)
    >>> print(compare_sizes(f32, bf16, ("f32", "bf16")))
    layer      f32   bf16      %
    -------  -----  -----  -----
    Dense_0  272 B  136 B  50.0%
    total    272 B  136 B  50.0%
  """
  a = baseline if isinstance(baseline, SizeReport) else model_size(baseline)
  b = other if isinstance(other, SizeReport) else model_size(other)
  order = [lay.name for lay in a.layers] + [
    lay.name for lay in b.layers if lay.name not in {x.name for x in a.layers}
  ]
  amap, bmap = {lay.name: lay.total for lay in a.layers}, {lay.name: lay.total for lay in b.layers}
  pct = lambda x, y: f"{100.0 * y / x:.1f}%" if x and y is not None else "-"
  rows = [
    (
      n,
      _fmt(amap[n]) if n in amap else "-",
      _fmt(bmap[n]) if n in bmap else "-",
      pct(amap.get(n, 0), bmap.get(n)),
    )
    for n in order
  ]
  rows.append(("total", _fmt(a.total), _fmt(b.total), pct(a.total, b.total)))
  return _render(("layer", *names, "%"), rows)
