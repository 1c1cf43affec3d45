"""The glue between layers: one handler per JAX primitive, in the table :data:`HANDLERS`.

A handler ``handle(builder, eqn, ins)`` receives the equation and its inputs (a
:class:`~qatjax.export.onnx._graph.Tensor`, a lazy :class:`~qatjax.export.onnx._graph.Scaled`, or a
numpy constant; at least one is not a constant, constants are folded before) and returns the
output value. :func:`handler_for` looks a primitive up and names it when there is none.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from qatjax.export.onnx._graph import Builder, Scaled, Tensor, to_channels_first

HANDLERS: dict[str, Callable] = {}


def handles(*names: str):
  """Registers the decorated function as the handler of the primitives ``names``."""

  def register(fn):
    for name in names:
      HANDLERS[name] = fn
    return fn

  return register


def handler_for(name: str) -> Callable:
  """The handler of the primitive ``name``.

  Raises:
    ValueError: naming the primitive when no handler exists.

  Example:
    >>> from qatjax.export.onnx._primitives import HANDLERS, handler_for
    >>> handler_for("tanh") is HANDLERS["tanh"]
    True
    >>> handler_for("cumsum")
    Traceback (most recent call last):
    ...
    ValueError: export_onnx: unsupported operation 'cumsum' between layers (supported: ...)
  """
  handler = HANDLERS.get(name)
  if handler is None:
    raise ValueError(
      f"export_onnx: unsupported operation {name!r} between layers (supported: relu and other "
      "elementwise ops, nn.max_pool, nn.avg_pool, reshape, transpose, reductions, concatenate)"
    )
  return handler


def _out(eqn, name: str, cf: bool = False) -> Tensor:
  """The equation's output as the graph tensor ``name``."""
  aval = eqn.outvars[0].aval
  return Tensor(name, tuple(aval.shape), cf, np.dtype(aval.dtype))


def _const_in(b: Builder, c, like: Tensor, base: str) -> str:
  """A constant operand of an elementwise op with ``like``, in ``like``'s dtype and layout."""
  c = np.asarray(c)
  if c.dtype != np.float32 and like.dtype == np.float32:
    c = c.astype(np.float32)
  if like.cf and c.ndim:
    r = len(like.shape)
    c = c.reshape((1,) * (r - c.ndim) + c.shape).transpose(to_channels_first(r))
  return b.init(c, base)


def _plain_input(b: Builder, ins) -> Tensor:
  """The first input as a tensor in its logical layout."""
  return b.plain(b.tensor(ins[0]))


# --- elementwise ---------------------------------------------------------------------------------

_UNARY = {
  "neg": "Neg",
  "exp": "Exp",
  "log": "Log",
  "tanh": "Tanh",
  "logistic": "Sigmoid",
  "sqrt": "Sqrt",
  "abs": "Abs",
  "sign": "Sign",
  "floor": "Floor",
  "ceil": "Ceil",
  "erf": "Erf",
  "sin": "Sin",
  "cos": "Cos",
}
_BINARY = {
  "add": "Add",
  "sub": "Sub",
  "mul": "Mul",
  "div": "Div",
  "max": "Max",
  "min": "Min",
  "pow": "Pow",
}


def _unary(op: str) -> Callable:
  def handle(b: Builder, eqn, ins):
    t = b.tensor(ins[0])
    return _out(eqn, b.node(op, [t.name], eqn.primitive.name), t.cf)

  return handle


HANDLERS.update({name: _unary(op) for name, op in _UNARY.items()})


@handles("stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision")
def _identity(b: Builder, eqn, ins):
  return ins[0]


@handles("convert_element_type")
def _convert_element_type(b: Builder, eqn, ins):
  t, dtype = b.tensor(ins[0]), np.dtype(eqn.params["new_dtype"])
  return t if dtype == np.dtype(t.dtype) else b.cast(t, dtype)


@handles("rsqrt")
def _rsqrt(b: Builder, eqn, ins):
  t = b.tensor(ins[0])
  return _out(eqn, b.node("Reciprocal", [b.node("Sqrt", [t.name], "sqrt")], "rsqrt"), t.cf)


