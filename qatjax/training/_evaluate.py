"""``evaluate``: metrics of a state over a whole dataset, with one compiled batch shape."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from qatjax.model.observers import warn_stale_observers
from qatjax.training._data import padded_batches


def evaluate(state, data: Sequence, *, batch_size: int, eval_step) -> dict[str, float]:
  """Mean metrics of ``eval_step`` over every example of ``data = (x, y)``.

  The last batch is padded to ``batch_size`` and masked, so every example counts exactly once
  and the step compiles once (and a padded batch still divides a mesh's device count when
  ``batch_size`` does).

  Args:
    state: a :class:`TrainState`.
    data: ``(inputs, labels)`` numpy arrays.
    batch_size: rows per batch.
    eval_step: from :func:`make_eval_step`.

  Returns:
    ``{"loss": ..., "accuracy": ..., "count": n}`` as Python floats.

  Warns:
    UserWarning: naming the layers whose activation observers have seen no batch since
      :func:`qatjax.from_float` (a training step that never made ``quant_stats`` mutable).

  Example:
    >>> import numpy as np, optax
    >>> from qatjax import QDense
    >>> from qatjax.training import create_train_state, evaluate, make_eval_step
    >>> x, y = np.ones((5, 3), np.float32), np.zeros(5, np.int32)
    >>> s = create_train_state(QDense(2), optax.sgd(0.1), jax.random.key(0), x)
    >>> evaluate(s, (x, y), batch_size=2, eval_step=make_eval_step())["count"]
    5.0
  """
  if hasattr(state, "variables"):  # a Linen TrainState (an nnx.ModelAndOptimizer has none)
    warn_stale_observers(state.variables, "evaluate")
  sums: dict[str, float] = {}
  total = 0.0
  for batch in padded_batches(data, batch_size):
    m = jax.device_get(eval_step(state, batch))
    count = float(m.pop("count"))
    total += count
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) * count
  out = {k: v / max(total, 1.0) for k, v in sums.items()}
  out["count"] = total
  return out
