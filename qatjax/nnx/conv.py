"""``QConv`` (a drop-in for ``nnx.Conv``) and ``QConvBN`` (conv + BatchNorm folded), thin users
of the quantized convolution and of the BatchNorm folding in :mod:`qatjax.ops.conv_bn`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from jax import lax

from qatjax.core.qarray import QArray
from qatjax.nnx.context import QuantModule, QuantStat, custom_promotion
from qatjax.ops import conv_bn as bn
from qatjax.ops.conv import ConvGeometry
from qatjax.ops.conv_layer import conv_kernel_shape, conv_layer

ONES, ZEROS = nnx.initializers.ones_init(), nnx.initializers.zeros_init()


def conv_forward(m, inputs, kernel_transform=None):
  """``nnx.Conv.__call__`` with quantization, on a quantized module with Conv's attributes.

  ``kernel_transform(kernel) -> (kernel, post)`` lets ``QConvBN`` fold BatchNorm into the kernel
  before it is quantized; ``post(y)`` maps the conv output back (before the bias).
  """
  ctx = m.quant_context
  geometry = ConvGeometry.of(m, inputs.shape, ctx.path)
  want = conv_kernel_shape(geometry, inputs.shape, m.feature_group_count, m.out_features, ctx.path)
  kernel = m.kernel.get_value()
  if tuple(kernel.shape) != want:
    raise ValueError(
      f"layer {ctx.path}: input of shape {inputs.shape} needs a kernel of shape {want}, but the "
      f"kernel is {tuple(kernel.shape)}"
    )
  return conv_layer(
    ctx,
    inputs,
    kernel,
    None if m.bias is None else m.bias.get_value(),
    *m.quant_specs(),
    geometry,
    feature_group_count=m.feature_group_count,
    precision=m.precision,
    dtype=m.dtype,
    kernel_transform=kernel_transform,
  )


class QConv(nnx.Conv, QuantModule):
  """A quantized ``nnx.Conv`` (channels last; 1-D to 3-D, strides, all paddings, dilations,
  groups): same arguments, same ``kernel`` / ``bias`` parameters.

  Weights get one scale per output channel by default; after :func:`qatjax.nnx.convert` it runs
  the integer convolution of :func:`qatjax.ops.conv.conv` (Linen's ``QConv`` runs the same).
  A ``mask``, a custom ``conv_general_dilated``, ``promote_dtype`` or ``preferred_element_type``
  cannot be quantized (``ValueError``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QConv, init_quantizers
    >>> conv = QConv(3, 8, (3, 3), config=QuantConfig(weight_bits=4, act_bits=8),
    ...              rngs=nnx.Rngs(0))
    >>> init_quantizers(conv, jnp.ones((1, 6, 6, 3)))
    >>> conv.kernel.shape, conv(jnp.ones((1, 6, 6, 3))).shape
    ((3, 3, 3, 8), (1, 6, 6, 8))
  """

  def __init__(
    self,
    in_features,
    out_features,
    kernel_size,
    strides=1,
    *,
    config=None,
    use_running_average=False,
    **kw,
  ):
    super().__init__(in_features, out_features, kernel_size, strides, **kw)
    self.init_quant(config, use_running_average)

  @classmethod
  def unsupported(cls, module) -> str | None:
    if module.mask is not None:
      return "a mask"
    if module.conv_general_dilated is not lax.conv_general_dilated:
      return "a custom conv_general_dilated"
    return custom_promotion(module)

  def __call__(self, inputs, out_sharding=None):
    """Applies the (quantized) convolution to ``inputs`` of shape ``(*batch, *spatial, C)``."""
    self.reject_out_sharding(out_sharding)
    return conv_forward(self, inputs)


class QConvBN(QConv):
  """Conv followed by BatchNorm, with the BN scale folded into the quantized kernel.

  The same folding as Linen's :class:`qatjax.QConvBN` (:mod:`qatjax.ops.conv_bn`): batch
  statistics while training (``use_running_average=False``, ``model.train()``), running
  statistics in evaluation and once ``bn_frozen`` is set; :func:`qatjax.nnx.convert` stores the
  folded kernel and bias. Variables: ``kernel`` (and ``bias`` with ``use_bias``), ``bn_scale``,
  ``bn_bias`` (``nnx.Param``), ``mean``, ``var`` (``nnx.BatchStat``) and ``bn_frozen``
  (:class:`QuantStat`): the names of Linen's ``QConvBN``.

  Args:
    in_features, out_features, kernel_size, strides: as ``nnx.Conv``.
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None`` (float conv + BN).
    use_bias: conv bias (default False: BN has its own).
    use_running_average: BN (and the observers) use running statistics; may also be passed to
      ``__call__``.
    momentum, epsilon: as ``nnx.BatchNorm``.
    scale_init, bn_bias_init: initializers of ``bn_scale`` / ``bn_bias``.
    **kw: ``nnx.Conv``'s other arguments (``padding``, ``rngs``, ...).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QConvBN, init_quantizers
    >>> layer = QConvBN(3, 4, (3, 3), config=QuantConfig(), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((2, 5, 5, 3)))
    >>> layer(jnp.ones((2, 5, 5, 3))).shape, layer.mean.shape
    ((2, 5, 5, 4), (4,))
  """

  def __init__(
    self,
    *args,
    config=None,
    use_bias=False,
    use_running_average=False,
    momentum=0.99,
    epsilon=1e-5,
    scale_init=ONES,
    bn_bias_init=ZEROS,
    rngs: nnx.Rngs,
    **kw,
  ):
    super().__init__(
      *args,
      config=config,
      use_running_average=use_running_average,
      use_bias=use_bias,
      rngs=rngs,
      **kw,
    )
    shape, dtype = (self.out_features,), self.param_dtype
    self.bn_scale = nnx.Param(scale_init(rngs.params(), shape, dtype))
    self.bn_bias = nnx.Param(bn_bias_init(rngs.params(), shape, dtype))
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.bn_frozen = QuantStat(jnp.zeros((), jnp.bool_))
    self.momentum = momentum
    self.epsilon = epsilon

  def __call__(self, x, use_running_average: bool | None = None):
    """Applies conv + BN; ``use_running_average=False`` trains with batch statistics."""
    if isinstance(self.kernel.get_value(), QArray):
      return conv_forward(self, x)  # BN already folded into the integer kernel and the bias
    use_ra = first_from(
      use_running_average,
      self.use_running_average,
      error_msg="QConvBN needs use_running_average (as nnx.BatchNorm)",
    )
    gamma, beta = self.bn_scale.get_value(), self.bn_bias.get_value()
    mean, var = self.mean.get_value(), self.var.get_value()
    f, f_safe = bn.fold_factor(gamma, var, self.epsilon)
    y = conv_forward(self, x, lambda kernel: (kernel * f, lambda y: y / f_safe))
    out, running = bn.normalize(
      y,
      gamma,
      beta,
      mean,
      var,
      self.bn_frozen.get_value(),
      f,
      use_running_average=use_ra,
      momentum=self.momentum,
      epsilon=self.epsilon,
    )
    if running is not None:
      self.mean.set_value(running[0])
      self.var.set_value(running[1])
    ctx = self.quant_context
    if ctx.recording:  # the folded bias of the integer model
      conv_bias = self.bias.get_value() if self.bias is not None else jnp.zeros_like(beta)
      ctx.record("bias", bn.folded_bias(beta, conv_bias, mean, f))
    return out
