"""``QConv``: a drop-in for ``nn.Conv`` (1-D/2-D/3-D, strides, padding, dilation, groups), a thin
user of the quantized convolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qatjax.core.config import QuantConfig
from qatjax.core.qarray import QArray
from qatjax.core.rules import QuantRules, resolve
from qatjax.linen.context import LinenContext, module_path, weight_param
from qatjax.ops.conv import ConvGeometry
from qatjax.ops.conv_layer import conv_kernel_shape, conv_layer

default_kernel_init = nn.initializers.lecun_normal()


def conv_call(m, inputs, cfg: QuantConfig | None, kernel_transform=None):
  """``nn.Conv.__call__`` with quantization, on any bound module with Conv's fields.

  ``kernel_transform(kernel) -> (kernel, post)`` lets ``QConvBN`` fold BatchNorm into the kernel
  before it is quantized; ``post(y)`` then maps the conv output back (before the bias).
  """
  path = module_path(m)
  geometry = ConvGeometry.of(m, inputs.shape, path)
  if getattr(m, "mask", None) is not None:
    raise ValueError(f"layer {path}: masked convolutions are not supported")
  kernel_shape = conv_kernel_shape(geometry, inputs.shape, m.feature_group_count, m.features, path)

  def check(stored):
    if stored != kernel_shape:
      raise ValueError(
        f"layer {path}: input of shape {inputs.shape} needs a kernel of shape "
        f"{kernel_shape}, but the stored kernel is {stored}"
      )

  kernel = weight_param(m, "kernel", m.kernel_init, kernel_shape, m.param_dtype, check=check)
  if isinstance(kernel, QArray):
    bias = m.get_variable("params", "bias") if m.has_variable("params", "bias") else None
  else:
    bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  wq, aq = (None, None) if cfg is None else (cfg.weight_quant, cfg.act_quant)
  return conv_layer(
    LinenContext(m),
    inputs,
    kernel,
    bias,
    wq,
    aq,
    geometry,
    feature_group_count=m.feature_group_count,
    precision=m.precision,
    dtype=m.dtype,
    kernel_transform=kernel_transform,
  )


class QConv(nn.Module):
  """A quantized ``nn.Conv`` (channels-last; 1-D, 2-D or 3-D).

  Mirrors ``nn.Conv``'s fields and its ``kernel`` / ``bias`` parameters, including strides,
  ``SAME`` / ``VALID`` / explicit / ``CIRCULAR`` / ``REFLECT`` / ``CAUSAL`` padding, input and
  kernel dilation and ``feature_group_count`` (depthwise when equal to the input features).
  Weights get one scale per output channel by default. After :func:`qatjax.convert` it runs an
  int8 x int8 -> int32 convolution; the input is padded with its zero point, so padding stays exact.

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
    return conv_call(self, inputs, resolve(self.config, module_path(self)))
