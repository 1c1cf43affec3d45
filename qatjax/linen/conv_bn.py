"""``QConvBN``: convolution + BatchNorm folded for quantization-aware training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qatjax.core.config import QuantConfig
from qatjax.core.qarray import QArray
from qatjax.core.rules import QuantRules, resolve
from qatjax.linen.context import LinenContext, module_path
from qatjax.linen.conv import conv_call
from qatjax.ops import conv_bn as bn
from qatjax.ops.registry import STATS


class QConvBN(nn.Module):
  """Conv followed by BatchNorm, with the BN scale folded into the quantized kernel.

  Jacob et al. 2018 (section 3.2) and Krishnamoorthi 2018; the "approximate" path of PyTorch's
  ``ConvBn2d``: with ``f = gamma / sqrt(running_var + eps)`` the kernel ``W * f`` is
  fake-quantized, the conv output is divided by ``f`` and normalised with batch statistics while
  training, or with running statistics in evaluation and after the BN statistics are frozen
  (``quant_stats/bn_frozen``, see :func:`qatjax.set_quant_flags`). Frozen or in evaluation the
  output equals ``conv(x, fq(W * f)) + beta - f * (mean - b)``: exactly what the converted integer
  model computes. ``gamma = 0`` is guarded (no NaN).

  Parameters: ``kernel`` (and ``bias`` if ``use_bias``), ``bn_scale``, ``bn_bias``; running
  statistics ``batch_stats/mean`` and ``batch_stats/var``.

  Attributes:
    features, kernel_size, strides, padding, input_dilation, kernel_dilation,
    feature_group_count, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.Conv``.
    use_bias: conv bias (default False: BN has its own).
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None``.
    use_running_average: as ``nn.BatchNorm`` (may also be passed to ``__call__``).
    momentum, epsilon, scale_init, bn_bias_init: as ``nn.BatchNorm``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QConvBN(4, (3, 3), config=QuantConfig())
    >>> v = layer.init(jax.random.key(0), jnp.ones((2, 5, 5, 3)), use_running_average=False)
    >>> sorted(v["params"]), sorted(v["batch_stats"])
    (['bn_bias', 'bn_scale', 'kernel'], ['mean', 'var'])
  """

  features: int
  kernel_size: int | Sequence[int]
  config: QuantConfig | QuantRules | None = None
  strides: int | Sequence[int] | None = 1
  padding: Any = "SAME"
  input_dilation: int | Sequence[int] | None = 1
  kernel_dilation: int | Sequence[int] | None = 1
  feature_group_count: int = 1
  use_bias: bool = False
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  scale_init: Any = nn.initializers.ones_init()
  bn_bias_init: Any = nn.initializers.zeros_init()
  mask: Any = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    """Applies conv + BN; ``use_running_average=False`` trains with batch statistics."""
    cfg = resolve(self.config, module_path(self))
    if self.has_variable("params", "kernel") and isinstance(
      self.get_variable("params", "kernel"), QArray
    ):
      return conv_call(self, x, cfg)  # BN already folded into the integer kernel and the bias
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    n = self.features
    gamma = self.param("bn_scale", self.scale_init, (n,), self.param_dtype)
    beta = self.param("bn_bias", self.bn_bias_init, (n,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((n,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((n,), jnp.float32))
    frozen = self.variable(STATS, "bn_frozen", lambda: jnp.zeros((), jnp.bool_)).value
    f, f_safe = bn.fold_factor(gamma, ra_var.value, self.epsilon)
    holder = {}

    def fold(kernel):
      holder["conv_bias"] = (
        self.get_variable("params", "bias") if self.use_bias else jnp.zeros((n,), jnp.float32)
      )
      return kernel * f, lambda y: y / f_safe

    y = conv_call(self, x, cfg, kernel_transform=fold)  # = conv(x, fq(W f)) / f + b
    out, running = bn.normalize(
      y,
      gamma,
      beta,
      ra_mean.value,
      ra_var.value,
      frozen,
      f,
      use_running_average=use_ra,
      momentum=self.momentum,
      epsilon=self.epsilon,
    )
    updating = not self.is_initializing() and self.is_mutable_collection("batch_stats")
    if running is not None and updating:
      ra_mean.value, ra_var.value = running
    ctx = LinenContext(self)
    if ctx.recording:  # the folded bias of the integer model
      ctx.record("bias", bn.folded_bias(beta, holder["conv_bias"], ra_mean.value, f))
    return out
