"""``TrainState``: parameters, optimizer state and quantizer state of a QAT run, as one pytree."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from qatjax.ops.registry import RECORD
from qatjax.training._tree import diff_specs, leaf_specs

# Collections a train state carries besides ``params``.
STATE_COLLECTIONS = ("quant_stats", "batch_stats")
# Collections ``model.init`` may return that are not training state.
_IGNORED_COLLECTIONS = (RECORD,)


@dataclasses.dataclass(frozen=True)
class ModuleApply:
  """``module.apply`` that compares (and hashes) by the module's value, not by identity.

  A bound method ``model.apply`` equals only the same instance's method, so a state built from
  an equal but distinct model (e.g. the target of a restore) would retrace a jitted step.
  """

  module: nn.Module

  def __call__(self, *args, **kwargs):
    return self.module.apply(*args, **kwargs)


class TrainState(struct.PyTreeNode):
  """The whole state of a QAT run: one pytree, jit- and checkpoint-friendly.

  Like ``flax.training.train_state.TrainState`` with the quantizer state added: learned scales
  (LSQ / PACT) live in ``params`` and are trained with the weights; observer statistics and the
  ``enabled`` / ``observe`` / ``bn_frozen`` switches live in ``quant_stats``; BatchNorm running
  statistics in ``batch_stats``. A collection the model does not have is an empty dict.

  Attributes:
    step: int32 scalar, number of optimizer (or calibration) steps taken.
    params: the ``params`` collection.
    opt_state: the optax state of ``tx``.
    quant_stats: the ``quant_stats`` collection (``{}`` for a float model).
    batch_stats: the ``batch_stats`` collection (``{}`` without BatchNorm).
    apply_fn: ``model.apply`` (static, not a leaf; compared by the model's value).
    tx: the optax ``GradientTransformation`` (static, not a leaf).

  Example:
    >>> import optax
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import create_train_state
    >>> s = create_train_state(QDense(2, config=QuantConfig()), optax.sgd(0.1),
    ...                        jax.random.key(0), jnp.ones((1, 3)))
    >>> int(s.step), sorted(s.variables)
    (0, ['params', 'quant_stats'])
  """

  step: jax.Array
  params: Any
  opt_state: Any
  quant_stats: Any
  batch_stats: Any
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @property
  def variables(self) -> dict:
    """``{"params": ..., "quant_stats": ..., "batch_stats": ...}`` (non-empty collections).

    Example:
      >>> import optax
      >>> from qatjax import QDense
      >>> from qatjax.training import create_train_state
      >>> s = create_train_state(QDense(2), optax.sgd(0.1), jax.random.key(0), jnp.ones((1, 3)))
      >>> sorted(s.variables)                       # a float layer: no quant_stats
      ['params']
    """
    out = {"params": self.params}
    for col in STATE_COLLECTIONS:
      tree = getattr(self, col)
      if tree:
        out[col] = tree
    return out

  def apply_gradients(self, *, grads, **kwargs) -> TrainState:
    """One optimizer update with ``grads``; ``step`` + 1; ``kwargs`` replace other fields.

    Example:
      >>> import optax
      >>> from qatjax import QDense
      >>> from qatjax.training import create_train_state
      >>> s = create_train_state(QDense(1), optax.sgd(1.0), jax.random.key(0), jnp.ones((1, 1)))
      >>> g = jax.tree.map(jnp.ones_like, s.params)
      >>> s2 = s.apply_gradients(grads=g)
      >>> int(s2.step), float(s2.params["bias"][0])
      (1, -1.0)
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("kwargs",))
def _jit_init(model, rng, example_input, kwargs):
  return model.init(rng, example_input, **dict(kwargs))


def _init(model, rng, example_input, init_kwargs):
  """``model.init``, compiled (much faster than op by op) and cached for equal models."""
  kwargs = tuple(sorted(init_kwargs.items()))
  try:
    hash((model, kwargs))
  except TypeError:  # an unhashable model or keyword argument: compile without caching
    return jax.jit(lambda r, x: model.init(r, x, **init_kwargs))(rng, example_input)
  return _jit_init(model, rng, example_input, kwargs=kwargs)


def create_train_state(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  rng,
  example_input,
  *,
  variables: dict | None = None,
  **init_kwargs,
) -> TrainState:
  """A :class:`TrainState` for ``model``, from ``model.init`` or from given ``variables``.

  Args:
    model: a Flax module (``QDense`` / ``QConv`` layers, :func:`qatjax.quantize_model`, or a
      float model).
    optimizer: an optax ``GradientTransformation`` (see :func:`make_optimizer` for separate
      learning rates for quantizer scales).
    rng: a PRNG key (or an int seed) for ``model.init``.
    example_input: an example batch for ``model.init`` (its batch size does not matter later).
    variables: start from these variables instead of ``model.init``, e.g. the output of
      :func:`qatjax.from_float`; they are checked against the model's variable tree.
    **init_kwargs: keyword arguments for ``model.init`` (e.g. ``train=False``).

  Returns:
    A :class:`TrainState` at step 0.

  Raises:
    ValueError: ``variables`` without ``params``, with a collection a train state cannot hold,
      or whose paths / shapes differ from the model's (naming the first mismatching paths).

  Example:
    >>> import flax.linen as nn, optax
    >>> from qatjax import QDense, QuantConfig, from_float
    >>> from qatjax.training import create_train_state
    >>> x = jnp.ones((4, 3))
    >>> fvars = nn.Dense(2).init(jax.random.key(0), x)
    >>> qmodel = QDense(2, config=QuantConfig())
    >>> s = create_train_state(qmodel, optax.adam(1e-3), jax.random.key(1), x,
    ...                        variables=from_float(qmodel, fvars, x))
    >>> bool((s.params["kernel"] == fvars["params"]["kernel"]).all())
    True
  """
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  if rng is None:
    rng = jax.random.key(0)
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
  if variables is None:
    variables = _init(model, rng, example_input, init_kwargs)
  else:
    variables = dict(variables)
    if "params" not in variables:
      raise ValueError(f"variables has no 'params' collection (got {sorted(variables)})")
    ref = jax.eval_shape(lambda: model.init(rng, example_input, **init_kwargs))
    ref = {c: t for c, t in ref.items() if c not in _IGNORED_COLLECTIONS}
    have = {c: t for c, t in variables.items() if c not in _IGNORED_COLLECTIONS}
    problems = diff_specs(
      leaf_specs(nn.unbox(have)),
      leaf_specs(nn.unbox(ref)),
      have_name="the given variables",
      want_name="the model",
      dtypes=False,
    )
    if problems:
      raise ValueError("variables do not match the model: " + "; ".join(problems))
  variables = {c: t for c, t in nn.unbox(dict(variables)).items() if c not in _IGNORED_COLLECTIONS}
  unknown = sorted(set(variables) - {"params", *STATE_COLLECTIONS})
  if unknown:
    raise ValueError(
      f"the model has collections {unknown} that a TrainState cannot hold "
      f"(allowed: params, {', '.join(STATE_COLLECTIONS)})"
    )
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=jax.jit(optimizer.init)(params),
    quant_stats=variables.get("quant_stats", {}),
    batch_stats=variables.get("batch_stats", {}),
    apply_fn=ModuleApply(model),
    tx=optimizer,
  )
