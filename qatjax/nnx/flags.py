"""``set_quant_flags`` for NNX models: the per-layer switches, set in place (traced or not)."""

from __future__ import annotations

import re

import jax.numpy as jnp

from qatjax.nnx.context import QuantStat
from qatjax.nnx.passes import quant_modules
from qatjax.ops.registry import FLAGS


def set_quant_flags(model, *, enabled=None, observe=None, bn_frozen=None, path: str | None = None):
  """Sets the quantization switches of an NNX model's quantized layers, in place.

  The NNX form of :func:`qatjax.set_quant_flags`: the switches are :class:`QuantStat` variables,
  so inside ``nnx.jit`` a traced boolean (e.g. from :meth:`qatjax.training.QATSchedule.flags`
  of the optimizer's step) flips them without recompiling.

  Args:
    model: a quantized NNX model.
    enabled: fake quantization on (False: every quantized layer computes its float counterpart).
    observe: observers update their statistics (False: frozen).
    bn_frozen: ``QConvBN`` uses running BatchNorm statistics and stops updating them.
    path: only layers whose whole path matches this regex (``re.fullmatch``, as the rules).

  Raises:
    ValueError: the model has no quantization switch (not quantized, or not initialised).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, init_quantizers, set_quant_flags
    >>> layer = QLinear(3, 2, config=QuantConfig(), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((1, 3)))
    >>> set_quant_flags(layer, enabled=False)
    >>> bool(layer.enabled[...])
    False
  """
  new = {k: v for k, v in zip(FLAGS, (enabled, observe, bn_frozen)) if v is not None}
  pattern = re.compile(path) if path is not None else None
  switches = [
    (p, m)
    for p, m in quant_modules(model)
    if any(isinstance(vars(m).get(name), QuantStat) for name in FLAGS)
  ]
  if not switches:
    raise ValueError(
      "the model has no quantization switches: is it quantized (qatjax.nnx.quantize_model / "
      "init_quantizers)?"
    )
  for p, m in switches:
    if pattern is not None and not pattern.fullmatch(p):
      continue
    for name, value in new.items():
      var = vars(m).get(name)
      if isinstance(var, QuantStat):
        var.set_value(jnp.broadcast_to(jnp.asarray(value, jnp.bool_), var.get_value().shape))
