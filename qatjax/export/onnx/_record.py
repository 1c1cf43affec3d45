"""Recording a converted model: which layers it calls, in what order, with what variables.

* **Pass 1** (:func:`record_layers`): the model runs once under a Flax method interceptor; every
  layer call is recorded as a :class:`Layer` with its registry kind, its concrete (converted)
  variables and its input's frozen quantization.
* **Pass 2** (:func:`trace_glue`): :func:`jax.make_jaxpr` of the model with every layer call
  replaced by one opaque primitive (:data:`LAYER`) whose ``index`` names its :class:`Layer`. What
  is left in the jaxpr is the glue between layers (ReLU, pooling, reshapes, residual adds, ...).

Layers are the quantized ones (``QDense``, ``QDenseGeneral``, ``QConv``, ``QConvBN``, ``QEmbed``
and its ``attend``, ``QAct``), the float layers :func:`qatjax.quantize_model` quantizes
(``nn.Dense``, ``nn.Conv``) and the float ``nn.DenseGeneral`` and ``nn.Embed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from qatjax.core.qarray import QArray
from qatjax.core.rules import resolve
from qatjax.export.onnx._qdq import ActQDQ
from qatjax.linen.act import QAct
from qatjax.linen.context import module_path
from qatjax.linen.conv import QConv
from qatjax.linen.conv_bn import QConvBN
from qatjax.linen.dense import QDense, QDenseGeneral
from qatjax.linen.embed import QEmbed
from qatjax.linen.flax_layers import LAYERS, find_layer, layer_kind
from qatjax.ops.registry import BN_FOLDED, RECORD, STATS, WEIGHTS, act_leaf

# The kinds (qatjax.ops.registry.KINDS) of the quantized layers, and of float layers beyond the
# ones quantize_model runs quantized (their kinds come from flax_layers.LAYERS).
_QUANTIZED_KINDS = {
  QDense: "dense",
  QDenseGeneral: "dense_general",
  QConv: "conv",
  QConvBN: "conv_bn",
  QEmbed: "embed",
  QAct: "act",
}
_FLOAT_KINDS = {nn.DenseGeneral: "dense_general", nn.Embed: "embed"}
_UNSUPPORTED = (nn.ConvTranspose,)
# Kinds quantize_model runs quantized that the exporter has no emitter for.
_UNSUPPORTED_KINDS = ("einsum", "attention")
# The methods that are layer calls, per kind (default: __call__).
_METHODS = {"embed": ("__call__", "attend")}

LAYER = jcore.Primitive("qatjax_onnx_layer")
LAYER.def_abstract_eval(lambda x, *, index, out_aval: out_aval)
LAYER.def_impl(lambda x, *, index, out_aval: jnp.zeros(out_aval.shape, out_aval.dtype))


@dataclasses.dataclass
class Layer:
  """One recorded layer call.

  Attributes:
    kind: the registry kind (``"dense"``, ``"dense_general"``, ``"conv"``, ``"conv_bn"``,
      ``"embed"``, ``"act"``).
    method: the module method called (``"__call__"``, ``"attend"``).
    path: the module path (``"block/QDense_0"``).
    module: the bound module.
    in_shape, out_shape: the call's input and output shapes.
    variables: ``{collection: {name: value}}`` of the module, concrete.
    act: the frozen quantization of its input, or ``None`` (float input).
  """

  kind: str
  method: str
  path: str
  module: Any
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  variables: dict
  act: ActQDQ | None = None

  @property
  def params(self) -> dict:
    return self.variables.get("params", {})


def kind_of(module, method: str) -> str | None:
  """The kind of a module call that is a layer, ``None`` for anything else (containers, glue).

  Raises:
    ValueError: naming a layer the exporter does not support.
  """
  kind = next((k for t, k in _QUANTIZED_KINDS.items() if isinstance(module, t)), None)
  kind = kind or layer_kind(module) or _FLOAT_KINDS.get(type(module))
  if kind in _UNSUPPORTED_KINDS or kind is None:
    if method == "__call__" and (kind is not None or isinstance(module, _UNSUPPORTED)):
      supported = [t.__name__ for t in _QUANTIZED_KINDS] + [
        f"nn.{t.__name__}"
        for t in dict.fromkeys((*LAYERS, *_FLOAT_KINDS))
        if layer_kind_of_type(t) not in _UNSUPPORTED_KINDS
      ]
      raise ValueError(
        f"export_onnx: layer {module_path(module)} ({type(module).__name__}) is not supported; "
        f"supported layers: {', '.join(supported)}"
      )
    return None
  return kind if method in _METHODS.get(kind, ("__call__",)) else None


def layer_kind_of_type(t) -> str | None:
  """The kind of a Flax layer class (``None``: not a listed layer)."""
  return LAYERS[t].kind if t in LAYERS else _FLOAT_KINDS.get(t)


def _folded_norm(module, method: str) -> bool:
  """A BatchNorm ``convert`` folded into its conv (an identity in the integer model)."""
  return (
    method == "__call__"
    and isinstance(module, nn.BatchNorm)
    and module.has_variable("params", BN_FOLDED)
  )


def _config(module, rules):
  """The layer's resolved config (``None``: float layer)."""
  path = module_path(module)
  if isinstance(module, tuple(_QUANTIZED_KINDS)):
    return resolve(module.config, path)
  if rules is not None and find_layer(module) is not None:
    return rules.match(path)[1]
  return None


