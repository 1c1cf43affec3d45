"""``set_quant_flags``: the per-layer quantization switches, set from outside (or traced)."""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import traverse_util

from qatjax.ops.registry import FLAGS, STATS


def set_quant_flags(
  variables, *, enabled=None, observe=None, bn_frozen=None, path: str | None = None
):
  """Returns ``variables`` with the quantization switches in ``quant_stats`` replaced.

  Works inside ``jit`` with traced booleans (the QAT schedule flips them from the step counter
  without recompiling). ``None`` leaves a flag as it is.

  Args:
    variables: a variables dict with a ``quant_stats`` collection.
    enabled: fake quantization on (False: the layer computes exactly its float counterpart).
    observe: observers update their statistics (False: frozen).
    bn_frozen: ``QConvBN`` uses running BatchNorm statistics and stops updating them.
    path: only layers whose whole path matches this regex (``re.fullmatch``, as the rules).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> v = QDense(2, config=QuantConfig()).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> bool(set_quant_flags(v, enabled=False)["quant_stats"]["enabled"])
    False
  """
  if STATS not in variables:
    raise ValueError("variables have no 'quant_stats' collection: is the model quantized?")
  new = dict(zip(FLAGS, (enabled, observe, bn_frozen)))
  pattern = re.compile(path) if path is not None else None
  flat = traverse_util.flatten_dict(dict(variables[STATS]), sep="/")
  out = {}
  for key, value in flat.items():
    layer, _, name = key.rpartition("/")
    if new.get(name) is not None and (pattern is None or pattern.fullmatch(layer)):
      value = jnp.broadcast_to(jnp.asarray(new[name], jnp.bool_), jnp.shape(value))
    out[key] = value
  return {**variables, STATS: traverse_util.unflatten_dict(out, sep="/")}
