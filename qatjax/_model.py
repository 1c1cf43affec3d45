"""Whole-model helpers: ``quantize_model``, ``from_float`` and ``set_quant_flags``."""

from __future__ import annotations

import re
import warnings
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qatjax._config import QuantConfig, QuantRules, rules as make_rules
from qatjax._conv import conv_forward
from qatjax._dense import dense_forward
from qatjax._quantizers import EXPORT, STATS, module_path

# Leaves a quantized model has that its float counterpart does not.
QUANTIZER_LEAVES = ("kernel_scale", "embedding_scale", "input_scale", "input_zero_point",
                    "input_alpha")


def _forward_for(module):
  if type(module) is nn.Dense:
    return dense_forward
  if type(module) is nn.Conv:
    return conv_forward
  return None


class QuantizedModel(nn.Module):
  """A float Flax model whose ``nn.Dense`` / ``nn.Conv`` layers run quantized (see
  :func:`quantize_model`). Shares its scope with ``model``: the parameter tree is unchanged."""

  model: nn.Module
  rules: QuantRules

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, *args, **kwargs):
    return self.run(self.model.__call__, *args, **kwargs)

  def run(self, method, *args, **kwargs):
    matched: dict[str, list[str]] = {}
    rules = self.rules

    def interceptor(next_fun, a, kw, context):
      m = context.module
      forward = _forward_for(m)
      if context.method_name != "__call__" or forward is None:
        return next_fun(*a, **kw)
      path = module_path(m)
      pattern, cfg = rules.match(path)
      if pattern is not None:
        matched.setdefault(pattern, []).append(path)
      if cfg is None:
        return next_fun(*a, **kw)
      if getattr(m, "dot_general", None) is not None or getattr(m, "dot_general_cls", None):
        raise ValueError(f"layer {path}: a custom dot_general cannot be quantized")
      return forward(m, *a, cfg, **kw)

    with nn.intercept_methods(interceptor):
      out = method(*args, **kwargs)
    if self.is_initializing():
      unmatched = [p for p, _ in rules.patterns if p not in matched]
      if unmatched:
        warnings.warn(f"quantize_model: rules {unmatched} matched no nn.Dense / nn.Conv layer",
                      stacklevel=2)
    return out


def quantize_model(model: nn.Module, rules: QuantRules | QuantConfig | dict) -> QuantizedModel:
  """Runs an unmodified float model's ``nn.Dense`` / ``nn.Conv`` layers as quantized layers.

  Uses Flax's method interception (``nn.intercept_methods``) around this model's calls only; no
  ``lax`` function is patched. The parameter tree is the float model's, plus quantizer state, so
  float checkpoints load with :func:`from_float`. Layers are matched by path (``"Dense_0"``,
  ``"block/Conv_1"``); rules that match no layer are reported with a warning at ``init``, and
  :func:`rules_report` lists the matches.

  Args:
    model: a Flax Linen module using ``nn.Dense`` / ``nn.Conv``.
    rules: a :class:`QuantRules`, a ``{regex: QuantConfig or None}`` mapping, or one
      :class:`QuantConfig` for every layer.

  Returns:
    A module with the same ``init`` / ``apply`` interface.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> float_model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> qm = quantize_model(float_model, {"layers_0": QuantConfig(8, 8)})
    >>> v = qm.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> sorted(v["quant_stats"]["layers_0"])[:2]
    ['enabled', 'input_count']
  """
  if isinstance(rules, QuantConfig):
    rules = make_rules({".*": rules})
  elif isinstance(rules, dict):
    rules = make_rules(rules)
  elif not isinstance(rules, QuantRules):
    raise ValueError(f"rules must be a QuantRules, mapping or QuantConfig, got {rules!r}")
  return QuantizedModel(model, rules)


def rules_report(model: QuantizedModel, *args, **kwargs) -> dict[str, list[str]]:
  """``{pattern: [matched layer paths]}`` for every rule of a :func:`quantize_model` model."""
  matched = {p: [] for p, _ in model.rules.patterns}

  def interceptor(next_fun, a, kw, context):
    if context.method_name == "__call__" and _forward_for(context.module) is not None:
      pattern, _ = model.rules.match(module_path(context.module))
      if pattern is not None and module_path(context.module) not in matched[pattern]:
        matched[pattern].append(module_path(context.module))
    return next_fun(*a, **kw)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return matched


