"""``from_float``: QAT variables from a trained float model's variables."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qatjax.ops.registry import ACT_SITES, STATS, act_leaf, is_quantizer_param


def _flat_paths(tree):
  """``{'Dense_0/kernel': leaf}`` of a (boxed or plain) collection."""
  return traverse_util.flatten_dict(nn.unbox(dict(tree)), sep="/") if tree else {}


def from_float(qmodel: nn.Module, float_variables, *args, rng=None, **kwargs) -> dict:
  """QAT variables for ``qmodel`` from a trained float model's variables and an example batch.

  Copies every float ``params`` / ``batch_stats`` leaf to the same path of the QAT model, then
  runs ``qmodel`` once on ``args`` with the float weights to initialise the quantizers: LSQ steps
  from LSQ's rule on the float kernels (``2 * mean(|w|) / sqrt(qmax)``), activation scales and
  observer statistics from this batch. Float leaves are returned unchanged (``batch_stats`` is
  not updated by the example batch). Each observer records the batch count it was left with
  (``input_count_from_float``), so that :func:`convert` can warn about observers a training loop
  never updated (one that does not make ``quant_stats`` mutable).

  Args:
    qmodel: the quantized model (``QDense`` / ``QConv`` layers, or :func:`quantize_model`).
    float_variables: ``{"params": ..., "batch_stats": ...}`` of the float model, same paths.
    *args: an example batch (and any other positional ``__call__`` arguments).
    rng: PRNG key for any parameter the float model lacks (default ``key(0)``).
    **kwargs: keyword arguments for ``qmodel.__call__`` (e.g. ``train=False``).

  Returns:
    A variables dict: ``params``, ``quant_stats`` and, if any, ``batch_stats``.

  Raises:
    ValueError: naming a path the float variables lack, or one they have and ``qmodel`` lacks or
      has with another shape; or ``qmodel`` has no quantized layer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> x = jnp.ones((4, 3))
    >>> fvars = nn.Dense(2).init(jax.random.key(0), x)
    >>> qvars = from_float(QDense(2, config=QuantConfig(method="lsq")), fvars, x)
    >>> bool((qvars["params"]["kernel"] == fvars["params"]["kernel"]).all())
    True
  """
  rng = jax.random.key(0) if rng is None else rng
  ref = jax.eval_shape(lambda: qmodel.init(rng, *args, **kwargs))
  if STATS not in ref:
    raise ValueError(no_quantized_layer("from_float", qmodel))
  float_cols = {c: float_variables[c] for c in ("params", "batch_stats") if c in float_variables}
  if "params" not in float_cols:
    raise ValueError(f"float_variables has no 'params' collection (got {sorted(float_variables)})")
  for col, tree in float_cols.items():
    want, have = _flat_paths(ref.get(col, {})), _flat_paths(tree)
    for path, leaf in have.items():
      if path not in want:
        raise ValueError(
          f"from_float: float variable {col}/{path} has no counterpart in the "
          f"quantized model (extra path)"
        )
      if tuple(jnp.shape(leaf)) != tuple(want[path].shape):
        raise ValueError(
          f"from_float: {col}/{path} has shape {tuple(jnp.shape(leaf))} in the "
          f"float variables but {tuple(want[path].shape)} in the quantized model"
        )
    for path in want:
      if path not in have and not is_quantizer_param(path.rsplit("/", 1)[-1]):
        raise ValueError(f"from_float: the float variables lack {col}/{path} (missing path)")
  new = compiled_apply(qmodel, float_cols, args, kwargs, rngs={"params": rng}, mutable=list(ref))[1]
  out = {c: new[c] for c in ref if c in new}
  for col, tree in float_cols.items():
    out[col] = traverse_util.unflatten_dict({**_flat_paths(new[col]), **_flat_paths(tree)}, sep="/")
  out[STATS] = _record_counts(out[STATS])
  return out


def compiled_apply(model, variables, args, kwargs, *, mutable, rngs=None):
  """``model.apply(variables, *args, rngs=rngs, mutable=mutable, **kwargs)`` as one compiled
  program: much faster than running every quantized op eagerly (a small transformer's
  ``convert``: about 1 s instead of 14 s). Array arguments and ``rngs`` are traced; other
  arguments and ``kwargs`` are constants."""
  is_array = [isinstance(a, (jax.Array, np.ndarray)) for a in args]

  def run(v, arrays, rngs):
    it = iter(arrays)
    full = [next(it) if arr else a for a, arr in zip(args, is_array)]
    return model.apply(v, *full, rngs=rngs, mutable=mutable, **kwargs)

  return jax.jit(run)(variables, [a for a, arr in zip(args, is_array) if arr], rngs)


def _record_counts(stats):
  """``stats`` with every observer's ``<site>_count_from_float`` set to its current count."""
  flat = traverse_util.flatten_dict(dict(stats), sep="/")
  for key, value in list(flat.items()):
    layer, _, name = key.rpartition("/")
    for site in ACT_SITES:
      start = (f"{layer}/" if layer else "") + act_leaf(site, "count_from_float")
      if name == act_leaf(site, "count") and start in flat:
        flat[start] = value
  return traverse_util.unflatten_dict(flat, sep="/")


def no_quantized_layer(caller: str, model) -> str:
  """The message for a model none of whose layers quantizes anything."""
  return (
    f"{caller}: no layer of {type(model).__name__} is quantized (no QDense / QConv / QEmbed / "
    "QAct layer with a QuantConfig, and no quantize_model rule that maps a layer to a "
    "QuantConfig): wrap the float model with qatjax.quantize_model(model, QuantConfig()) or "
    "give its layers a config"
  )
