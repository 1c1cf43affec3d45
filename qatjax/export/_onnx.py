"""``export_onnx``: a converted model as an ONNX QDQ graph (QuantizeLinear / DequantizeLinear).

Design: the model is traced with :func:`jax.make_jaxpr` while a Flax method interceptor replaces
every layer call (``QDense``, ``QConv``, ``QConvBN``, ``QAct``, and float ``nn.Dense`` /
``nn.Conv``) by one opaque primitive. The resulting jaxpr holds one equation per layer plus the
"glue" between layers (ReLU, ``nn.max_pool`` / ``nn.avg_pool``, reshape / flatten, residual adds,
log-softmax, ...), which is translated primitive by primitive. Any other layer or primitive raises
a ``ValueError`` naming it. The layers themselves are emitted from their converted variables:

* the layer input: ``QuantizeLinear -> DequantizeLinear`` with the layer's input scale and zero
  point (``uint8``, or ``int8`` for symmetric activations; narrower ranges such as 4-bit
  activations are clipped with a ``Clip`` first);
* the kernel: an integer initializer with a per-channel ``DequantizeLinear`` (``axis`` = output
  channel), per-tensor, or blocked (``block_size``) for per-group weights;
* ``MatMul`` (+ ``Add`` of the float bias; ``Gemm`` for 2-D inputs) or ``Conv`` (with its bias).

Convolutions run in NCHW: the (NHWC) graph input is transposed once before the first conv, and
back only where a layout-sensitive op (reshape / flatten, dense, reductions) needs it.

Weights of 2..4 bits are stored as ``INT4`` initializers (opset 21, two values per byte; pass
``int4=False`` for ``INT8`` storage, which onnxruntime fuses into integer kernels). 5..8-bit
weights are ``INT8``.

Accuracy: onnxruntime computes the same integers as ``model.apply(qvars, x)`` (it fuses
``DQ -> MatMul`` into ``MatMulIntegerToFloat`` / ``QLinearConv``, or runs the dequantized float op
on the same integer values). Differences come from float rounding (about 1e-6 relative) and from
inputs that sit exactly on a rounding boundary (``x / s`` in ONNX, ``x * (1 / s)`` in qatjax): those
move one activation by one step, which changes the output by at most a few output quantization
steps. Weight-only layers (no activation quantizer) are the exception: onnxruntime's extended
optimisations rewrite ``DQ -> MatMul`` into ``MatMulNBits``, which quantizes the float input on the
fly (about 1e-2 relative error); use ``GraphOptimizationLevel.ORT_ENABLE_BASIC`` for those.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from qatjax.core.qarray import QArray
from qatjax.core.rules import resolve
from qatjax.linen.act import QAct
from qatjax.linen.context import module_path
from qatjax.linen.conv import QConv
from qatjax.linen.conv import conv_call as conv_forward
from qatjax.linen.conv_bn import QConvBN
from qatjax.linen.dense import QDense, QDenseGeneral
from qatjax.linen.dense import dense_call as dense_forward
from qatjax.linen.embed import QEmbed
from qatjax.linen.quantize_model import QuantizedModel
from qatjax.ops.conv import ConvGeometry
from qatjax.ops.registry import RECORD as EXPORT
from qatjax.ops.registry import STATS

_DENSE_TYPES = (QDense, nn.Dense)
_CONV_TYPES = (QConv, QConvBN, nn.Conv)
_FORWARDS = {nn.Dense: dense_forward, nn.Conv: conv_forward}
_UNSUPPORTED_TYPES = (QDenseGeneral, QEmbed, nn.DenseGeneral, nn.Embed, nn.ConvTranspose, nn.Einsum)

_layer_p = jcore.Primitive("qatjax_onnx_layer")
_layer_p.def_abstract_eval(lambda x, *, index, out_aval: out_aval)
_layer_p.def_impl(lambda x, *, index, out_aval: jnp.zeros(out_aval.shape, out_aval.dtype))


def _onnx():
  try:
    import onnx
  except ImportError as e:  # pragma: no cover
    raise ImportError("export_onnx needs the `onnx` package: pip install 'qatjax[export]'") from e
  return onnx


# --- pass 1: record the layers -------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
  kind: str  # "dense" | "conv" | "act"
  path: str
  module: Any
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  variables: dict  # collection -> {name: value}, concrete
  act: tuple | None = None  # (scale, zero_point, qmin, qmax) of the quantized input, or None


def _vars(m) -> dict:
  return {col: dict(tree) for col, tree in m.variables.items()}


def _layer_kind(m, method_name) -> str | None:
  """The kind of a module call to intercept, ``None`` to let it run (containers, glue)."""
  if method_name != "__call__":
    return None
  if isinstance(m, _UNSUPPORTED_TYPES):
    raise ValueError(
      f"export_onnx: layer {module_path(m)} ({type(m).__name__}) is not supported; "
      "supported layers: QDense, QConv, QConvBN, QAct, nn.Dense, nn.Conv"
    )
  if isinstance(m, QAct):
    return "act"
  if isinstance(m, _DENSE_TYPES):
    return "dense"
  if isinstance(m, _CONV_TYPES):
    return "conv"
  return None


def _cfg(m, rules):
  path = module_path(m)
  if rules is not None:
    return rules.match(path)[1]
  return resolve(getattr(m, "config", None), path)


def _input_quant(m, v, cfg):
  """``(scale, zero_point, qmin, qmax)`` of a converted layer's input, or ``None``."""
  params = v.get("params", {})
  if "input_scale" not in params:
    return None
  if cfg is None or cfg.act_bits is None:
    raise ValueError(
      f"export_onnx: layer {module_path(m)} has an input scale but its config "
      "quantizes no activations"
    )
  qmin, qmax = cfg.act_range
  return (
    float(np.asarray(params["input_scale"])),
    float(np.asarray(params["input_zero_point"])),
    qmin,
    qmax,
  )


