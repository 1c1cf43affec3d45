"""``quantize_model``: an unmodified float Linen model whose layers run as quantized layers."""

from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules
from qatjax.core.rules import rules as make_rules
from qatjax.linen.attention import check_attention_rule, is_quantized_attention
from qatjax.linen.bn_folding import batch_norm_call, cached_conv_bn_pairs, folded_conv_call
from qatjax.linen.context import module_path
from qatjax.linen.flax_layers import find_layer

_INIT_ONLY = ("method", "mutable", "capture_intermediates")


@dataclasses.dataclass(frozen=True)
class _FloatModel:
  """Holds the wrapped model out of Flax's sight: it is bound onto the wrapper's own scope at
  each call, so it adds no name to the variable tree (and its layers' paths are the variable
  paths, whatever the model calls its submodules)."""

  module: nn.Module
  # conv -> BatchNorm pairs found per call signature (see bn_folding.cached_conv_bn_pairs)
  bn_pairs: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)


class QuantizedModel(nn.Module):
  """A float Flax model whose layers run quantized (see :func:`quantize_model`). Its variable
  tree is the float model's plus quantizer state; ``model`` and ``rules`` are what it wraps.

  Example:
    >>> import flax.linen as nn
    >>> qm = quantize_model(nn.Dense(3), QuantConfig(8, 8))
    >>> isinstance(qm, QuantizedModel), type(qm.model).__name__
    (True, 'Dense')
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
    matched: dict[str, set[str]] = {}
    rules = self.rules
    pairs = {
      conv: norm
      for conv, norm in cached_conv_bn_pairs(
        self.wrapped.bn_pairs, self.model, args, kwargs, method
      ).items()
      if (cfg := rules.match(conv)[1]) is not None and cfg.fold_batch_norm
    }
    folded_norms = {norm.path for norm in pairs.values()}

    def interceptor(next_fun, a, kw, context):
      m = context.module
      if isinstance(m, nn.BatchNorm) and context.method_name == "__call__":
        path = self.layer_path(m)
        return batch_norm_call(m, a, kw, path in folded_norms, next_fun)
      layer = find_layer(m)
      handler = None if layer is None else layer.methods.get(context.method_name)
      if handler is None or is_quantized_attention(m):
        return next_fun(*a, **kw)
      path = self.layer_path(m)
      pattern, cfg = rules.match(path)
      check_attention_rule(m, cfg, pattern)
      if pattern is not None:
        matched.setdefault(pattern, set()).add(path)
      if cfg is None:
        return next_fun(*a, **kw)
      if path in pairs and context.method_name == "__call__":
        out = folded_conv_call(m, cfg, a, kw, pairs[path], self.variables)
        if out is not NotImplemented:
          return out
      out = handler(m, cfg, a, kw)
      return next_fun(*a, **kw) if out is NotImplemented else out

    inner = self.model.clone(parent=self.scope, _deep_clone=True)
    with nn.intercept_methods(interceptor):
      out = getattr(inner, method)(*args, **kwargs)
    if self.is_initializing():
      unmatched = [p for p, _ in rules.patterns if p not in matched]
      if unmatched:
        warnings.warn(
          f"quantize_model: rules {unmatched} matched no quantizable layer", stacklevel=2
        )
    return out

  def init(self, rngs, *args, **kwargs):
    """``nn.Module.init``, then a warning naming every matmul, convolution or table lookup that
    stays float inside a layer a rule asked to quantize (see :func:`qatjax.coverage`).

    Example:
      >>> import warnings, flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     w = self.param("w", nn.initializers.ones, (3, 2))
      ...     return x @ w                     # a raw matmul inside the matched root
      >>> with warnings.catch_warnings(record=True) as caught:
      ...   warnings.simplefilter("always")
      ...   _ = quantize_model(Net(), QuantConfig()).init(jax.random.key(0), jnp.ones((1, 3)))
      >>> "these ops stay float in matched layers: <root> dot_general" in str(caught[-1].message)
      True
    """
    variables = super().init(rngs, *args, **kwargs)
    if kwargs.get("method") is None:
      from qatjax.linen.coverage import coverage

      call_kwargs = {k: v for k, v in kwargs.items() if k not in _INIT_ONLY}
      report = coverage(self, *args, variables=variables, **call_kwargs)
      missed = [s for s in report.float_sites if s.requested]
      if missed:
        listed = "; ".join(f"{s.path} {s.op} {s.shapes}: {s.reason}" for s in missed)
        warnings.warn(
          f"quantize_model: these ops stay float in matched layers: {listed}", stacklevel=2
        )
    return variables


def quantize_model(model: nn.Module, rules: QuantRules | QuantConfig | dict) -> QuantizedModel:
  """Runs an unmodified float Flax model's layers as quantized layers.

  Quantized: ``nn.Dense``, ``nn.DenseGeneral`` (also the projections inside attention),
  ``nn.Einsum``, ``nn.Conv``, ``nn.Embed`` (the lookup, and ``attend`` for tied output heads)
  and, when a rule matches an attention module (``nn.MultiHeadDotProductAttention``,
  ``nn.SelfAttention``), its two activation x activation matmuls ``q.k`` and ``p.v``. Subclasses
  of these are handled like them; ``dtype``, ``precision`` and a layer's own ``dot_general`` are
  respected. A ``nn.Conv`` whose output goes straight into a ``nn.BatchNorm`` (every Flax ResNet)
  is quantized with the BatchNorm folded in, in training and in ``convert``, as ``QConvBN`` does
  (opt out with ``QuantConfig(fold_batch_norm=False)``; see :mod:`qatjax.linen.bn_folding`).
  Anything else that multiplies (a raw ``x @ w`` in user code) stays float:
  :func:`qatjax.coverage` lists every matmul with its config or why it is float, and ``init``
  warns about float ops inside layers a rule matched.

  Uses Flax's method interception (``nn.intercept_methods``) around this model's calls only, and
  Flax's own attention einsum hook; no JAX function is patched. The parameter tree is the float
  model's, plus quantizer state, so float checkpoints load with :func:`from_float`. A rule's
  regex must match a layer's whole path in the variable tree (``"Dense_0"``, ``"block/Conv_1"``;
  ``re.fullmatch``, see :func:`qatjax.rules`); rules that match no layer are reported with a
  warning at ``init``, and :func:`rules_report` lists the matches.

  Args:
    model: a Flax Linen module.
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
    if context.method_name == "__call__" and find_layer(context.module) is not None:
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
