"""``coverage``: every matmul, convolution and embedding lookup of a Linen model, and its config
or why it stays float."""

from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax

from qatjax.core.rules import resolve
from qatjax.linen.attention import float_reason as attention_float_reason
from qatjax.linen.context import module_path
from qatjax.linen.flax_layers import find_layer
from qatjax.linen.quantize_model import QuantizedModel
from qatjax.ops.coverage import CoverageReport, scan_jaxpr


@dataclasses.dataclass
class _Module:
  type_name: str
  kind: str | None  # a layer kind qatjax quantizes, else None
  config: object  # the resolved QuantConfig or None
  pattern: str | None  # the rule that matched (quantize_model), else None
  explicit: bool  # a qatjax layer with its own ``config`` field
  attention_reason: str | None = None


def _describe_module(m, rules) -> _Module:
  layer = find_layer(m)
  path = module_path(m)
  if rules is not None and layer is not None:
    pattern, cfg = rules.match(path)
    reason = attention_float_reason(m, cfg) if layer.kind == "attention" else None
    return _Module(type(m).__name__, layer.kind, cfg, pattern, False, reason)
  if hasattr(m, "config") and type(m).__module__.startswith("qatjax."):
    return _Module(type(m).__name__, "qatjax", resolve(m.config, path), None, True)
  pattern, cfg = rules.match(path) if rules is not None else (None, None)
  return _Module(type(m).__name__, None, cfg, pattern, False)


def _reason(op: str, path: str, mod: _Module | None, rules) -> tuple[str, bool]:
  """``(why an op at this module is float, whether quantization was asked for there)``."""
  if mod is None:
    asked = rules is not None and rules.lookup(path) is not None
    return "op in the model's own code (no layer around it)", asked
  if mod.kind is None:
    return (
      f"unsupported op in {mod.type_name} (user code such as x @ w or jnp.einsum, or a layer "
      "qatjax does not quantize)",
      mod.config is not None,
    )
  if mod.config is None:
    if mod.explicit:
      return "config=None", False
    return ("no rule matched" if mod.pattern is None else "its rule maps to None"), False
  if mod.kind == "attention" and mod.attention_reason is not None:
    by_config = "act_bits" in mod.attention_reason or "attention_matmuls" in mod.attention_reason
    return mod.attention_reason, not by_config
  if (op == "gather" or mod.kind == "embed") and mod.config.weight_bits is None:
    return "the config quantizes no weights (act_bits do not apply to a lookup)", False
  return f"{op} of {mod.type_name} outside its quantized op", True


def coverage(model: nn.Module, *args, variables=None, **kwargs) -> CoverageReport:
  """Lists every ``dot_general``, convolution and embedding lookup (``gather``) of a model.

  The model is traced (``jax.make_jaxpr``; nothing is computed) on the example ``args``. Each op
  is reported with its module path, its operand shapes and either the quantization it runs with
  (``"W4g32 A8 dynamic per-token"``; ``"int ..."`` for a converted model's integer kernels) or
  ``"float"`` and why: no rule matched, a rule mapping to ``None``, an op in user code that
  ``quantize_model`` cannot intercept (a raw ``x @ w``), an attention module without activation
  bits, ... Works for :func:`quantize_model` models, models built from ``QDense`` / ``QConv``
  / ..., float models and converted variables.

  Args:
    model: a Flax Linen module.
    *args: example inputs of ``model.__call__``.
    variables: the variables to trace with (default: ``model.init``'s shapes; pass converted
      variables to see the integer model).
    **kwargs: keyword arguments of ``model.__call__``.

  Returns:
    A :class:`~qatjax.ops.coverage.CoverageReport` (``str()`` is a table).

  Example:
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     w = self.param("w", nn.initializers.ones, (4, 2))
    ...     return nn.Dense(4)(x) @ w          # a raw matmul quantize_model cannot see
    >>> report = coverage(quantize_model(Net(), QuantConfig(8, 8)), jnp.ones((1, 3)))
    >>> [(s.path, s.config or s.reason.split(" (")[0]) for s in report.sites]
    [('Dense_0', 'W8 A8'), ('<root>', "op in the model's own code")]
  """
  if not isinstance(model, nn.Module):
    raise ValueError(
      f"qatjax.coverage takes a Flax Linen module, got {type(model).__name__} (for an NNX "
      "model use qatjax.nnx.coverage)"
    )
  rules = model.rules if isinstance(model, QuantizedModel) else None
  if variables is None:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      variables = jax.eval_shape(lambda: nn.Module.init(model, jax.random.key(0), *args, **kwargs))
  modules: dict[str, _Module] = {}

  def interceptor(next_fun, a, kw, context):
    path = module_path(context.module)
    if path != "<root>":
      modules.setdefault(path, _describe_module(context.module, rules))
    return next_fun(*a, **kw)

  def apply(v, *a):
    with nn.intercept_methods(interceptor):
      return model.apply(v, *a, mutable=True, **kwargs)  # BatchNorm in training mode updates

  jaxpr = jax.make_jaxpr(apply)(variables, *args)
  sites = []
  for site in scan_jaxpr(jaxpr, modules):
    if site.config is None:
      reason, requested = _reason(site.op, site.path, modules.get(site.path), rules)
      site = dataclasses.replace(site, reason=reason, requested=requested)
    sites.append(site)
  return CoverageReport(tuple(sites))
