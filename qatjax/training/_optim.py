"""Separate optimizers (learning rate, weight decay) for quantizer parameters and weights."""

from __future__ import annotations

import jax
import optax

from qatjax.ops.registry import is_quantizer_param
from qatjax.training._tree import key_name


def _leaf_name(path) -> str:
  """A parameter's name: the last dict key of its path (an ``nnx.State`` path ends in the
  variable's ``value`` attribute)."""
  keys = [e for e in path if not isinstance(e, jax.tree_util.GetAttrKey)]
  return key_name(keys[-1]) if keys else ""


def quant_param_labels(params):
  """Labels each parameter ``"quant"`` (a learned quantizer parameter) or ``"weights"``.

  Quantizer parameters are the leaves named ``kernel_scale``, ``embedding_scale``,
  ``input_scale``, ``input_zero_point`` and ``input_alpha`` (LSQ / LSQ+ / PACT).

  Args:
    params: a ``params`` tree (or an ``nnx.State`` of ``nnx.Param``).

  Returns:
    A tree of the same structure with ``"quant"`` / ``"weights"`` leaves (the label function of
    ``optax.multi_transform``).

  Example:
    >>> from qatjax.training import quant_param_labels
    >>> quant_param_labels({"Dense_0": {"kernel": 0.0, "kernel_scale": 0.0}})
    {'Dense_0': {'kernel': 'weights', 'kernel_scale': 'quant'}}
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "quant" if is_quantizer_param(_leaf_name(path)) else "weights", params
  )


def make_optimizer(
  weights_tx: optax.GradientTransformation, quant_tx: optax.GradientTransformation
) -> optax.GradientTransformation:
  """One optimizer: ``weights_tx`` for weights, ``quant_tx`` for learned quantizer parameters.

  Scales usually want a smaller learning rate and no weight decay (decay would shrink the step
  sizes towards zero). Built with ``optax.multi_transform`` and :func:`quant_param_labels`.

  Args:
    weights_tx: optimizer for kernels, biases, BatchNorm parameters, ...
    quant_tx: optimizer for ``kernel_scale``, ``input_scale``, ``input_zero_point``,
      ``input_alpha``, ``embedding_scale``.

  Example:
    >>> import optax
    >>> from qatjax.training import make_optimizer
    >>> tx = make_optimizer(optax.adamw(1e-3, weight_decay=1e-4), optax.adam(1e-4))
    >>> p = {"kernel": jnp.ones(2), "kernel_scale": jnp.ones(2)}
    >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    >>> float(u["kernel"][0]) < float(u["kernel_scale"][0]) < 0
    True
  """
  for name, tx in (("weights_tx", weights_tx), ("quant_tx", quant_tx)):
    if not isinstance(tx, optax.GradientTransformation):
      raise ValueError(f"{name} must be an optax GradientTransformation, got {tx!r}")
  return optax.multi_transform({"weights": weights_tx, "quant": quant_tx}, quant_param_labels)