def _input_act(path, params, cfg) -> ActQDQ | None:
  """A converted layer's input quantization, or ``None``."""
  if act_leaf("input", "scale") not in params:
    return None
  if cfg is None or cfg.act_bits is None:
    raise ValueError(
      f"export_onnx: layer {path} has an input scale but its config quantizes no activations"
    )
  return _frozen_act(params, cfg)


def _frozen_act(leaves, cfg) -> ActQDQ:
  """The input quantizer's scale and zero point in ``leaves``, with ``cfg``'s integer range."""
  return ActQDQ(
    float(np.asarray(leaves[act_leaf("input", "scale")])),
    float(np.asarray(leaves[act_leaf("input", "zero_point")])),
    *cfg.act_range,
  )


def _check_converted(layer: Layer, cfg) -> None:
  if layer.kind == "act":
    return
  weight = next((layer.params[w] for w in WEIGHTS if w in layer.params), None)
  if weight is None:
    raise ValueError(f"export_onnx: layer {layer.path} has no weight ({' or '.join(WEIGHTS)})")
  if isinstance(weight, QArray):
    return
  if layer.kind == "conv_bn":
    raise ValueError(
      f"export_onnx: layer {layer.path} (QConvBN) must be converted (BN folded) first"
    )
  if layer.variables.get(STATS) or (cfg is not None and cfg.weight_bits is not None):
    raise ValueError(
      f"export_onnx: layer {layer.path} is not converted (float weight with a quantizer); "
      "run qatjax.convert first"
    )


def record_layers(model, qvars, x, rules, apply_kwargs) -> list[Layer]:
  """Pass 1: runs the model once, recording every layer call in order (concrete variables).

  ``rules`` are a :func:`qatjax.quantize_model` wrapper's (``model`` is then the float model,
  whose ``nn.Dense`` / ``nn.Conv`` run quantized as the wrapper runs them), else ``None``.
  """
  layers: list[Layer] = []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if _folded_norm(m, context.method_name):
      return args[0]  # folded into the conv before it by quantize_model and convert
    kind = kind_of(m, context.method_name)
    if kind is None:
      return next_fun(*args, **kwargs)
    path = module_path(m)
    if not args or not hasattr(args[0], "shape"):
      raise ValueError(f"export_onnx: layer {path} must be called with one array")
    cfg = _config(m, rules)
    y = NotImplemented
    if rules is not None and cfg is not None and find_layer(m) is not None:
      # what quantize_model's interceptor runs
      y = find_layer(m).methods[context.method_name](m, cfg, args, kwargs)
    if y is NotImplemented:
      y = next_fun(*args, **kwargs)
    variables = {col: dict(tree) for col, tree in m.variables.items()}
    layer = Layer(
      kind, context.method_name, path, m, tuple(args[0].shape), tuple(y.shape), variables
    )
    _check_converted(layer, cfg)
    lookup = kind == "embed" and context.method_name == "__call__"  # ids are not activations
    layer.act = None if kind == "act" or lookup else _input_act(path, layer.params, cfg)
    layers.append(layer)
    return y

  with nn.intercept_methods(interceptor):
    _, recorded = model.apply(qvars, x, mutable=[RECORD], **apply_kwargs)
  recorded = recorded.get(RECORD, {})
  for layer in layers:
    if layer.kind == "act":
      layer.act = _qact(layer, recorded, _config(layer.module, rules))
  return layers


def _qact(layer: Layer, recorded, cfg) -> ActQDQ | None:
  """A ``QAct``'s frozen quantization from the ``quant_record`` pass (``None``: identity)."""
  if cfg is None or cfg.act_bits is None:
    return None
  node = recorded
  for p in layer.module.path:
    node = node.get(p, {})
  if act_leaf("input", "scale") not in node:
    return None
  enabled = bool(np.asarray(layer.variables.get(STATS, {}).get("enabled", True)))
  if not (enabled and bool(np.asarray(node[act_leaf("input", "calibrated")]))):
    return None
  return _frozen_act(node, cfg)


def trace_glue(model, qvars, x, layers: list[Layer], apply_kwargs) -> jcore.ClosedJaxpr:
  """Pass 2: the model's jaxpr with layer ``i`` as one ``LAYER`` equation (``index=i``)."""
  it = iter(range(len(layers)))

  def interceptor(next_fun, args, kwargs, context):
    if _folded_norm(context.module, context.method_name):
      return args[0]
    if kind_of(context.module, context.method_name) is None:
      return next_fun(*args, **kwargs)
    i = next(it)
    aval = jax.core.ShapedArray(layers[i].out_shape, jnp.float32)
    return LAYER.bind(args[0], index=i, out_aval=aval)

  def f(inp):
    with nn.intercept_methods(interceptor):
      return model.apply(qvars, inp, **apply_kwargs)

  return jax.make_jaxpr(f)(x)
