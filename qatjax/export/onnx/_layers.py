"""One emitter per layer kind: a recorded :class:`~qatjax.export.onnx._record.Layer` as ONNX nodes.

:data:`EMITTERS` maps each kind of :data:`qatjax.ops.registry.KINDS` to a function
``emit(builder, layer, x) -> Tensor``:

* ``dense``: the input's QDQ, the kernel's DQ, ``Gemm`` (2-D inputs) or ``MatMul`` + ``Add``;
* ``dense_general``: the same on the input with its contracted axes moved last and merged, and
  on the N-D kernel as a ``(K, N)`` matrix (per-channel scales along its columns), reshaped back
  to the layer's output;
* ``conv`` / ``conv_bn`` (BN folded by ``convert``): ``Conv`` in NCHW, with the op's own padding
  (:class:`~qatjax.ops.conv.ConvGeometry`; circular / reflect padding as a ``Pad`` first);
* ``embed``: the lookup as ``Gather`` of the dequantized integer table (per-row scales) at the
  integer ids; ``attend`` as ``MatMul`` with the transposed table;
* ``act``: ``QAct``'s QDQ (nothing when it is an identity).
"""

from __future__ import annotations

import math

import numpy as np

from qatjax.export.onnx._graph import Builder, Tensor
from qatjax.export.onnx._qdq import emit_act_quant, emit_weight
from qatjax.export.onnx._record import Layer
from qatjax.linen.dense import _canon_axes
from qatjax.ops.conv import ConvGeometry


def _quantized_input(b: Builder, layer: Layer, t: Tensor) -> Tensor:
  """The layer's input in its logical layout, quantized and dequantized if the layer does."""
  t = b.plain(t)
  return t if layer.act is None else emit_act_quant(b, t, layer.act, layer.path + ".input")


def _matmul(b: Builder, layer: Layer, t: Tensor, w: str, out_shape) -> Tensor:
  """``t @ w (+ bias)``: ``Gemm`` for a 2-D ``t``, else ``MatMul`` (+ ``Add``)."""
  bias = layer.params.get("bias")
  base = layer.path + ".out"
  if bias is not None:
    bias = b.init(np.asarray(bias, np.float32).reshape(-1), layer.path + ".bias")
  if len(t.shape) == 2:
    return Tensor(b.node("Gemm", [t.name, w] + ([bias] if bias else []), base), tuple(out_shape))
  y = b.node("MatMul", [t.name, w], base if bias is None else base + ".matmul")
  if bias is not None:
    y = b.node("Add", [y, bias], base)
  return Tensor(y, tuple(out_shape))


def emit_dense(b: Builder, layer: Layer, t: Tensor) -> Tensor:
  t = _quantized_input(b, layer, t)
  w = emit_weight(b, layer.params["kernel"], layer.path + ".kernel", channel_axis=1)
  return _matmul(b, layer, t, w, layer.out_shape)


def emit_dense_general(b: Builder, layer: Layer, t: Tensor) -> Tensor:
  m, kernel = layer.module, layer.params["kernel"]
  if getattr(m, "batch_dims", ()):
    raise ValueError(
      f"export_onnx: layer {layer.path}: batch_dims={m.batch_dims!r} is not supported"
    )
  rank = len(layer.in_shape)
  axis = _canon_axes(m.axis, rank)
  free = [a for a in range(rank) if a not in axis]
  lead = tuple(layer.in_shape[a] for a in free)
  k, n = math.prod(kernel.shape[: len(axis)]), math.prod(kernel.shape[len(axis) :])
  t = _quantized_input(b, layer, t)
  if free + list(axis) != list(range(rank)):  # contracted axes last
    perm = free + list(axis)
    shape = tuple(layer.in_shape[a] for a in perm)
    t = Tensor(b.node("Transpose", [t.name], layer.path + ".contract_last", perm=perm), shape)
  if len(axis) > 1:
    t = b.reshape(t, lead + (k,), layer.path + ".contract")
  w = emit_weight(b, kernel, layer.path + ".kernel", channel_axis=1, shape=(k, n))
  y = _matmul(b, layer, t, w, lead + (n,))
  return y if y.shape == layer.out_shape else b.reshape(y, layer.out_shape, layer.path + ".split")


def emit_conv(b: Builder, layer: Layer, t: Tensor) -> Tensor:
  m = layer.module
  g = ConvGeometry.of(m, layer.in_shape, layer.path)
  nd = len(g.kernel_size)
  if len(layer.in_shape) != nd + 2:
    raise ValueError(
      f"export_onnx: layer {layer.path}: inputs with several batch dims "
      f"{layer.in_shape} are not supported"
    )
  if any(d != 1 for d in g.input_dilation):
    raise ValueError(
      f"export_onnx: layer {layer.path}: input_dilation={m.input_dilation!r} "
      "(transposed convolution) is not supported"
    )
  t = b.cfirst(t)
  if layer.act is not None:
    t = emit_act_quant(b, t, layer.act, layer.path + ".input")
  name = t.name
  special = g.special_pads()
  if special is None:
    pairs = g.explicit_pads(layer.in_shape[1:-1], g.padding)
  elif special[0] == "constant":  # zero padding (the input's zero point): the conv's own
    pairs = special[1]
  else:  # circular / reflect: a Pad node, then a VALID conv
    mode, spatial = special
    pads = [0, 0] + [lo for lo, _ in spatial] + [0, 0] + [hi for _, hi in spatial]
    pads = b.init(np.asarray(pads, np.int64), layer.path + ".pads")
    name = b.node("Pad", [name, pads], layer.path + ".padded", mode=mode)
    pairs = [(0, 0)] * nd
  perm = [nd + 1, nd] + list(range(nd))  # HWIO -> OIHW
  ins = [
    name,
    emit_weight(b, layer.params["kernel"], layer.path + ".kernel", channel_axis=0, perm=perm),
  ]
  if "bias" in layer.params:
    ins.append(b.init(np.asarray(layer.params["bias"], np.float32), layer.path + ".bias"))
  y = b.node(
    "Conv",
    ins,
    layer.path + ".out",
    kernel_shape=list(g.kernel_size),
    strides=list(g.strides),
    dilations=list(g.kernel_dilation),
    group=int(m.feature_group_count),
    pads=[int(lo) for lo, _ in pairs] + [int(hi) for _, hi in pairs],
  )
  return Tensor(y, layer.out_shape, True)


def emit_embed(b: Builder, layer: Layer, t: Tensor) -> Tensor:
  base = layer.path + ".embedding"
  w = b.once(base, lambda: emit_weight(b, layer.params["embedding"], base, channel_axis=0))
  if layer.method == "attend":  # query @ table.T, with the lookup's table; the query quantized
    t = _quantized_input(b, layer, t)
    w = b.once(base + ".T", lambda: b.node("Transpose", [w], base + ".T", perm=[1, 0]))
    return Tensor(b.node("MatMul", [t.name, w], layer.path + ".out"), layer.out_shape)
  t = b.plain(t)
  if np.dtype(t.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
    t = b.cast(t, np.int64)  # Gather's indices
  return Tensor(b.node("Gather", [w, t.name], layer.path + ".out", axis=0), layer.out_shape)


def emit_act(b: Builder, layer: Layer, t: Tensor) -> Tensor:
  return t if layer.act is None else emit_act_quant(b, t, layer.act, layer.path)


EMITTERS = {
  "dense": emit_dense,
  "dense_general": emit_dense_general,
  "conv": emit_conv,
  "conv_bn": emit_conv,
  "embed": emit_embed,
  "act": emit_act,
}
