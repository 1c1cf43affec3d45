"""``QDense`` and ``QDenseGeneral``: drop-ins for ``nn.Dense`` / ``nn.DenseGeneral``."""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from qatjax._config import QuantConfig, QuantRules, resolve
from qatjax._int_ops import int_dot_kernel, quantize_input_int8
from qatjax._quantizers import (EXPORT, converted_input, exporting, flags, is_converted,
                                module_path, quantize_input, quantize_weight)

default_kernel_init = nn.initializers.lecun_normal()


def _check_features(module, expected, got, what):
  if tuple(expected) != tuple(got):
    raise ValueError(f"layer {module_path(module)}: {what} {tuple(got)} does not match its "
                     f"kernel, which expects {tuple(expected)}")


def dense_forward(m, inputs, cfg: QuantConfig | None):
  """``nn.Dense.__call__`` with quantization, on any bound module with Dense's fields."""
  if is_converted(m):
    y = _dense_int(m, inputs, cfg)
    return y + m.get_variable("params", "bias") if m.has_variable("params", "bias") else y
  if m.has_variable("params", "kernel"):
    k = m.get_variable("params", "kernel")
    _check_features(m, k.shape[:1], jnp.shape(inputs)[-1:], "input feature size")
  kernel = m.param("kernel", m.kernel_init, (jnp.shape(inputs)[-1], m.features), m.param_dtype)
  bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  if cfg is not None:
    enabled, observe = flags(m)
    inputs = quantize_input(m, inputs, cfg, enabled, observe)
    kernel = quantize_weight(m, kernel, cfg, enabled, in_axis=0, out_axis=1)
    if exporting(m) and cfg.weight_bits is not None:
      _export_kernel_sum(m, (0,))
  inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=m.dtype)
  y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                      precision=m.precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _export_kernel_sum(m, axes):
  qa = m.get_variable(EXPORT, "kernel")
  if qa.group_size is None:
    m.put_variable(EXPORT, "kernel_sum", jnp.sum(qa.unpack().astype(jnp.int32), axis=axes))
    # Stored (N, K): the layout XLA:CPU's int8 matmul reads without repacking (int_dot_kernel).
    m.put_variable(EXPORT, "kernel", qa.with_perm((1, 0)))


def _grouped_int_dot(qx, zx, qa, out_features):
  """Per-group weights: one int32 dot per group of input features, rescaled, then summed."""
  qw = qa.unpack()
  g, k = qa.group_size, qw.shape[0]
  n = math.ceil(k / g)
  pad = n * g - k
  lead = qx.shape[:-1]
  qx = qx.reshape(-1, k)
  if pad:
    qx = jnp.pad(qx, ((0, 0), (0, pad)), constant_values=zx.astype(jnp.int8))
    qw = jnp.pad(qw, ((0, pad), (0, 0)))
  qx = qx.reshape(-1, n, g)
  qw = qw.reshape(n, g, out_features)
  acc = lax.dot_general(qx, qw, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)
  acc = acc - zx * jnp.sum(qw.astype(jnp.int32), axis=1)[:, None, :]  # (n, batch, out)
  y = jnp.sum(acc.astype(jnp.float32) * qa.scale.reshape(n, 1, out_features), axis=0)
  return y.reshape(lead + (out_features,))


def _dense_int(m, inputs, cfg):
  """Integer inference for a converted dense kernel ``(K, N)`` (without the bias)."""
  qa = m.get_variable("params", "kernel")
  act = converted_input(m)
  if act is None:  # weight-only: dequantize the kernel, float matmul
    y = jnp.dot(inputs, qa.dequantize())
  else:
    s, z = act
    qx, zx = quantize_input_int8(inputs, s, z, *cfg.act_range)
    if qa.group_size is not None:
      y = _grouped_int_dot(qx, zx, qa, qa.shape[-1]) * s
    else:
      acc = int_dot_kernel(qx, zx, qa, m.get_variable("params", "kernel_sum"))
      y = acc.astype(jnp.float32) * (s * qa.scale.reshape(-1 if qa.scale.size > 1 else ()))
  return y