def _check_layer(m, kind, v, cfg):
  path = module_path(m)
  stats = v.get(STATS, {})
  if kind in ("dense", "conv"):
    kernel = v.get("params", {}).get("kernel")
    if kernel is None:
      raise ValueError(f"export_onnx: layer {path} has no kernel")
    if not isinstance(kernel, QArray) and (stats or (cfg is not None and _quantizes(cfg))):
      raise ValueError(
        f"export_onnx: layer {path} is not converted (float kernel with a "
        "quantizer); run qatjax.convert first"
      )
    if kind == "conv" and isinstance(m, QConvBN) and not isinstance(kernel, QArray):
      raise ValueError(f"export_onnx: layer {path} (QConvBN) must be converted (BN folded) first")


def _quantizes(cfg) -> bool:
  return cfg.weight_bits is not None or cfg.act_bits is not None


def _record(model, qvars, x, rules, apply_kwargs):
  """Runs the model once, recording every layer call in order (with concrete variables)."""
  layers: list[_Layer] = []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    kind = _layer_kind(m, context.method_name)
    if kind is None:
      return next_fun(*args, **kwargs)
    if not args or not hasattr(args[0], "shape"):
      raise ValueError(f"export_onnx: layer {module_path(m)} must be called with one array")
    cfg = _cfg(m, rules)
    if rules is not None and type(m) in _FORWARDS:  # quantize_model: what its interceptor runs
      y = _FORWARDS[type(m)](m, *args, cfg, **kwargs)
    else:
      y = next_fun(*args, **kwargs)
    v = _vars(m)
    _check_layer(m, kind, v, cfg)
    act = None if kind == "act" else _input_quant(m, v, cfg)
    layers.append(_Layer(kind, module_path(m), m, tuple(args[0].shape), tuple(y.shape), v, act))
    return y

  with nn.intercept_methods(interceptor):
    y, exported = model.apply(qvars, x, mutable=[EXPORT], **apply_kwargs)
  exported = exported.get(EXPORT, {})
  for layer in layers:
    if layer.kind == "act":
      layer.act = _qact_params(layer, exported, rules)
  return layers, y


def _qact_params(layer, exported, rules):
  """A ``QAct``'s scale / zero point from the ``quant_export`` pass (``None`` = identity)."""
  m = layer.module
  cfg = _cfg(m, rules)
  if cfg is None or cfg.act_bits is None:
    return None
  node = exported
  for p in m.path:
    node = node.get(p, {})
  if "input_scale" not in node:
    return None
  enabled = bool(np.asarray(layer.variables.get(STATS, {}).get("enabled", True)))
  if not (enabled and bool(np.asarray(node["input_calibrated"]))):
    return None
  qmin, qmax = cfg.act_range
  return (
    float(np.asarray(node["input_scale"])),
    float(np.asarray(node["input_zero_point"])),
    qmin,
    qmax,
  )


