"""``quantize_model``: an existing NNX model turned into its quantized form, in place."""

from __future__ import annotations

import warnings

from flax import nnx

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules
from qatjax.core.rules import rules as make_rules
from qatjax.nnx.context import QuantModule
from qatjax.nnx.coverage import report
from qatjax.nnx.layers import LAYERS
from qatjax.nnx.passes import example_pass, module_path
from qatjax.ops.registry import WEIGHTS


def _as_rules(rules) -> QuantRules:
  if isinstance(rules, QuantConfig):
    return make_rules({".*": rules})
  if isinstance(rules, dict):
    return make_rules(rules)
  if not isinstance(rules, QuantRules):
    raise ValueError(f"rules must be a QuantRules, mapping or QuantConfig, got {rules!r}")
  return rules


def _has_weight(module) -> bool:
  return any(isinstance(vars(module).get(w), nnx.Param) for w in WEIGHTS)


def _candidates(model):
  """``[(path, module)]`` of the modules a rule may quantize: the float layers of ``LAYERS``,
  quantized modules, and any other module that holds a weight (to refuse it by name)."""
  return [
    (module_path(p), m)
    for p, m in nnx.iter_modules(model)
    if type(m) in LAYERS or isinstance(m, QuantModule) or _has_weight(m)
  ]


def rules_report(model, rules) -> dict[str, list[str]]:
  """``{pattern: [layer paths]}``: which quantizable layers of an NNX model each rule matches.

  Example:
    >>> from flax import nnx
    >>> from qatjax.nnx import rules_report
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> rules_report(model, {"layers/0": QuantConfig(), "layers/9": None})
    {'layers/0': ['layers/0'], 'layers/9': []}
  """
  rules = _as_rules(rules)
  matched = {p: [] for p, _ in rules.patterns}
  for path, _ in _candidates(model):
    pattern, _ = rules.match(path)
    if pattern is not None:
      matched[pattern].append(path)
  return matched


def _plan(model, rules: QuantRules):
  """``[(path, quantized class or None, config)]``, every layer checked before any is changed."""
  plan = []
  for path, m in _candidates(model):
    _, cfg = rules.match(path)
    if cfg is None:
      continue
    if cfg.attention_matmuls is True and not isinstance(m, nnx.MultiHeadAttention):
      raise ValueError(
        f"layer {path} ({type(m).__name__}) matches a rule whose config has "
        "attention_matmuls=True (an attention-only rule), but it is not an attention module"
      )
    if isinstance(m, QuantModule):
      if m.config is not None:
        raise ValueError(
          f"layer {path}: already quantized ({type(m).__name__} with a config); "
          "quantize_model converts a model once (map this path to None to keep it)"
        )
      plan.append((path, None, cfg))
    elif type(m) in LAYERS:
      reason = LAYERS[type(m)].unsupported(m)
      if reason is not None:
        raise ValueError(f"layer {path}: {type(m).__name__} with {reason} cannot be quantized")
      plan.append((path, LAYERS[type(m)], cfg))
    else:
      names = ", ".join(f"nnx.{t.__name__}" for t in LAYERS)
      raise ValueError(
        f"layer {path}: {type(m).__name__} has no quantized counterpart (quantize_model "
        f"converts {names}); map this path to None in the rules to keep it float"
      )
  return plan


def _apply(plan):
  def prepare(model):
    modules = {module_path(p): m for p, m in nnx.iter_modules(model)}
    for path, qcls, cfg in plan:
      m = modules[path]
      if qcls is None:
        m.config = cfg
      else:
        # The float layer becomes the quantized subclass in place, as
        # torch.nn.utils.parametrize does: same object, same Param objects, no copy.
        object.__setattr__(m, "__class__", qcls)
        m.init_quant(cfg)

  return prepare


def quantize_model(model, rules, *example_args, **example_kwargs):
  """Turns an NNX model into its quantized form in place, and initialises its quantizers.

  Every ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Conv`` / ``Embed`` /
  ``MultiHeadAttention`` whose path a rule maps to a :class:`QuantConfig` becomes the quantized
  subclass (``QLinear``, ..., ``QMultiHeadAttention``: its ``q.k`` and ``p.v``) of itself:
  the same object, holding the same ``Param`` objects (no weight is copied; references to the
  layer stay valid). Quantized modules built with ``config=None`` (float ``QConvBN``, ...) take
  their rule's config. Then one example pass creates the quantizer state (LSQ steps from the
  weights and this batch, observers that have seen it; as Linen's :func:`qatjax.from_float`),
  in evaluation mode: no weight or BatchNorm statistic changes. A matmul, convolution or lookup
  that stays float in a module a rule matched (user code such as ``x @ w``) is named in a
  warning; :func:`qatjax.nnx.coverage` lists every one.

  Paths are the attribute names joined by ``/`` (``"blocks/0/attn/query"``); a rule's regex
  must match a whole path (``re.fullmatch``, see :func:`qatjax.rules`). Rules that match no
  layer are reported with a warning; :func:`rules_report` lists the matches.

  Args:
    model: an ``nnx.Module``.
    rules: a :class:`QuantRules`, a ``{regex: QuantConfig or None}`` mapping, or one
      :class:`QuantConfig` for every layer.
    *example_args: an example input for ``model(...)``.
    **example_kwargs: keyword arguments of ``model(...)``.

  Returns:
    ``model`` itself.

  Raises:
    ValueError: naming the layer path, for a matched layer type with no quantized counterpart
      (a module holding a ``kernel`` / ``embedding`` that is none of the types above), a layer
      already quantized, a custom ``dot_general`` (or mask, ...), or an example that does not
      fit a layer. Everything is checked first (the example pass is traced on a copy): on an
      error nothing is changed.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, quantize_model
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> kernel = model.layers[0].kernel
    >>> _ = quantize_model(model, {"layers/0": QuantConfig(8, 8)}, jnp.ones((2, 4)))
    >>> type(model.layers[0]).__name__, model.layers[0].kernel is kernel
    ('QLinear', True)
    >>> type(model.layers[2]).__name__
    'Linear'
  """
  rules = _as_rules(rules)
  if not isinstance(model, nnx.Module):
    raise ValueError(f"quantize_model expects an nnx.Module, got {type(model).__name__}")
  plan = _plan(model, rules)
  unmatched = [p for p, found in rules_report(model, rules).items() if not found]
  example_pass(model, example_args, example_kwargs, prepare=_apply(plan), from_float=True)
  if unmatched:
    warnings.warn(f"quantize_model: rules {unmatched} matched no quantizable layer", stacklevel=2)
  missed = [
    s for s in report(model, example_args, example_kwargs, rules).float_sites if s.requested
  ]
  if missed:
    listed = "; ".join(f"{s.path} {s.op} {s.shapes}: {s.reason}" for s in missed)
    warnings.warn(f"quantize_model: these ops stay float in matched layers: {listed}", stacklevel=2)
  return model
