"""Stale observers: activation observers that have seen no batch since :func:`qatjax.from_float`.

``from_float`` runs the model once on an example batch, so every observer starts with a range
and a count (usually 1), and records that count in ``<site>_count_from_float``. A training loop
that never makes ``quant_stats`` mutable (the usual Flax ``mutable=["batch_stats"]``) leaves the
count there: the ranges ``convert`` would freeze are the example batch's. ``convert`` and
``qatjax.training.evaluate`` warn about such layers. Variables from ``init`` record 0, so an
observer calibrated after ``init`` is never reported; one whose ``observe`` switch is off was
frozen on purpose and is not reported either.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from flax import traverse_util

from qatjax.ops.registry import ACT_SITES, STATS, act_leaf


def stale_observers(variables) -> list[str]:
  """Paths of the layers whose activation observer has seen no batch since ``from_float``.

  Args:
    variables: a variables dict (``quant_stats`` is read; none: no layer is stale).

  Returns:
    The layer paths (``"block/Dense_0"``, ``"<root>"``), in the tree's order.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from qatjax.model.observers import stale_observers
    >>> x = jnp.ones((2, 3))
    >>> qmodel = QDense(2, config=QuantConfig())
    >>> qvars = from_float(qmodel, nn.Dense(2).init(jax.random.key(0), x), x)
    >>> stale_observers(qvars)                        # from_float's batch only
    ['<root>']
    >>> _, stats = qmodel.apply(qvars, x, mutable=["quant_stats"])
    >>> stale_observers({**qvars, **stats})           # one more batch seen
    []
  """
  stats = variables.get(STATS) if hasattr(variables, "get") else None
  if not stats:
    return []
  flat = traverse_util.flatten_dict(jax.device_get(dict(stats)), sep="/")
  stale = []
  for key, count in flat.items():
    layer, _, name = key.rpartition("/")
    prefix = f"{layer}/" if layer else ""
    for site in ACT_SITES:
      if name != act_leaf(site, "count"):
        continue
      start = flat.get(prefix + act_leaf(site, "count_from_float"))
      observing = bool(np.all(flat.get(prefix + "observe", True)))
      if start is not None and observing and 0 < int(start) == int(count):
        path = layer or "<root>"
        if path not in stale:
          stale.append(path)
  return stale


def warn_stale_observers(variables, caller: str, *, stacklevel: int = 3) -> list[str]:
  """Warns (``UserWarning``), naming the layers, when :func:`stale_observers` finds any; returns
  them.

  Example:
    >>> import warnings
    >>> from qatjax.model.observers import warn_stale_observers
    >>> warn_stale_observers({"params": {}}, "convert")
    []
  """
  stale = stale_observers(variables)
  if stale:
    warnings.warn(
      f"{caller}: the activation observers of {stale} have seen no batch since from_float, so "
      "their ranges are still those of from_float's example batch. Make quant_stats mutable "
      "in every training step (logits, stats = model.apply(variables, x, "
      "mutable=['quant_stats'])) or calibrate (qatjax.training.calibrate) first.",
      UserWarning,
      stacklevel=stacklevel,
    )
  return stale