# --- pass 2: the jaxpr with one primitive per layer ----------------------------------------------


def _trace(model, qvars, x, layers, apply_kwargs):
  it = iter(range(len(layers)))

  def interceptor(next_fun, args, kwargs, context):
    if _layer_kind(context.module, context.method_name) is None:
      return next_fun(*args, **kwargs)
    i = next(it)
    aval = jax.core.ShapedArray(layers[i].out_shape, jnp.float32)
    return _layer_p.bind(args[0], index=i, out_aval=aval)

  def f(inp):
    with nn.intercept_methods(interceptor):
      return model.apply(qvars, inp, **apply_kwargs)

  return jax.make_jaxpr(f)(x)


# --- ONNX graph building -------------------------------------------------------------------------


def _cl_to_cf(r):
  return [0, r - 1] + list(range(1, r - 1))


def _cf_to_cl(r):
  return [0] + list(range(2, r)) + [1]


@dataclasses.dataclass
class _T:
  """A graph tensor: ONNX name, logical (JAX, channels-last) shape, and whether it is stored
  channels-first (physically transposed by ``_cl_to_cf``)."""

  name: str
  shape: tuple[int, ...]
  cf: bool = False
  dtype: Any = np.float32


@dataclasses.dataclass
class _Scaled:
  """A lazy ``tensor * factor`` (``reduce_window_sum`` = ``AveragePool * window``): a following
  division by the same factor (``nn.avg_pool``) cancels it."""

  t: _T
  factor: float


class _Builder:
  def __init__(self, onnx, batch, dynamic_batch, int4):
    self.onnx = onnx
    self.h = onnx.helper
    self.nodes, self.inits = [], []
    self.names: dict[str, int] = {}
    self.batch, self.dynamic, self.int4 = batch, dynamic_batch, int4
    self.layout_cache: dict[tuple[str, bool], _T] = {}

  def fresh(self, base):
    base = base.replace("/", ".")
    n = self.names.get(base, 0)
    self.names[base] = n + 1
    return base if n == 0 else f"{base}_{n}"

  def init(self, array, base, tensor_type=None):
    name = self.fresh(base)
    a = np.asarray(array)
    if tensor_type is not None and tensor_type == self.onnx.TensorProto.INT4:
      self.inits.append(self.h.make_tensor(name, tensor_type, a.shape, _pack4(a), raw=True))
    else:
      a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (keeps 0-d arrays 0-d)
      self.inits.append(self.onnx.numpy_helper.from_array(a, name))
    return name

  def node(self, op, inputs, base, n_out=1, **attrs):
    outs = [self.fresh(base if n_out == 1 else f"{base}_{i}") for i in range(n_out)]
    self.nodes.append(self.h.make_node(op, inputs, outs, name=self.fresh("n." + base), **attrs))
    return outs[0] if n_out == 1 else outs

  # layouts

  def plain(self, t: _T) -> _T:
    if not t.cf:
      return t
    key = (t.name, False)
    if key not in self.layout_cache:
      out = self.node("Transpose", [t.name], t.name + ".nhwc", perm=_cf_to_cl(len(t.shape)))
      self.layout_cache[key] = _T(out, t.shape, False, t.dtype)
    return self.layout_cache[key]

  def cfirst(self, t: _T) -> _T:
    if t.cf:
      return t
    key = (t.name, True)
    if key not in self.layout_cache:
      out = self.node("Transpose", [t.name], t.name + ".nchw", perm=_cl_to_cf(len(t.shape)))
      self.layout_cache[key] = _T(out, t.shape, True, t.dtype)
    return self.layout_cache[key]

  def shape_const(self, shape, base):
    """A shape for Reshape / Expand; with a dynamic batch, ``0`` / ``1`` stands for it."""
    return self.init(np.asarray(shape, np.int64), base)


def _pack4(a):
  flat = (np.asarray(a).astype(np.int8).reshape(-1) & 0xF).astype(np.uint8)
  if flat.size % 2:
    flat = np.concatenate([flat, np.zeros(1, np.uint8)])
  return (flat[0::2] | (flat[1::2] << 4)).tobytes()


# --- layers --------------------------------------------------------------------------------------