@handles("square", "integer_pow")
def _power(b: Builder, eqn, ins):
  t = b.tensor(ins[0])
  y = 2 if eqn.primitive.name == "square" else int(eqn.params["y"])
  if y == 2:
    return _out(eqn, b.node("Mul", [t.name, t.name], eqn.primitive.name), t.cf)
  e = b.init(np.float32(y), "exponent")
  return _out(eqn, b.node("Pow", [t.name, e], eqn.primitive.name), t.cf)


@handles(*_BINARY)
def _binary(b: Builder, eqn, ins):
  name, shape = eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)
  x, y = ins
  if (  # nn.avg_pool: the window sum divided by the window size
    name == "div"
    and isinstance(x, Scaled)
    and isinstance(y, np.ndarray)
    and y.size == 1
    and np.isclose(float(y), x.factor, rtol=1e-6)
  ):
    return x.t
  if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
    t, c, t_first = (y, x, False) if isinstance(x, np.ndarray) else (x, y, True)
    t = b.tensor(t)
    if t.cf and (np.ndim(c) > len(t.shape) or len(shape) != len(t.shape)):
      t = b.plain(t)
    if name == "max" and np.ndim(c) == 0 and float(c) == 0.0:
      return _out(eqn, b.node("Relu", [t.name], "relu"), t.cf)
    cn = _const_in(b, c, t, name + "_const")
    names = [t.name, cn] if t_first else [cn, t.name]
    return _out(eqn, b.node(_BINARY[name], names, name), t.cf)
  x, y = b.tensor(x), b.tensor(y)
  same_rank = len(x.shape) == len(y.shape) == len(shape)
  if x.cf != y.cf:
    x, y = (b.cfirst(x), b.cfirst(y)) if same_rank else (b.plain(x), b.plain(y))
  elif x.cf and not same_rank:
    x, y = b.plain(x), b.plain(y)
  return _out(eqn, b.node(_BINARY[name], [x.name, y.name], name), x.cf)


@handles("clamp")
def _clamp(b: Builder, eqn, ins):
  lo, x, hi = ins
  if not all(isinstance(v, np.ndarray) and v.size == 1 for v in (lo, hi)):
    raise ValueError("export_onnx: clamp with tensor bounds is not supported")
  t = b.tensor(x)
  bounds = [b.init(np.float32(lo), "clip_min"), b.init(np.float32(hi), "clip_max")]
  return _out(eqn, b.node("Clip", [t.name, *bounds], "clamp"), t.cf)


# --- pooling -------------------------------------------------------------------------------------


@handles("reduce_window_max", "reduce_window_sum")
def _pool(b: Builder, eqn, ins):
  name, params = eqn.primitive.name, eqn.params
  win, st = params["window_dimensions"], params["window_strides"]
  pad, bd, wd = params["padding"], params["base_dilation"], params["window_dilation"]
  if (
    len(win) < 3
    or win[0] != 1
    or win[-1] != 1
    or st[0] != 1
    or st[-1] != 1
    or any(d != 1 for d in bd)
    or tuple(pad[0]) != (0, 0)
    or tuple(pad[-1]) != (0, 0)
  ):
    raise ValueError(
      f"export_onnx: {name} with window {win}, strides {st}, padding {pad}, "
      f"base dilation {bd} is not a spatial pooling (batch, ..., channels)"
    )
  t = b.cfirst(b.tensor(ins[0]))
  attrs = dict(
    kernel_shape=list(win[1:-1]),
    strides=list(st[1:-1]),
    pads=[int(lo) for lo, _ in pad[1:-1]] + [int(hi) for _, hi in pad[1:-1]],
  )
  if any(d != 1 for d in wd):
    attrs["dilations"] = list(wd[1:-1])
  if name == "reduce_window_max":
    return _out(eqn, b.node("MaxPool", [t.name], "maxpool", **attrs), True)
  y = b.node("AveragePool", [t.name], "avgpool", count_include_pad=1, **attrs)
  return Scaled(_out(eqn, y, True), float(math.prod(win)))