def _flat(tree):
  return traverse_util.flatten_dict(nn.unbox(dict(tree)), sep="/") if tree else {}


def from_float(qmodel: nn.Module, float_variables, *args, rng=None, **kwargs) -> dict:
  """QAT variables for ``qmodel`` from a trained float model's variables and an example batch.

  Copies every float ``params`` / ``batch_stats`` leaf to the same path of the QAT model, then
  runs ``qmodel`` once on ``args`` with the float weights to initialise the quantizers: LSQ steps
  from LSQ's rule on the float kernels (``2 * mean(|w|) / sqrt(qmax)``), activation scales and
  observer statistics from this batch. Float leaves are returned unchanged (``batch_stats`` is
  not updated by the example batch).

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
      has with another shape.

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
  float_cols = {c: float_variables[c] for c in ("params", "batch_stats") if c in float_variables}
  if "params" not in float_cols:
    raise ValueError(f"float_variables has no 'params' collection (got {sorted(float_variables)})")
  for col, tree in float_cols.items():
    want, have = _flat(ref.get(col, {})), _flat(tree)
    for path, leaf in have.items():
      if path not in want:
        raise ValueError(f"from_float: float variable {col}/{path} has no counterpart in the "
                         f"quantized model (extra path)")
      if tuple(jnp.shape(leaf)) != tuple(want[path].shape):
        raise ValueError(f"from_float: {col}/{path} has shape {tuple(jnp.shape(leaf))} in the "
                         f"float variables but {tuple(want[path].shape)} in the quantized model")
    for path in want:
      if path not in have and path.rsplit("/", 1)[-1] not in QUANTIZER_LEAVES:
        raise ValueError(f"from_float: the float variables lack {col}/{path} (missing path)")
  # Jitted: one compilation is much faster than running every quantizer's init eagerly.
  is_array = [isinstance(a, (jax.Array, np.ndarray)) for a in args]

  def init_quantizers(cols, arrays, key):
    it = iter(arrays)
    full = [next(it) if arr else a for a, arr in zip(args, is_array)]
    return qmodel.apply(cols, *full, rngs={"params": key}, mutable=True, **kwargs)[1]

  arrays = [a for a, arr in zip(args, is_array) if arr]
  new = jax.jit(init_quantizers)(float_cols, arrays, rng)
  out = {c: new[c] for c in ref if c in new and c != EXPORT}
  for col, tree in float_cols.items():
    out[col] = traverse_util.unflatten_dict({**_flat(new[col]), **_flat(tree)}, sep="/")
  return out


def set_quant_flags(variables, *, enabled=None, observe=None, bn_frozen=None,
                    path: str | None = None):
  """Returns ``variables`` with the quantization switches in ``quant_stats`` replaced.

  Works inside ``jit`` with traced booleans (the QAT schedule flips them from the step counter
  without recompiling). ``None`` leaves a flag as it is.

  Args:
    variables: a variables dict with a ``quant_stats`` collection.
    enabled: fake quantization on (False: the layer computes exactly its float counterpart).
    observe: observers update their statistics (False: frozen).
    bn_frozen: ``QConvBN`` uses running BatchNorm statistics and stops updating them.
    path: only layers whose path matches this regex (``re.search``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> v = QDense(2, config=QuantConfig()).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> bool(set_quant_flags(v, enabled=False)["quant_stats"]["enabled"])
    False
  """
  if "quant_stats" not in variables:
    raise ValueError("variables have no 'quant_stats' collection: is the model quantized?")
  new = {"enabled": enabled, "observe": observe, "bn_frozen": bn_frozen}
  pattern = re.compile(path) if path is not None else None
  flat = _flat(variables[STATS])
  out = {}
  for key, value in flat.items():
    layer, _, name = key.rpartition("/")
    if new.get(name) is not None and (pattern is None or pattern.search(layer)):
      value = jnp.broadcast_to(jnp.asarray(new[name], jnp.bool_), jnp.shape(value))
    out[key] = value
  return {**variables, STATS: traverse_util.unflatten_dict(out, sep="/")}


