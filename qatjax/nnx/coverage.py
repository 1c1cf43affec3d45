"""``coverage`` for NNX: every matmul, convolution and embedding lookup of an NNX model, and its
config or why it stays float (the report Linen's :func:`qatjax.coverage` gives)."""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from qatjax.nnx.attention import QMultiHeadAttention, float_reason
from qatjax.nnx.context import QuantModule
from qatjax.nnx.layers import LAYERS
from qatjax.nnx.passes import module_path
from qatjax.ops.coverage import CoverageReport, scan_jaxpr

_TOKEN = "qatjax_nnx_module_"
_METHODS = ("__call__", "attend")


@functools.cache
def _scoped_class(cls):
  """A subclass of ``cls`` whose calls run in a named scope that identifies the instance (NNX
  modules, unlike Linen's, name no scope of their own)."""

  def scoped(name):
    method = getattr(cls, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
      with jax.named_scope(_TOKEN + str(self._qatjax_coverage_id)):
        return method(self, *args, **kwargs)

    return call

  namespace = {name: scoped(name) for name in _METHODS if callable(getattr(cls, name, None))}
  namespace["__slots__"] = ()
  return type(cls)(cls.__name__, (cls,), namespace)


def _reason(m, cls, asked: bool) -> tuple[str, bool]:
  """``(why an op of module m (of class cls) is float, whether quantization was asked for)``;
  ``asked``: a rule maps the module's path to a config."""
  if m is None:
    return "op in the model's own code (no layer around it)", asked
  name = cls.__name__
  if isinstance(m, QuantModule):
    cfg = m.quant_config
    if cfg is None:
      return "config=None", False
    if isinstance(m, QMultiHeadAttention) and float_reason(cfg) is not None:
      return float_reason(cfg), False
    return f"op of {name} outside its quantized op", True
  if cls in LAYERS:
    return f"a float nnx.{name} (no rule quantized it)", False
  if isinstance(m, nnx.MultiHeadAttention):
    return f"{name}: only nnx.MultiHeadAttention itself is quantized, not a subclass", False
  return (
    f"unsupported op in {name} (user code such as x @ w or jnp.einsum, or a layer qatjax does "
    "not quantize)",
    asked,
  )


def coverage(model, *args, **kwargs) -> CoverageReport:
  """Lists every ``dot_general``, convolution and embedding lookup (``gather``) of an NNX model.

  The model is traced (``jax.make_jaxpr``; nothing is computed, ``model`` is not changed) on the
  example ``args``. Each op is reported with its module path (``"blocks/0/attn/query"``), its
  operand shapes and either the quantization it runs with (``"W8 A8"``; ``"int ..."`` after
  :func:`qatjax.nnx.convert`) or ``"float"`` and why: a float ``nnx.Linear`` no rule
  quantized, ``config=None``, a weight-only config on attention's activation x activation
  matmuls, an op in user code (a raw ``x @ w``). The report is Linen's
  (:class:`~qatjax.ops.coverage.CoverageReport`, ``str()`` is a table).

  Args:
    model: an ``nnx.Module`` (quantized modules must have their quantizer state, as after
      :func:`qatjax.nnx.quantize_model` or :func:`qatjax.nnx.init_quantizers`).
    *args: example inputs of ``model(...)``.
    **kwargs: keyword arguments of ``model(...)``.

  Returns:
    A :class:`~qatjax.ops.coverage.CoverageReport`.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import coverage, quantize_model
    >>> class Net(nnx.Module):
    ...   def __init__(self):
    ...     self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    ...     self.w = nnx.Param(jnp.ones((4, 2)))
    ...   def __call__(self, x):
    ...     return self.dense(x) @ self.w[...]      # a raw matmul quantize_model cannot see
    >>> model = quantize_model(Net(), {"dense": QuantConfig(8, 8)}, jnp.ones((1, 3)))
    >>> report = coverage(model, jnp.ones((1, 3)))
    >>> [(s.path, s.config or s.reason.split(" (")[0]) for s in report.sites]
    [('dense', 'W8 A8'), ('<root>', "op in the model's own code")]
  """
  return report(model, args, kwargs)


def report(model, args, kwargs, rules=None) -> CoverageReport:
  """:func:`coverage`, with the ``rules`` ``quantize_model`` used: a float op in a module whose
  path a rule maps to a config is marked ``requested``."""
  if not isinstance(model, nnx.Module):
    raise ValueError(f"qatjax.nnx.coverage expects an nnx.Module, got {type(model).__name__}")
  graphdef, state = nnx.split(model)
  modules: dict[int, tuple[str, object, type]] = {}

  def trace(state, *args):
    copy = nnx.merge(graphdef, state)
    for i, (path, m) in enumerate(nnx.iter_modules(copy)):
      modules[i] = (module_path(path), m, type(m))
      object.__setattr__(m, "_qatjax_coverage_id", i)
      object.__setattr__(m, "__class__", _scoped_class(type(m)))
    return copy(*args, **kwargs)

  jaxpr = jax.make_jaxpr(trace)(state, *args)

  def resolve(names):
    ids = [int(n[len(_TOKEN) :]) for n in names if n.startswith(_TOKEN)]
    return modules[ids[-1]][0] if ids else "<root>"

  by_path = {path: (m, cls) for path, m, cls in modules.values() if path != "<root>"}
  sites = []
  for site in scan_jaxpr(jaxpr, (), resolve=resolve):
    if site.config is None:
      asked = rules is not None and rules.lookup(site.path) is not None
      reason, requested = _reason(*by_path.get(site.path, (None, None)), asked)
      site = dataclasses.replace(site, reason=reason, requested=requested)
    sites.append(site)
  return CoverageReport(tuple(sites))