class QDense(nn.Module):
  """A quantized ``nn.Dense``: same fields, same ``kernel`` / ``bias`` parameters.

  The input is fake-quantized with the activation quantizer and the kernel with the weight
  quantizer of ``config``; after :func:`qatjax.convert` the same module runs an int8 x int8 ->
  int32 matmul. With ``config=None`` (or a rule mapping this path to ``None``) it is exactly
  ``nn.Dense``.

  Attributes:
    features: number of output features.
    config: a :class:`QuantConfig`, a :class:`QuantRules` (looked up by this module's path), or
      ``None``.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.Dense``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QDense(4, config=QuantConfig(weight_bits=8, act_bits=8))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> sorted(variables["params"]), sorted(variables["quant_stats"])
    (['bias', 'kernel'], ['enabled', 'input_count', 'input_max', 'input_min', 'observe'])
    >>> y, updates = layer.apply(variables, jnp.ones((2, 3)), mutable=["quant_stats"])
    >>> y.shape
    (2, 4)
  """

  features: int
  config: QuantConfig | QuantRules | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs):
    """Applies the (quantized) linear transformation to the last axis of ``inputs``."""
    return dense_forward(self, inputs, resolve(self.config, module_path(self)))


def _canon_axes(axes, ndim):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))  # sorted, as nn.DenseGeneral (_normalize_axes)


class QDenseGeneral(nn.Module):
  """A quantized ``nn.DenseGeneral`` (e.g. attention projections to ``(heads, head_dim)``).

  Weights get one scale per output element of ``features`` (per-channel) or one per tensor;
  per-group scales need a single contracting ``axis``. ``batch_dims`` is not supported.

  Attributes:
    features: int or tuple of output feature dims.
    axis: int or tuple of input axes to contract.
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None``.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.DenseGeneral``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QDenseGeneral((2, 4), config=QuantConfig())
    >>> v = layer.init(jax.random.key(0), jnp.ones((3, 8)))
    >>> v["params"]["kernel"].shape, layer.apply(v, jnp.ones((3, 8))).shape
    ((8, 2, 4), (3, 2, 4))
  """

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  config: QuantConfig | QuantRules | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs):
    """Contracts ``axis`` of ``inputs`` with the (quantized) kernel."""
    cfg = resolve(self.config, module_path(self))
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = _canon_axes(self.axis, inputs.ndim)
    if axis != tuple(range(inputs.ndim - len(axis), inputs.ndim)):
      inputs = jnp.moveaxis(inputs, axis, tuple(range(inputs.ndim - len(axis), inputs.ndim)))
    in_shape = inputs.shape[inputs.ndim - len(axis):]
    lead = inputs.shape[: inputs.ndim - len(axis)]
    if cfg is not None and cfg.weight_granularity == "per_group" and len(axis) != 1:
      raise ValueError(f"layer {module_path(self)}: per_group weights need a single contracting "
                       f"axis, got axis={self.axis!r}")
    k_in, k_out = math.prod(in_shape), math.prod(features)
    if is_converted(self):
      y = _dense_int(self, inputs.reshape(lead + (k_in,)), cfg).reshape(lead + features)
      return y + self.get_variable("params", "bias") if self.use_bias else y

    def kernel_init(rng, shape, dtype):
      return self.kernel_init(rng, (k_in, k_out), dtype).reshape(shape)

    if self.has_variable("params", "kernel"):
      k = self.get_variable("params", "kernel")
      _check_features(self, k.shape[: len(in_shape)], in_shape, "input shape")
    kernel = self.param("kernel", kernel_init, in_shape + features, self.param_dtype)
    bias = (self.param("bias", self.bias_init, features, self.param_dtype)
            if self.use_bias else None)
    x2 = inputs.reshape(lead + (k_in,))
    k2 = kernel.reshape(k_in, k_out)
    if cfg is not None:
      enabled, observe = flags(self)
      x2 = quantize_input(self, x2, cfg, enabled, observe)
      k2 = quantize_weight(self, k2, cfg, enabled, in_axis=0, out_axis=1)
      if exporting(self) and cfg.weight_bits is not None:
        _export_kernel_sum(self, (0,))
    x2, k2 = promote_dtype(x2, k2, dtype=self.dtype)
    y = lax.dot_general(x2, k2, (((x2.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    y = y.reshape(lead + features)
    if bias is not None:
      y = y + jnp.asarray(bias, y.dtype)
    return y
