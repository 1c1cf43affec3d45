"""BatchNorm folding for unmodified models: a ``nn.Conv`` whose output goes straight into a
``nn.BatchNorm`` is quantized with the BatchNorm folded in, as :class:`QConvBN` does (Jacob et
al. 2018).

``quantize_model`` finds the pairs by tracing the float model's ``init`` abstractly (nothing is
computed) and following each conv's output object: a BatchNorm whose input *is* a conv's output
(no activation, reshape or add in between) is paired with it. Then, with the BatchNorm's current
``scale`` ``gamma`` and running variance, ``f = gamma / sqrt(var + eps)``:

* QAT: the conv computes ``conv(x, fq(W * f)) / f + b`` and the BatchNorm runs unchanged on it,
  so training sees the folded weights' quantization error, and batch statistics (training) or
  running statistics (evaluation) normalise exactly as ``QConvBN``'s;
* ``convert``: the conv's integer kernel holds ``W * f`` and its bias the folded shift
  ``beta + (b - mean) * f``; the BatchNorm records ``BN_FOLDED``, loses its variables and is an
  identity in the integer model (and in the ONNX graph).

``QuantConfig(fold_batch_norm=False)`` on the conv's rule keeps the BatchNorm float.
"""

from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

from qatjax.core.qarray import QArray
from qatjax.linen.context import LinenContext, module_path
from qatjax.linen.conv import conv_call
from qatjax.linen.flax_layers import find_layer
from qatjax.ops import conv_bn as bn
from qatjax.ops.registry import BN_FOLDED, RECORD


@dataclasses.dataclass(frozen=True)
class FoldedNorm:
  """The BatchNorm a conv feeds: its path and ``epsilon``."""

  path: str
  epsilon: float


def find_conv_bn_pairs(
  model: nn.Module, args, kwargs, method: str = "__call__"
) -> dict[str, FoldedNorm]:
  """``{conv path: FoldedNorm}`` for every conv whose output is a BatchNorm's input.

  Example:
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))
    >>> find_conv_bn_pairs(Net(), (jnp.ones((1, 5, 5, 2)),), {})
    {'Conv_0': FoldedNorm(path='BatchNorm_0', epsilon=1e-05)}
  """
  outputs: list[tuple[str, object]] = []
  pairs: dict[str, FoldedNorm] = {}

  def interceptor(next_fun, a, kw, context):
    m = context.module
    out = next_fun(*a, **kw)
    if context.method_name != "__call__":
      return out
    layer = find_layer(m)
    if layer is not None and layer.kind == "conv":
      outputs.append((module_path(m), out))
    elif isinstance(m, nn.BatchNorm) and a and m.axis in (-1, a[0].ndim - 1):
      for path, conv_out in outputs:
        if conv_out is a[0] and path not in pairs:
          pairs[path] = FoldedNorm(module_path(m), float(m.epsilon))
    return out

  key = jax.random.key(0)
  try:
    with nn.intercept_methods(interceptor):
      jax.eval_shape(
        lambda: model.init({"params": key, "dropout": key}, *args, method=method, **kwargs)
      )
  except Exception as e:  # a model that needs other RNG streams or inputs at init
    warnings.warn(
      f"quantize_model: BatchNorm folding skipped, the model's init could not be traced to find "
      f"conv -> BatchNorm pairs ({type(e).__name__}: {e})",
      stacklevel=3,
    )
    return {}
  return pairs


def cached_conv_bn_pairs(cache: dict, model, args, kwargs, method: str) -> dict[str, FoldedNorm]:
  """:func:`find_conv_bn_pairs`, remembered in ``cache`` per method, input shapes / dtypes and
  Python arguments, so that an un-jitted apply does not trace the model's init on every call."""
  leaves, tree = jax.tree.flatten((args, kwargs))
  key = (method, tree, tuple((a.shape, a.dtype) if hasattr(a, "shape") else a for a in leaves))
  try:
    hash(key)
  except TypeError:  # an unhashable Python argument: no caching
    return find_conv_bn_pairs(model, args, kwargs, method)
  if key not in cache:
    cache[key] = find_conv_bn_pairs(model, args, kwargs, method)
  return cache[key]


def _subtree(tree, path: str) -> dict:
  node = tree
  for part in [] if path == "<root>" else path.split("/"):
    if not hasattr(node, "get"):
      return {}
    node = node.get(part, {})
  return node if hasattr(node, "get") else {}


def folded_conv_call(m, cfg, args, kwargs, norm: FoldedNorm, variables):
  """The conv call with its BatchNorm folded (``NotImplemented`` before the BatchNorm has
  variables, i.e. during ``init``, or once the conv is converted)."""
  if m.has_variable("params", "kernel") and isinstance(m.get_variable("params", "kernel"), QArray):
    return NotImplemented  # converted: the integer kernel already holds W * f
  params = _subtree(variables.get("params", {}), norm.path)
  stats = _subtree(variables.get("batch_stats", {}), norm.path)
  if "var" not in stats:
    return NotImplemented
  n = m.features
  gamma = params.get("scale", jnp.ones((n,), jnp.float32))
  beta = params.get("bias", jnp.zeros((n,), jnp.float32))
  f, f_safe = bn.fold_factor(gamma, stats["var"], norm.epsilon)
  y = conv_call(m, *args, cfg, kernel_transform=lambda k: (k * f, lambda v: v / f_safe), **kwargs)
  ctx = LinenContext(m)
  if ctx.recording:
    conv_bias = m.get_variable("params", "bias") if m.use_bias else jnp.zeros((n,), jnp.float32)
    ctx.record("bias", bn.folded_bias(beta, conv_bias, stats["mean"], f))
  return y


def batch_norm_call(m, args, kwargs, folded: bool, next_fun):
  """A paired BatchNorm: an identity once converted; records ``BN_FOLDED`` for ``convert``."""
  if m.has_variable("params", BN_FOLDED):
    return args[0]
  if folded and m.is_mutable_collection(RECORD):
    m.put_variable(RECORD, BN_FOLDED, jnp.int8(1))
  return next_fun(*args, **kwargs)
