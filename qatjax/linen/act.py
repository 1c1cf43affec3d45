"""``QAct``: a standalone activation quantizer (e.g. after a residual add)."""

from __future__ import annotations

import flax.linen as nn

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules, resolve
from qatjax.linen.context import LinenContext, module_path
from qatjax.ops.act_quantizers import (
  quantize_act,
  record_act,
)
from qatjax.ops.context import flags


class QAct(nn.Module):
  """Fake-quantizes a tensor with the activation settings of ``config``.

  Use it where a model has an activation that no quantized layer consumes directly (after a
  residual add, before a float op). Its state is the same as a layer's input quantizer:
  ``quant_stats/input_*`` (observer) or ``params/input_scale`` (LSQ).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> q = QAct(QuantConfig(weight_bits=None, act_bits=4))
    >>> v = q.init(jax.random.key(0), jnp.ones(3))
    >>> y, v2 = q.apply(v, jnp.array([0.0, 0.5, 1.0]), mutable=["quant_stats"])
    >>> [round(v, 4) for v in y.tolist()]
    [0.0, 0.4667, 1.0]
  """

  config: QuantConfig | QuantRules | None = None

  @nn.compact
  def __call__(self, x):
    cfg = resolve(self.config, module_path(self))
    if cfg is None or cfg.act_bits is None:
      return x
    ctx = LinenContext(self)
    enabled, observe = flags(ctx)
    y, act = quantize_act(ctx, x, cfg.act_quant, enabled, observe)
    record_act(ctx, act, calibrated=True)  # for the exporters; convert keeps QAct as it is
    return y