def _emit_input_quant(b: _Builder, t: _T, act, base) -> _T:
  """``[Clip ->] QuantizeLinear -> DequantizeLinear`` with the layer's activation parameters."""
  s, z, qmin, qmax = act
  signed = qmin < 0
  dtype = np.int8 if signed else np.uint8
  lo, hi = (-128, 127) if signed else (0, 255)
  name = t.name
  if (qmin, qmax) != (lo, hi):
    cmin = b.init(np.float32((qmin - z) * s), base + ".clip_min")
    cmax = b.init(np.float32((qmax - z) * s), base + ".clip_max")
    name = b.node("Clip", [name, cmin, cmax], base + ".clipped")
  sn = b.init(np.float32(s), base + ".scale")
  zn = b.init(np.asarray(round(z), dtype), base + ".zero_point")
  q = b.node("QuantizeLinear", [name, sn, zn], base + ".q")
  dq = b.node("DequantizeLinear", [q, sn, zn], base + ".dq")
  return _T(dq, t.shape, t.cf)


def _emit_weight(b: _Builder, kernel, perm, out_axis, base):
  """The kernel as an initializer (+ ``DequantizeLinear`` if quantized), transposed by ``perm``.

  ``out_axis`` is the output-channel axis of the transposed kernel."""
  onnx = b.onnx
  if not isinstance(kernel, QArray):
    return b.init(np.asarray(kernel, np.float32).transpose(perm), base)
  q = np.asarray(kernel.unpack()).transpose(perm)
  low = kernel.bits <= 4 and b.int4
  ttype = onnx.TensorProto.INT4 if low else onnx.TensorProto.INT8
  scale = np.asarray(kernel.scale, np.float32)
  zp = np.rint(np.asarray(kernel.zero_point, np.float32)).astype(np.int8)
  attrs = {}
  if kernel.group_size is not None:  # blocked: scale has the kernel's rank
    scale = scale.transpose(perm)
    zp = zp.transpose(perm)
    axis = perm.index(kernel.axis)
    shape = list(q.shape)
    shape[axis] = scale.shape[axis]
    scale = np.ascontiguousarray(np.broadcast_to(scale, shape))
    zp = np.ascontiguousarray(np.broadcast_to(zp, shape))
    attrs = dict(axis=axis, block_size=kernel.group_size)
  elif scale.size > 1:  # per channel
    scale, zp = scale.reshape(-1), zp.reshape(-1)
    attrs = dict(axis=out_axis)
  else:
    scale, zp = scale.reshape(()), zp.reshape(())
  wn = b.init(q, base + ".q", ttype)
  sn = b.init(scale, base + ".scale")
  zn = b.init(zp, base + ".zero_point", ttype)
  return b.node("DequantizeLinear", [wn, sn, zn], base, **attrs)


def _emit_dense(b: _Builder, layer: _Layer, t: _T) -> _T:
  p = layer.variables["params"]
  t = b.plain(t)
  if layer.act is not None:
    t = _emit_input_quant(b, t, layer.act, layer.path + ".input")
  w = _emit_weight(b, p["kernel"], [0, 1], 1, layer.path + ".kernel")
  bias = p.get("bias")
  base = layer.path + ".out"
  if len(t.shape) == 2:
    ins = [t.name, w] + (
      [b.init(np.asarray(bias, np.float32), layer.path + ".bias")] if bias is not None else []
    )
    return _T(b.node("Gemm", ins, base), layer.out_shape)
  y = b.node("MatMul", [t.name, w], base if bias is None else base + ".matmul")
  if bias is not None:
    y = b.node("Add", [y, b.init(np.asarray(bias, np.float32), layer.path + ".bias")], base)
  return _T(y, layer.out_shape)