# --- shapes and reductions -----------------------------------------------------------------------


@handles("reshape")
def _reshape(b: Builder, eqn, ins):
  return b.reshape(_plain_input(b, ins), tuple(eqn.outvars[0].aval.shape), "reshape")


@handles("squeeze")
def _squeeze(b: Builder, eqn, ins):
  t = _plain_input(b, ins)
  axes = b.init(np.asarray(eqn.params["dimensions"], np.int64), "axes")
  return _out(eqn, b.node("Squeeze", [t.name, axes], "squeeze"))


@handles("broadcast_in_dim")
def _broadcast_in_dim(b: Builder, eqn, ins):
  """``Unsqueeze`` to the output's rank (batch-agnostic), then ``Expand`` if sizes grow."""
  t, shape = _plain_input(b, ins), tuple(eqn.outvars[0].aval.shape)
  dims = tuple(eqn.params["broadcast_dimensions"])
  new_axes = [a for a in range(len(shape)) if a not in dims]
  y = t.name
  if new_axes:
    axes = b.init(np.asarray(new_axes, np.int64), "axes")
    y = b.node("Unsqueeze", [y, axes], "broadcast_in_dim")
  mid = [1] * len(shape)
  for i, d in enumerate(dims):
    mid[d] = t.shape[i]
  if tuple(mid) != shape:
    target = list(shape)
    if b.dynamic and target and target[0] == b.batch:
      target[0] = 1  # Expand broadcasts the batch dim of its input
    y = b.node("Expand", [y, b.shape_const(target, "expand_shape")], "expand")
  return _out(eqn, y)


@handles("transpose")
def _transpose(b: Builder, eqn, ins):
  t = _plain_input(b, ins)
  return _out(eqn, b.node("Transpose", [t.name], "transpose", perm=list(eqn.params["permutation"])))


_REDUCE = {"reduce_max": "ReduceMax", "reduce_min": "ReduceMin", "reduce_sum": "ReduceSum"}


@handles(*_REDUCE)
def _reduce(b: Builder, eqn, ins):
  t, name = _plain_input(b, ins), eqn.primitive.name
  axes = b.init(np.asarray(eqn.params["axes"], np.int64), "axes")
  return _out(eqn, b.node(_REDUCE[name], [t.name, axes], name, keepdims=0))


@handles("argmax", "argmin")
def _argmax(b: Builder, eqn, ins):
  t, name = _plain_input(b, ins), eqn.primitive.name
  (axis,) = eqn.params["axes"]
  op = "ArgMax" if name == "argmax" else "ArgMin"
  y = b.node(op, [t.name], name, axis=int(axis), keepdims=0)
  indices = Tensor(y, tuple(eqn.outvars[0].aval.shape), False, np.dtype(np.int64))
  dtype = np.dtype(eqn.params["index_dtype"])
  return indices if dtype == indices.dtype else b.cast(indices, dtype)


@handles("concatenate")
def _concatenate(b: Builder, eqn, ins):
  dtype = np.dtype(eqn.outvars[0].aval.dtype)
  names = [
    b.init(np.asarray(v, dtype), "concat_const")
    if isinstance(v, np.ndarray)
    else b.plain(b.tensor(v)).name
    for v in ins
  ]
  return _out(eqn, b.node("Concat", names, "concatenate", axis=int(eqn.params["dimension"])))


@handles("dot_general")
def _dot_general(b: Builder, eqn, ins):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  a, w = ins
  if (
    isinstance(a, np.ndarray)
    or not isinstance(w, np.ndarray)
    or lb
    or rb
    or tuple(lc) != (len(a.shape) - 1,)
    or tuple(rc) != (0,)
    or w.ndim != 2
  ):
    raise ValueError(
      "export_onnx: only `tensor @ constant matrix` dot_general is supported between layers"
    )
  t = _plain_input(b, ins)
  wn = b.init(np.asarray(w, np.float32), "matmul_const")
  return _out(eqn, b.node("MatMul", [t.name, wn], "matmul"))
