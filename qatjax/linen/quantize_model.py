"""``quantize_model``: an unmodified float Linen model whose layers run as quantized layers."""

from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules
from qatjax.core.rules import rules as make_rules
from qatjax.linen.context import module_path
from qatjax.linen.conv import conv
from qatjax.linen.dense import dense

# The Flax layers quantize_model runs quantized: module type -> (kind, quantized __call__).
LAYERS = {nn.Dense: ("dense", dense), nn.Conv: ("conv", conv)}


def layer_kind(module) -> str | None:
  """The registry kind of a Flax layer that :func:`quantize_model` quantizes, else ``None``."""
  entry = LAYERS.get(type(module))
  return None if entry is None else entry[0]


def _forward_for(module):
  entry = LAYERS.get(type(module))
  return None if entry is None else entry[1]


@dataclasses.dataclass(frozen=True)
class _FloatModel:
  """Holds the wrapped model out of Flax's sight: it is bound onto the wrapper's own scope at
  each call, so it adds no name to the variable tree (and its layers' paths are the variable
  paths, whatever the model calls its submodules)."""

  module: nn.Module


class QuantizedModel(nn.Module):
  """A float Flax model whose layers run quantized (see :func:`quantize_model`). Its variable
  tree is the float model's plus quantizer state; ``model`` and ``rules`` are what it wraps.

  Example:
    >>> import flax.linen as nn
    >>> qm = quantize_model(nn.Dense(2), QuantConfig(4, 4))
    >>> type(qm.model).__name__, qm.rules.lookup("<root>").weight_bits
    ('Dense', 4)
  """

  wrapped: _FloatModel
  rules: QuantRules

  @property
  def model(self) -> nn.Module:
    """The wrapped float model."""
    return self.wrapped.module

  def __call__(self, *args, **kwargs):
    return self.run("__call__", *args, **kwargs)

  def layer_path(self, module) -> str:
    """``module``'s path relative to the wrapped model (``"<root>"`` for the model itself)."""
    return "/".join(str(p) for p in module.path[len(self.path) :]) or "<root>"

  def run(self, method: str, *args, **kwargs):
    """Calls the wrapped model's ``method`` with its layers quantized by the rules.

    Example:
      >>> import flax.linen as nn
      >>> qm = quantize_model(nn.Sequential([nn.Dense(3), nn.Dense(2)]), QuantConfig())
      >>> x = jnp.ones((1, 4))
      >>> v = qm.init(jax.random.key(0), x)
      >>> qm.apply(v, "__call__", x, method=QuantizedModel.run).shape  # the same as qm.apply(v, x)
      (1, 2)
    """
    matched: dict[str, list[str]] = {}
    rules = self.rules

    def interceptor(next_fun, a, kw, context):
      m = context.module
      forward = _forward_for(m)
      if context.method_name != "__call__" or forward is None:
        return next_fun(*a, **kw)
      path = self.layer_path(m)
      pattern, cfg = rules.match(path)
      if pattern is not None:
        matched.setdefault(pattern, []).append(path)
      if cfg is None:
        return next_fun(*a, **kw)
      if getattr(m, "dot_general", None) is not None or getattr(m, "dot_general_cls", None):
        raise ValueError(f"layer {path}: a custom dot_general cannot be quantized")
      return forward(m, *a, cfg, **kw)

    inner = self.model.clone(parent=self.scope, _deep_clone=True)
    with nn.intercept_methods(interceptor):
      out = getattr(inner, method)(*args, **kwargs)
    if self.is_initializing():
      unmatched = [p for p, _ in rules.patterns if p not in matched]
      if unmatched:
        warnings.warn(
          f"quantize_model: rules {unmatched} matched no nn.Dense / nn.Conv layer", stacklevel=2
        )
    return out


def quantize_model(model: nn.Module, rules: QuantRules | QuantConfig | dict) -> QuantizedModel:
  """Runs an unmodified float model's ``nn.Dense`` / ``nn.Conv`` layers as quantized layers.

  Uses Flax's method interception (``nn.intercept_methods``) around this model's calls only; no
  ``lax`` function is patched. The parameter tree is the float model's, plus quantizer state, so
  float checkpoints load with :func:`from_float`. A rule's regex must match a layer's whole path
  in the variable tree (``"Dense_0"``, ``"block/Conv_1"``; ``re.fullmatch``, see
  :func:`qatjax.rules`); rules that match no layer are reported with a warning at ``init``, and
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
  if not isinstance(model, nn.Module):
    raise ValueError(f"quantize_model expects a Flax Linen module, got {type(model).__name__}")
  return QuantizedModel(_FloatModel(model), rules)


def rules_report(model: QuantizedModel, *args, **kwargs) -> dict[str, list[tuple[str, str]]]:
  """``{pattern: [(layer path, bit widths), ...]}`` for every rule of a :func:`quantize_model`
  model, in rule order; the bit widths are :attr:`QuantConfig.bits_label` (``"W8A8"``) or
  ``"float"`` for a rule that maps to ``None``. A rule that matches no layer has an empty list.

  Args:
    model: the model :func:`quantize_model` returned.
    *args: an example input (traced abstractly: nothing is computed).
    **kwargs: keyword arguments of the model's ``__call__``.

  Example:
    >>> import flax.linen as nn
    >>> qm = quantize_model(
    ...   nn.Sequential([nn.Dense(4), nn.Dense(4), nn.Dense(4), nn.Dense(2)]),
    ...   {"layers_0": QuantConfig(8, 8), "layers_3": None, ".*": QuantConfig(4, 4), "x": None},
    ... )
    >>> for pattern, layers in rules_report(qm, jnp.ones((1, 3))).items():
    ...   print(repr(pattern), layers)
    'layers_0' [('layers_0', 'W8A8')]
    'layers_3' [('layers_3', 'float')]
    '.*' [('layers_1', 'W4A4'), ('layers_2', 'W4A4')]
    'x' []
  """
  matched = {p: [] for p, _ in model.rules.patterns}

  def interceptor(next_fun, a, kw, context):
    if context.method_name == "__call__" and _forward_for(context.module) is not None:
      path = module_path(context.module)
      pattern, cfg = model.rules.match(path)
      entry = (path, "float" if cfg is None else cfg.bits_label)
      if pattern is not None and entry not in matched[pattern]:
        matched[pattern].append(entry)
    return next_fun(*a, **kw)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return matched