def _emit_conv(b: _Builder, layer: _Layer, t: _T) -> _T:
  m, p = layer.module, layer.variables["params"]
  x_aval = jax.ShapeDtypeStruct(layer.in_shape, jnp.float32)
  g = ConvGeometry.of(m, x_aval.shape, layer.path)
  ks, strides, in_dil, k_dil, padding = (
    g.kernel_size,
    g.strides,
    g.input_dilation,
    g.kernel_dilation,
    g.padding,
  )
  nd = len(ks)
  if len(layer.in_shape) != nd + 2:
    raise ValueError(
      f"export_onnx: layer {layer.path}: inputs with several batch dims "
      f"{layer.in_shape} are not supported"
    )
  if any(d != 1 for d in in_dil):
    raise ValueError(
      f"export_onnx: layer {layer.path}: input_dilation={m.input_dilation!r} "
      "(transposed convolution) is not supported"
    )
  t = b.cfirst(t)
  if layer.act is not None:
    t = _emit_input_quant(b, t, layer.act, layer.path + ".input")
  dilated = [(k - 1) * d + 1 for k, d in zip(ks, k_dil)]
  spatial = layer.in_shape[1:-1]
  name = t.name
  if padding in ("CIRCULAR", "REFLECT"):
    pairs = [((k - 1) // 2, k // 2) for k in dilated]
    pads = [0, 0] + [lo for lo, _ in pairs] + [0, 0] + [hi for _, hi in pairs]
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    name = b.node(
      "Pad",
      [name, b.init(np.asarray(pads, np.int64), layer.path + ".pads")],
      layer.path + ".padded",
      mode=mode,
    )
    pairs = [(0, 0)] * nd
  elif padding == "CAUSAL":
    pairs = [(k_dil[0] * (ks[0] - 1), 0)]
  elif isinstance(padding, str):
    pairs = lax.padtype_to_pads(spatial, dilated, strides, padding)
  else:
    pairs = padding
  perm = [nd + 1, nd] + list(range(nd))  # HWIO -> OIHW
  w = _emit_weight(b, p["kernel"], perm, 0, layer.path + ".kernel")
  ins = [name, w]
  if "bias" in p:
    ins.append(b.init(np.asarray(p["bias"], np.float32), layer.path + ".bias"))
  y = b.node(
    "Conv",
    ins,
    layer.path + ".out",
    kernel_shape=list(ks),
    strides=list(strides),
    dilations=list(k_dil),
    group=int(m.feature_group_count),
    pads=[int(lo) for lo, _ in pairs] + [int(hi) for _, hi in pairs],
  )
  return _T(y, layer.out_shape, True)


def _emit_act(b: _Builder, layer: _Layer, t: _T) -> _T:
  if layer.act is None:
    return t
  return _emit_input_quant(b, t, layer.act, layer.path)


# --- glue primitives -----------------------------------------------------------------------------

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
_IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision")
_REDUCE = {"reduce_max": "ReduceMax", "reduce_min": "ReduceMin", "reduce_sum": "ReduceSum"}
_CALLS = (
  "jit",
  "pjit",
  "closed_call",
  "core_call",
  "custom_jvp_call",
  "custom_vjp_call",
  "custom_vjp_call_jaxpr",
  "remat",
  "checkpoint",
  "named_call",
)


class _Converter:
  def __init__(self, b: _Builder, layers):
    self.b, self.layers = b, layers

  # values: np.ndarray (constant), _T (tensor) or _Scaled

  def tensor(self, v) -> _T:
    if isinstance(v, _Scaled):
      f = self.b.init(np.float32(v.factor), v.t.name + ".factor")
      return _T(self.b.node("Mul", [v.t.name, f], v.t.name + ".sum"), v.t.shape, v.t.cf)
    return v

  def const_in(self, c, like: _T, base):
    """A constant operand of an elementwise op with ``like``, in ``like``'s layout."""
    c = np.asarray(c)
    if c.dtype != np.float32 and like.dtype == np.float32:
      c = c.astype(np.float32)
    if like.cf and c.ndim:
      r = len(like.shape)
      c = c.reshape((1,) * (r - c.ndim) + c.shape).transpose(_cl_to_cf(r))
    return self.b.init(c, base)

  def run(self, closed, args):
    jaxpr = closed.jaxpr
    env = {var: np.asarray(val) for var, val in zip(jaxpr.constvars, closed.consts)}
    env.update(zip(jaxpr.invars, args))

    def read(a):
      if isinstance(a, jcore.Literal):
        return np.asarray(a.val)
      return env[a]

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      outs = self.eqn(eqn, ins)
      if not eqn.primitive.multiple_results:
        outs = [outs]
      env.update((v, val) for v, val in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar))
    return [read(a) for a in jaxpr.outvars]

  def eqn(self, eqn, ins):
    prim, params = eqn.primitive, eqn.params
    name = prim.name
    if name in _CALLS or (
      prim is not _layer_p
      and _sub_jaxpr(params) is not None
      and not all(isinstance(v, np.ndarray) for v in ins)
    ):
      sub = _sub_jaxpr(params)
      if sub is None:
        raise ValueError(f"export_onnx: cannot inline primitive {name!r}")
      return self.run(sub, ins)
    if all(isinstance(v, np.ndarray) for v in ins) and prim is not _layer_p:
      out = prim.bind(*[jnp.asarray(v) for v in ins], **params)  # constant folding
      return [np.asarray(o) for o in out] if prim.multiple_results else np.asarray(out)
    if prim is _layer_p:
      layer = self.layers[params["index"]]
      t = self.tensor(ins[0])
      emit = {"dense": _emit_dense, "conv": _emit_conv, "act": _emit_act}[layer.kind]
      return emit(self.b, layer, t)
    shape = tuple(eqn.outvars[0].aval.shape)
    base = name
    if name in _IDENTITY:
      return ins[0]
    if name == "convert_element_type":
      t = self.tensor(ins[0])
      if np.dtype(params["new_dtype"]) == np.dtype(t.dtype):
        return t
      return self.cast(t, np.dtype(params["new_dtype"]))
    if (
      name == "div"
      and isinstance(ins[0], _Scaled)
      and isinstance(ins[1], np.ndarray)
      and ins[1].size == 1
      and np.isclose(float(ins[1]), ins[0].factor, rtol=1e-6)
    ):
      return ins[0].t
    if name in _UNARY:
      t = self.tensor(ins[0])
      return _T(self.b.node(_UNARY[name], [t.name], base), shape, t.cf)
    if name == "rsqrt":
      t = self.tensor(ins[0])
      s = self.b.node("Sqrt", [t.name], "sqrt")
      return _T(self.b.node("Reciprocal", [s], base), shape, t.cf)
    if name == "integer_pow":
      t = self.tensor(ins[0])
      y = int(params["y"])
      if y == 2:
        return _T(self.b.node("Mul", [t.name, t.name], base), shape, t.cf)
      e = self.b.init(np.float32(y), "exponent")
      return _T(self.b.node("Pow", [t.name, e], base), shape, t.cf)
    if name == "square":
      t = self.tensor(ins[0])
      return _T(self.b.node("Mul", [t.name, t.name], base), shape, t.cf)
    if name in _BINARY:
      return self.binary(name, ins, shape)
    if name == "clamp":
      lo, x, hi = ins
      if not (
        isinstance(lo, np.ndarray) and isinstance(hi, np.ndarray) and lo.size == 1 and hi.size == 1
      ):
        raise ValueError("export_onnx: clamp with tensor bounds is not supported")
      t = self.tensor(x)
      return _T(
        self.b.node(
          "Clip",
          [
            t.name,
            self.b.init(np.float32(lo), "clip_min"),
            self.b.init(np.float32(hi), "clip_max"),
          ],
          base,
        ),
        shape,
        t.cf,
      )
    if name in ("reduce_window_max", "reduce_window_sum"):
      return self.pool(name, self.tensor(ins[0]), params, shape)
    t = self.b.plain(self.tensor(ins[0])) if not isinstance(ins[0], np.ndarray) else None
    if name in ("reshape", "squeeze", "expand_dims"):
      return _T(self.b.node("Reshape", [t.name, self.reshape_target(t.shape, shape)], base), shape)
    if name == "broadcast_in_dim":
      dims = params["broadcast_dimensions"]
      mid = [1] * len(shape)
      for i, d in enumerate(dims):
        mid[d] = t.shape[i]
      y = self.b.node("Reshape", [t.name, self.reshape_target(t.shape, tuple(mid))], base)
      if tuple(mid) != shape:
        target = list(shape)
        if self.b.dynamic and target and target[0] == self.b.batch:
          target[0] = 1
        y = self.b.node("Expand", [y, self.b.shape_const(target, "expand_shape")], "expand")
      return _T(y, shape)
    if name == "transpose":
      return _T(self.b.node("Transpose", [t.name], base, perm=list(params["permutation"])), shape)
    if name in _REDUCE:
      axes = self.b.init(np.asarray(params["axes"], np.int64), "axes")
      return _T(self.b.node(_REDUCE[name], [t.name, axes], base, keepdims=0), shape)
    if name == "argmax" or name == "argmin":
      (axis,) = params["axes"]
      y = self.b.node(
        "ArgMax" if name == "argmax" else "ArgMin", [t.name], base, axis=int(axis), keepdims=0
      )
      return self.cast(_T(y, shape, False, np.int64), np.dtype(params["index_dtype"]))
    if name == "concatenate":
      names = [
        self.b.init(np.asarray(v, np.float32), "concat_const")
        if isinstance(v, np.ndarray)
        else self.b.plain(self.tensor(v)).name
        for v in ins
      ]
      return _T(self.b.node("Concat", names, base, axis=int(params["dimension"])), shape)
    if name == "dot_general":
      return self.dot(eqn, ins, shape)
    raise ValueError(
      f"export_onnx: unsupported operation {name!r} between layers (supported: "
      "relu and other elementwise ops, nn.max_pool, nn.avg_pool, reshape, "
      "transpose, reductions, concatenate)"
    )

  def cast(self, t: _T, dtype):
    to = self.b.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _T(self.b.node("Cast", [t.name], "cast", to=to), t.shape, t.cf, np.dtype(dtype))

  def reshape_target(self, old, new):
    new = list(new)
    if self.b.dynamic:
      if not (new and old and new[0] == old[0] == self.b.batch):
        raise ValueError(
          f"export_onnx: reshape {tuple(old)} -> {tuple(new)} does not keep the "
          "batch dimension first; export with dynamic_batch=False"
        )
      new[0] = 0  # ONNX Reshape: 0 copies the input's dim
    return self.b.shape_const(new, "shape")

  def binary(self, name, ins, shape):
    a, b_ = ins
    if isinstance(a, np.ndarray) or isinstance(b_, np.ndarray):
      t, c, t_first = (b_, a, False) if isinstance(a, np.ndarray) else (a, b_, True)
      t = self.tensor(t)
      if t.cf and (np.ndim(c) > len(t.shape) or len(shape) != len(t.shape)):
        t = self.b.plain(t)
      if name == "max" and np.ndim(c) == 0 and float(c) == 0.0:
        return _T(self.b.node("Relu", [t.name], "relu"), shape, t.cf)
      cn = self.const_in(c, t, name + "_const")
      names = [t.name, cn] if t_first else [cn, t.name]
      return _T(self.b.node(_BINARY[name], names, name), shape, t.cf, t.dtype)
    a, b_ = self.tensor(a), self.tensor(b_)
    if a.cf != b_.cf:
      if len(a.shape) == len(b_.shape) == len(shape):
        a, b_ = self.b.cfirst(a), self.b.cfirst(b_)
      else:
        a, b_ = self.b.plain(a), self.b.plain(b_)
    elif a.cf and not len(a.shape) == len(b_.shape) == len(shape):
      a, b_ = self.b.plain(a), self.b.plain(b_)
    return _T(self.b.node(_BINARY[name], [a.name, b_.name], name), shape, a.cf, a.dtype)

  def pool(self, name, t: _T, params, shape):
    win, st = params["window_dimensions"], params["window_strides"]
    pad, bd, wd = params["padding"], params["base_dilation"], params["window_dilation"]
    r = len(win)
    if (
      r < 3
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
    t = self.b.cfirst(t)
    attrs = dict(
      kernel_shape=list(win[1:-1]),
      strides=list(st[1:-1]),
      pads=[int(lo) for lo, _ in pad[1:-1]] + [int(hi) for _, hi in pad[1:-1]],
    )
    if any(d != 1 for d in wd):
      attrs["dilations"] = list(wd[1:-1])
    if name == "reduce_window_max":
      return _T(self.b.node("MaxPool", [t.name], "maxpool", **attrs), shape, True)
    y = self.b.node("AveragePool", [t.name], "avgpool", count_include_pad=1, **attrs)
    return _Scaled(_T(y, shape, True), float(math.prod(win)))

  def dot(self, eqn, ins, shape):
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
    t = self.b.plain(self.tensor(a))
    wn = self.b.init(np.asarray(w, np.float32), "matmul_const")
    return _T(self.b.node("MatMul", [t.name, wn], "matmul"), shape)


def _sub_jaxpr(params):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub
    if isinstance(sub, jcore.Jaxpr):
      return jcore.ClosedJaxpr(sub, ())
  return None


# --- entry point ---------------------------------------------------------------------------------


def export_onnx(
  model,
  qvars,
  example_input,
  path=None,
  *,
  opset: int = 21,
  dynamic_batch: bool = True,
  int4: bool = True,
  input_name: str = "input",
  output_name: str = "output",
  apply_kwargs: dict | None = None,
):
  """Exports a converted model to an ONNX QDQ graph.

  Supported models call, in any order, ``QDense`` / ``QConv`` / ``QConvBN`` (converted with
  :func:`qatjax.convert`), ``QAct``, float ``nn.Dense`` / ``nn.Conv`` (also through
  :func:`qatjax.quantize_model`), with elementwise ops (``nn.relu``, ``jnp.tanh``, adds of
  tensors or constants, ...), ``nn.max_pool`` / ``nn.avg_pool``, reshape / flatten, transpose,
  reductions and ``log_softmax`` between them. The graph input is ``example_input``'s layout
  (channels-last); convolutions run in NCHW inside the graph. See the module docstring for the
  graph layout and the expected agreement with ``model.apply(qvars, x)``.

  Args:
    model: the (QAT) Flax model.
    qvars: its converted variables (:func:`qatjax.convert`).
    example_input: one float32 input array; fixes every dimension but the batch.
    path: optional file to write the model to.
    opset: ONNX opset (>= 21 for ``INT4`` weights and per-group ``block_size``; >= 13 otherwise).
    dynamic_batch: leading dimension symbolic (``"batch"``) instead of ``example_input``'s.
    int4: store weights of 4 bits or fewer as ``INT4`` (else as ``INT8``).
    input_name, output_name: graph input and output names (several outputs get ``_i``).
    apply_kwargs: keyword arguments for ``model.apply`` (e.g. ``{"train": False}``).

  Returns:
    The ``onnx.ModelProto`` (checked with ``onnx.checker.check_model``).

  Raises:
    ValueError: naming an unsupported layer or operation, or an unconverted layer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> cfg = QuantConfig()
    >>> model = nn.Sequential([QDense(8, config=cfg), nn.relu, QDense(3, config=cfg)])
    >>> x = jax.random.normal(jax.random.key(0), (4, 5))
    >>> v = model.init(jax.random.key(1), x)
    >>> _, stats = model.apply(v, x, mutable=["quant_stats"])
    >>> qv = convert(model, {**v, **stats}, x)
    >>> proto = qatjax.export.export_onnx(model, qv, x)
    >>> [n.op_type for n in proto.graph.node][:4]
    ['QuantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'Gemm']
  """
  onnx = _onnx()
  apply_kwargs = dict(apply_kwargs or {})
  if int4 and opset < 21:
    int4 = False
  rules = None
  if isinstance(model, QuantizedModel):
    rules, model = model.rules, model.model
  x = jnp.asarray(example_input)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"export_onnx: example_input must be a float array, got {x.dtype}")
  x = x.astype(jnp.float32)
  if x.ndim == 0:
    raise ValueError("export_onnx: example_input must have a batch dimension, got a scalar")
  layers, _ = _record(model, qvars, x, rules, apply_kwargs)
  closed = _trace(model, qvars, x, layers, apply_kwargs)
  b = _Builder(onnx, int(x.shape[0]), dynamic_batch, int4)
  conv = _Converter(b, layers)
  outs = conv.run(closed, [_T(input_name, tuple(x.shape))])
  out_avals = [v.aval for v in closed.jaxpr.outvars]
  graph_outputs = []
  for i, (v, aval) in enumerate(zip(outs, out_avals)):
    oname = output_name if len(outs) == 1 else f"{output_name}_{i}"
    if isinstance(v, np.ndarray):
      raise ValueError(f"export_onnx: output {i} does not depend on the input")
    t = b.plain(conv.tensor(v))
    b.nodes.append(onnx.helper.make_node("Identity", [t.name], [oname], name=b.fresh("n.out")))
    dims = list(aval.shape)
    if dynamic_batch and dims and dims[0] == b.batch:
      dims[0] = "batch"
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))
    graph_outputs.append(onnx.helper.make_tensor_value_info(oname, elem, dims))
  in_dims = list(x.shape)
  if dynamic_batch:
    in_dims[0] = "batch"
  graph = onnx.helper.make_graph(
    b.nodes,
    type(model).__name__,
    [onnx.helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, in_dims)],
    graph_outputs,
    b.inits,
  )
  proto = onnx.helper.make_model(
    graph, opset_imports=[onnx.helper.make_opsetid("", opset)], producer_name="qatjax"
  )
  # The oldest IR version that has this opset: loadable by the widest range of runtimes.
  proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import))
  onnx.checker.check_model(proto)
  if path is not None:
    onnx.save(proto, str(path))
  return proto
