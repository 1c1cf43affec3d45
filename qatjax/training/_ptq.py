"""``calibrate``: post-training quantization (observer calibration, no gradient step)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from qatjax.model.flags import set_quant_flags
from qatjax.training._state import TrainState


def _inputs(batch):
  return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibrate(
  target: TrainState | nn.Module,
  batches: Iterable,
  num_batches: int | None = None,
  *,
  variables: dict | None = None,
  apply_kwargs: Mapping[str, Any] | None = None,
):
  """Post-training quantization: runs forward passes so the observers record activation ranges.

  Only ``quant_stats`` is mutable: ``params`` (and ``batch_stats``, ``opt_state``, ``step``)
  stay bitwise unchanged. Observers update during these passes whatever their ``observe`` flag;
  the flags are returned as they were. The forward pass is jit-compiled once per batch shape.
  (``make_train_step(mode="ptq")`` does the same inside a training loop.)

  Args:
    target: a :class:`TrainState`, or a model together with ``variables``.
    batches: an iterable of batches: arrays of inputs or ``(inputs, labels, ...)`` tuples.
    num_batches: how many batches to use (default: all of them).
    variables: the model's variables (with ``target`` a model).
    apply_kwargs: keyword arguments for ``model.apply`` (e.g. ``{"train": False}``).

  Returns:
    The state with new ``quant_stats``, or (for a model) the new variables dict.

  Raises:
    ValueError: a float model (no ``quant_stats``), a model without ``variables``, a bad
      ``num_batches``, or ``batches`` that yield fewer than ``num_batches`` batches (or none).

  Example:
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import calibrate
    >>> model = QDense(2, config=QuantConfig(act_calibration="minmax"))
    >>> v = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> v2 = calibrate(model, [jnp.full((4, 3), 2.0), -jnp.ones((4, 3))], variables=v)
    >>> float(v2["quant_stats"]["input_min"]), float(v2["quant_stats"]["input_max"])
    (-1.0, 2.0)
  """
  if isinstance(target, TrainState):
    if variables is not None:
      raise ValueError("pass variables only with a model, not with a TrainState")
    apply_fn, current = target.apply_fn, target.variables
  elif isinstance(target, nn.Module):
    if variables is None:
      raise ValueError("calibrate(model, ...) needs variables=")
    apply_fn, current = target.apply, dict(variables)
  else:
    raise ValueError(f"target must be a TrainState or a flax Module, got {type(target).__name__}")
  if "quant_stats" not in current:
    raise ValueError("calibrate needs a quantized model: the variables have no quant_stats")
  if num_batches is not None and (
    isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
  ):
    raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
  kw = dict(apply_kwargs or {})

  @jax.jit
  def forward(v, x):
    return apply_fn(v, x, mutable=["quant_stats"], **kw)[1]["quant_stats"]

  original = current["quant_stats"]
  v = set_quant_flags(current, observe=True)
  used = 0
  for batch in batches:
    if num_batches is not None and used == num_batches:
      break
    v = {**v, "quant_stats": forward(v, _inputs(batch))}
    used += 1
  if used == 0 or (num_batches is not None and used < num_batches):
    raise ValueError(
      f"batches yielded {used} batches, expected "
      f"{num_batches if num_batches is not None else 'at least 1'}"
    )
  flat = traverse_util.flatten_dict(v["quant_stats"], sep="/")
  flat.update(
    {
      k: x
      for k, x in traverse_util.flatten_dict(original, sep="/").items()
      if k.rsplit("/", 1)[-1] == "observe"
    }
  )
  quant_stats = traverse_util.unflatten_dict(flat, sep="/")
  if isinstance(target, TrainState):
    return target.replace(quant_stats=quant_stats)
  return {**current, "quant_stats": quant_stats}
