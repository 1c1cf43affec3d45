"""What a convolution layer (``nn.Conv``, ``nnx.Conv``) adds around the quantized conv: any
number of batch dims, the kernel shape its input needs, a kernel transform (``QConvBN``'s
BatchNorm folding) and the bias. Linen's and NNX's ``QConv`` / ``QConvBN`` both run it."""

from __future__ import annotations

import jax.numpy as jnp

from qatjax.core.config import ActQuant, WeightQuant
from qatjax.core.qarray import QArray
from qatjax.ops.context import QuantContext
from qatjax.ops.conv import ConvGeometry, conv


def conv_kernel_shape(geometry: ConvGeometry, inputs_shape, feature_group_count, features, path):
  """The kernel shape ``(*spatial, C // groups, features)`` that inputs of ``inputs_shape`` need.

  Raises:
    ValueError: naming ``path``, when the input features do not split into the groups.

  Example:
    >>> from qatjax.ops.conv import ConvGeometry
    >>> from qatjax.ops.conv_layer import conv_kernel_shape
    >>> g = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1), "SAME")
    >>> conv_kernel_shape(g, (2, 8, 8, 4), 2, 6, "conv")
    (3, 3, 2, 6)
  """
  in_features = inputs_shape[-1]
  if in_features % feature_group_count:
    raise ValueError(
      f"layer {path}: input features {in_features} are not divisible by "
      f"feature_group_count={feature_group_count}"
    )
  return geometry.kernel_size + (in_features // feature_group_count, features)


def conv_layer(
  ctx: QuantContext,
  inputs,
  kernel,
  bias,
  weight_q: WeightQuant | None,
  act_q: ActQuant | None,
  geometry: ConvGeometry,
  *,
  feature_group_count: int = 1,
  precision=None,
  dtype=None,
  kernel_transform=None,
):
  """A conv layer's output for ``inputs`` ``(*batch, *spatial, C)`` (batch dims flattened for the
  op and restored, as Flax's ``Conv``; none: a single example).

  ``kernel_transform(kernel) -> (kernel, post)`` (float kernels only) changes the kernel before
  it is quantized; ``post(y)`` maps the conv output back, before ``bias`` (or ``None``) is added.
  """
  n_batch = inputs.ndim - (len(geometry.kernel_size) + 1)
  batch_shape = inputs.shape[:n_batch]
  if n_batch != 1:
    inputs = jnp.reshape(inputs, (-1,) + inputs.shape[n_batch:])
  post = None
  if kernel_transform is not None and not isinstance(kernel, QArray):
    kernel, post = kernel_transform(kernel)
  y = conv(
    ctx,
    inputs,
    kernel,
    weight_q,
    act_q,
    geometry,
    feature_group_count=feature_group_count,
    precision=precision,
    dtype=dtype,
  )
  if post is not None:
    y = post(y)
  if bias is not None:
    y += jnp.asarray(bias, y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  if n_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y
