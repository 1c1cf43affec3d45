"""``convert``: trained QAT variables to an integer deployment pytree."""

from __future__ import annotations

import jax
from flax import traverse_util

from qatjax.core.qarray import QArray
from qatjax.model.from_float import compiled_apply, no_quantized_layer
from qatjax.model.observers import warn_stale_observers
from qatjax.model.sharding import place_like_weight
from qatjax.ops.registry import (
  ACT_SITES,
  BN_FOLDED,
  CONVERTED_MARKERS,
  RECORD,
  STATS,
  WEIGHTS,
  act_leaf,
)


def _flat(tree):
  """``{('Dense_0', 'kernel'): leaf}`` of a collection."""
  return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _check_calibrated(layer, record, stats):
  """Every activation quantizer a converted layer keeps must have seen data."""
  for site in ACT_SITES:
    count = stats.get(layer + (act_leaf(site, "count"),))
    if layer + (act_leaf(site, "scale"),) in record and count is not None and not int(count) > 0:
      raise ValueError(
        f"convert: layer {'/'.join(layer) or '<root>'} has no activation "
        "statistics (its observer never saw data); calibrate or train with "
        "mutable=['quant_stats'] first"
      )


def convert(model, variables, *args, **kwargs) -> dict:
  """Converts QAT variables to integers for deployment (Jacob et al. 2018).

  Runs ``model`` once in evaluation mode (``quant_stats`` immutable) on the example ``args`` with
  the ``quant_record`` collection mutable: every quantized op records what its integer kernel
  needs. For every quantized layer that is its kernel (or embedding table) as a :class:`QArray`
  (``int8``; two values per byte at 3 and 4 bits, four at 2 bits) stored in the order the kernel
  reads it, its frozen input scale, zero point and bit width, and the int32 kernel sums the
  zero-point correction needs. ``QConvBN`` layers are folded: their kernel holds
  ``W * gamma / sqrt(var + eps)`` and their ``bias`` the folded BN shift. Biases stay float32
  (added after the int32 accumulator is rescaled). The layer's quantizer parameters and statistics
  are dropped; float layers are left untouched.

  Shardings are kept: when a layer's float weight is split over a mesh (a ``NamedSharding``),
  the stored integers, their scales and the layer's other recorded tensors follow it
  (:mod:`qatjax.model.sharding`), so the integer model is split as the trained one was.

  The result is a variables dict for the *same* model: ``model.apply(qvars, x)`` then runs
  int8 x int8 -> int32 matmuls and convolutions.

  Args:
    model: the QAT model.
    variables: its trained variables (``params``, ``quant_stats``, ``batch_stats``).
    *args: an example input (shapes only matter; it does not change any statistic).
    **kwargs: keyword arguments for the model's ``__call__`` in evaluation mode (e.g.
      ``train=False``).

  Returns:
    The converted variables: ``params`` with :class:`QArray` kernels, and ``quant_stats`` only
    where a layer still needs it (``QAct``).

  Raises:
    ValueError: naming a layer whose activation observer was never calibrated; a model with no
      quantized layer; variables that are already converted.

  Warns:
    UserWarning: naming the layers whose observers have seen no batch since :func:`from_float`
      (a training loop that never made ``quant_stats`` mutable): their frozen input ranges are
      the example batch's.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QDense(3, config=QuantConfig())
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> v = layer.init(jax.random.key(0), x)
    >>> _, stats = layer.apply(v, x, mutable=["quant_stats"])   # calibrate
    >>> qv = convert(layer, {**v, **stats}, x)
    >>> qv["params"]["kernel"].values.dtype
    dtype('int8')
    >>> bool(jnp.abs(layer.apply(qv, x) - layer.apply({**v, **stats}, x)).max() < 1e-4)
    True
  """
  variables = dict(variables)
  recorded = compiled_apply(model, variables, args, kwargs, mutable=[RECORD])[1]
  record = _flat(recorded.get(RECORD, {}))
  if not record and STATS not in variables:
    converted = any(
      isinstance(leaf, QArray)
      for leaf in jax.tree.leaves(variables["params"], is_leaf=lambda a: isinstance(a, QArray))
    )
    if converted:
      raise ValueError("convert: the variables are already converted (their kernels are QArrays)")
    raise ValueError(no_quantized_layer("convert", model))
  layers = sorted({k[:-1] for k in record if k[-1] in CONVERTED_MARKERS})
  params = _flat(variables["params"])
  stats = _flat(variables.get(STATS, {}))
  for layer in layers:
    _check_calibrated(layer, record, stats)
    weight = next((k[-1] for k in record if k[:-1] == layer and k[-1] in WEIGHTS), None)
    source = None if weight is None else params.get(layer + (weight,))  # attention: no weight
    # Quantizer and BN parameters (folded into kernel and bias) go; the bias stays unless the
    # layer recorded a folded one.
    folded_norm = layer + (BN_FOLDED,) in record  # a BatchNorm folded into its conv: all goes
    for key in [k for k in params if k[:-1] == layer and (k[-1] != "bias" or folded_norm)]:
      del params[key]
    for key in [k for k in record if k[:-1] == layer]:
      params[key] = place_like_weight(source, weight, record[key])
    for key in [k for k in stats if k[:-1] == layer]:
      del stats[key]
  warn_stale_observers(variables, "convert")
  out = {"params": traverse_util.unflatten_dict(params)}
  if stats:
    out[STATS] = traverse_util.unflatten_dict(stats)
  bs = {k: v for k, v in _flat(variables.get("batch_stats", {})).items() if k[:-1] not in layers}
  if bs:
    out["batch_stats"] = traverse_util.unflatten_dict(bs)
  out.update(
    {c: t for c, t in variables.items() if c not in ("params", STATS, "batch_stats", RECORD)}
  )
  return out
