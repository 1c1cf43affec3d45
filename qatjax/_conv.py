"""``QConv``: a drop-in for ``nn.Conv`` (1-D/2-D/3-D, strides, padding, dilation, groups)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import _conv_dimension_numbers, canonicalize_padding
from jax import lax

from qatjax._config import QuantConfig, QuantRules, resolve
from qatjax._int_ops import int_conv, quantize_input_int8
from qatjax._quantizers import (EXPORT, converted_input, exporting, flags, is_converted,
                                module_path, quantize_input, quantize_weight)

default_kernel_init = nn.initializers.lecun_normal()


def _tuple(x, n):
  if x is None:
    x = 1
  return (x,) * n if isinstance(x, int) else tuple(x)


def conv_geometry(m, inputs):
  """Canonical kernel size, strides, dilations and lax padding of a conv module for ``inputs``."""
  ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
  n = len(ks)
  if not 1 <= n <= 3:
    raise ValueError(f"layer {module_path(m)}: kernel_size must have 1 to 3 dims, got "
                     f"{m.kernel_size!r}")
  if inputs.ndim < n + 1:
    raise ValueError(f"layer {module_path(m)}: a {n}-D convolution needs inputs of rank >= "
                     f"{n + 1} (spatial dims + features), got shape {inputs.shape}")
  return (ks, _tuple(m.strides, n), _tuple(m.input_dilation, n), _tuple(m.kernel_dilation, n),
          canonicalize_padding(m.padding, n))


def _pad_special(x, padding, ks, kd, value=0):
  """CIRCULAR / REFLECT / CAUSAL padding done on the input, as ``nn.Conv`` does."""
  if padding in ("CIRCULAR", "REFLECT"):
    dil = [(k - 1) * d + 1 for k, d in zip(ks, kd)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
    return jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]), "VALID"
  if padding == "CAUSAL":
    if len(ks) != 1:
      raise ValueError("Causal padding is only implemented for 1D convolutions.")
    pads = [(0, 0), (kd[0] * (ks[0] - 1), 0), (0, 0)]
    return jnp.pad(x, pads, constant_values=value), "VALID"
  return x, padding


def conv_forward(m, inputs, cfg: QuantConfig | None, kernel_transform=None):
  """``nn.Conv.__call__`` with quantization, on any bound module with Conv's fields.

  ``kernel_transform(kernel) -> (kernel, post)`` lets ``QConvBN`` fold BatchNorm into the kernel
  before it is quantized; ``post(y)`` then maps the conv output back.
  """
  ks, strides, in_dil, k_dil, padding = conv_geometry(m, inputs)
  if getattr(m, "mask", None) is not None:
    raise ValueError(f"layer {module_path(m)}: masked convolutions are not supported")
  n_batch = inputs.ndim - (len(ks) + 1)
  batch_shape = inputs.shape[:n_batch]
  if n_batch != 1:
    inputs = jnp.reshape(inputs, (-1,) + inputs.shape[n_batch:])
  in_features = inputs.shape[-1]
  if in_features % m.feature_group_count:
    raise ValueError(f"layer {module_path(m)}: input features {in_features} are not divisible "
                     f"by feature_group_count={m.feature_group_count}")
  kernel_shape = ks + (in_features // m.feature_group_count, m.features)
  if is_converted(m):
    y = _conv_int(m, inputs, cfg, ks, strides, in_dil, k_dil, padding)
  else:
    if m.has_variable("params", "kernel"):
      k = m.get_variable("params", "kernel")
      if tuple(k.shape) != kernel_shape:
        raise ValueError(f"layer {module_path(m)}: input of shape {inputs.shape} needs a kernel "
                         f"of shape {kernel_shape}, but the stored kernel is {tuple(k.shape)}")
    kernel = m.param("kernel", m.kernel_init, kernel_shape, m.param_dtype)
    bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
    post = None
    if kernel_transform is not None:
      kernel, post = kernel_transform(kernel)
    if cfg is not None:
      enabled, observe = flags(m)
      inputs = quantize_input(m, inputs, cfg, enabled, observe)
      kernel = quantize_weight(m, kernel, cfg, enabled, in_axis=len(ks), out_axis=len(ks) + 1)
      if exporting(m) and cfg.weight_bits is not None:
        qa = m.get_variable(EXPORT, "kernel")
        if qa.group_size is None:
          m.put_variable(EXPORT, "kernel_sum",
                         jnp.sum(qa.unpack().astype(jnp.int32), axis=tuple(range(len(ks) + 1))))
    inputs, pad_lax = _pad_special(inputs, padding, ks, k_dil)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=m.dtype)
    y = lax.conv_general_dilated(inputs, kernel, strides, pad_lax, lhs_dilation=in_dil,
                                 rhs_dilation=k_dil,
                                 dimension_numbers=_conv_dimension_numbers(inputs.shape),
                                 feature_group_count=m.feature_group_count,
                                 precision=m.precision)
    if post is not None:
      y = post(y)
    if bias is not None:
      y += bias.reshape((1,) * (y.ndim - 1) + (-1,))
  if n_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y


def _conv_int(m, inputs, cfg, ks, strides, in_dil, k_dil, padding):
  """Integer inference for a converted conv kernel (bias included)."""
  qa = m.get_variable("params", "kernel")
  bias = m.get_variable("params", "bias") if m.has_variable("params", "bias") else None
  act = converted_input(m)
  if act is not None and qa.group_size is not None:
    # Per-group scales vary along the contraction: no single int32 correction exists, so the
    # quantized input and kernel are dequantized and convolved in float (same values).
    s, z = act
    qx, zx = quantize_input_int8(inputs, s, z, *cfg.act_range)
    inputs, act = (qx.astype(jnp.float32) - zx) * s, None
  if act is None:
    x, pad_lax = _pad_special(inputs, padding, ks, k_dil)
    y = lax.conv_general_dilated(x, qa.dequantize(), strides, pad_lax, lhs_dilation=in_dil,
                                 rhs_dilation=k_dil,
                                 dimension_numbers=_conv_dimension_numbers(x.shape),
                                 feature_group_count=m.feature_group_count)
  else:
    s, z = act
    qx, zx = quantize_input_int8(inputs, s, z, *cfg.act_range)
    qx, pad_lax = _pad_special(qx, padding, ks, k_dil, value=zx.astype(jnp.int8))
    if isinstance(pad_lax, str):
      dilated = [(k - 1) * d + 1 for k, d in zip(ks, k_dil)]
      pads = lax.padtype_to_pads(qx.shape[1:-1], dilated, strides, pad_lax)
    else:
      pads = pad_lax
    acc = int_conv(qx, zx, qa.unpack(), m.get_variable("params", "kernel_sum"), strides=strides,
                   pads=pads, lhs_dilation=in_dil, rhs_dilation=k_dil,
                   feature_group_count=m.feature_group_count)
    y = acc.astype(jnp.float32) * (s * qa.scale.reshape(-1 if qa.scale.size > 1 else ()))
  if bias is not None:
    y = y + bias
  return y


class QConv(nn.Module):
  """A quantized ``nn.Conv`` (channels-last; 1-D, 2-D or 3-D).

  Mirrors ``nn.Conv``'s fields and its ``kernel`` / ``bias`` parameters, including strides,
  ``SAME`` / ``VALID`` / explicit / ``CIRCULAR`` / ``REFLECT`` / ``CAUSAL`` padding, input and kernel
  dilation and ``feature_group_count`` (depthwise when equal to the input features). Weights get
  one scale per output channel by default. After :func:`qatjax.convert` it runs an int8 x int8 ->
  int32 convolution; the input is padded with its zero point, so padding stays exact.

  Attributes:
    features: output channels.
    kernel_size: int or tuple of spatial kernel sizes.
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None`` (plain ``nn.Conv``).
    strides, padding, input_dilation, kernel_dilation, feature_group_count, use_bias, dtype,
    param_dtype, precision, kernel_init, bias_init: as ``nn.Conv``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> conv = QConv(8, (3, 3), config=QuantConfig(weight_bits=4, act_bits=8))
    >>> v = conv.init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
    >>> v["params"]["kernel"].shape, conv.apply(v, jnp.ones((1, 6, 6, 3))).shape
    ((3, 3, 3, 8), (1, 6, 6, 8))
  """

  features: int
  kernel_size: int | Sequence[int]
  config: QuantConfig | QuantRules | None = None
  strides: int | Sequence[int] | None = 1
  padding: Any = "SAME"
  input_dilation: int | Sequence[int] | None = 1
  kernel_dilation: int | Sequence[int] | None = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs):
    """Applies the (quantized) convolution to ``inputs`` of shape ``(*batch, *spatial, C)``."""
    return conv_forward(self, inputs, resolve(self.config, module_path(self)))
