"""The QDQ nodes of a layer: its quantized input and its integer weight.

* the input: ``[Clip ->] QuantizeLinear -> DequantizeLinear`` with the layer's frozen scale and
  zero point (``uint8``, or ``int8`` for a symmetric range; narrower ranges such as 4-bit
  activations are clipped first);
* the weight: an integer initializer (``INT8``, or ``INT4`` for 4 bits and fewer) and a
  ``DequantizeLinear`` per channel (``axis``), per tensor, or blocked (``block_size``, per group).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qatjax.core.qarray import QArray
from qatjax.export.onnx._graph import Builder, Tensor


@dataclasses.dataclass(frozen=True)
class ActQDQ:
  """An activation's frozen quantization:
  ``q = clip(round(x / scale) + zero_point, qmin, qmax)``."""

  scale: float
  zero_point: float
  qmin: int
  qmax: int


def emit_act_quant(b: Builder, t: Tensor, act: ActQDQ, base: str) -> Tensor:
  """``t`` quantized and dequantized with ``act`` (same layout)."""
  signed = act.qmin < 0
  dtype = np.int8 if signed else np.uint8
  lo, hi = (-128, 127) if signed else (0, 255)
  s, z = act.scale, act.zero_point
  name = t.name
  if (act.qmin, act.qmax) != (lo, hi):
    cmin = b.init(np.float32((act.qmin - z) * s), base + ".clip_min")
    cmax = b.init(np.float32((act.qmax - z) * s), base + ".clip_max")
    name = b.node("Clip", [name, cmin, cmax], base + ".clipped")
  sn = b.init(np.float32(s), base + ".scale")
  zn = b.init(np.asarray(round(z), dtype), base + ".zero_point")
  q = b.node("QuantizeLinear", [name, sn, zn], base + ".q")
  return Tensor(b.node("DequantizeLinear", [q, sn, zn], base + ".dq"), t.shape, t.cf)


def _reshaped_axis(old, new, axis: int) -> int:
  """The axis of ``new`` holding the elements of ``old``'s ``axis`` after a C-order reshape.

  Raises:
    ValueError: when the reshape merges or splits that axis.
  """
  lead = math.prod(old[:axis])
  for i in range(len(new)):
    if math.prod(new[:i]) == lead and new[i] == old[axis]:
      return i
  raise ValueError(f"export_onnx: reshaping {tuple(old)} to {tuple(new)} splits axis {axis}")


def emit_weight(b: Builder, kernel, base: str, *, channel_axis: int, perm=None, shape=None) -> str:
  """A layer's weight as it enters the ONNX op: transposed by ``perm``, then reshaped to
  ``shape`` (the logical, unpacked weight; ``QArray.perm`` is only its storage order).

  A float weight is a float initializer. A :class:`QArray` is an integer initializer and a
  ``DequantizeLinear``: per channel along ``channel_axis`` of the result, per tensor, or blocked
  along the group axis. Returns the name of the (dequantized) weight.
  """
  perm = list(range(len(kernel.shape))) if perm is None else list(perm)
  if not isinstance(kernel, QArray):
    w = np.asarray(kernel, np.float32).transpose(perm)
    return b.init(w if shape is None else w.reshape(shape), base)
  q = np.asarray(kernel.unpack()).transpose(perm)
  shape = q.shape if shape is None else tuple(shape)
  int4 = kernel.bits <= 4 and b.int4
  scale = np.asarray(kernel.scale, np.float32)
  zp = np.rint(np.asarray(kernel.zero_point, np.float32)).astype(np.int8)
  zp = np.broadcast_to(zp, scale.shape)  # symmetric weights store one scalar zero point
  attrs = {}
  if kernel.group_size is not None:  # blocked: the scale has the weight's rank
    axis = perm.index(kernel.axis)
    blocks = list(q.shape)
    blocks[axis] = scale.shape[kernel.axis]
    new_axis = _reshaped_axis(q.shape, shape, axis)
    out_blocks = list(shape)
    out_blocks[new_axis] = blocks[axis]
    scale, zp = (
      np.ascontiguousarray(np.broadcast_to(p.transpose(perm), blocks).reshape(out_blocks))
      for p in (scale, zp)
    )
    attrs = dict(axis=new_axis, block_size=kernel.group_size)
  elif scale.size > 1:  # per channel
    scale, zp = scale.transpose(perm).reshape(-1), zp.transpose(perm).reshape(-1)
    if scale.size != shape[channel_axis]:
      raise ValueError(
        f"export_onnx: {base}: {scale.size} channel scales do not match axis "
        f"{channel_axis} of the weight {shape}"
      )
    attrs = dict(axis=channel_axis)
  else:
    scale, zp = scale.reshape(()), zp.reshape(())
  wn = b.init(q.reshape(shape), base + ".q", int4)
  sn = b.init(scale, base + ".scale")
  zn = b.init(zp, base + ".zero_point", int4)
  return b.node("DequantizeLinear", [wn, sn, zn], base, **attrs)
