"""``LinenContext``: the quantized ops' state in the variables of a bound Flax Linen module.

Learned quantizer parameters live in ``params`` (trained with the weights), observer statistics
and switches in ``quant_stats`` (they move only when that collection is mutable and the module is
not initializing), and what :func:`qatjax.convert` collects in ``quant_record`` (mutable only
during ``convert``). Variables are read and written through the module's scope, so the same
quantizer state serves several methods of one module (``nn.Embed``'s lookup and ``attend``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax.core import meta

from qatjax.core.qarray import QArray
from qatjax.ops.context import QuantContext
from qatjax.ops.registry import RECORD, STATS


def module_path(module) -> str:
  """``"block/Dense_0"`` for a bound module (``"<root>"`` for the top module)."""
  return "/".join(str(p) for p in module.path) or "<root>"


class _Var:
  """A ``Ref`` onto one variable of a scope."""

  def __init__(self, scope, col: str, name: str):
    self._scope, self._col, self._name = scope, col, name

  @property
  def value(self):
    return self._scope.get_variable(self._col, self._name)

  @value.setter
  def value(self, v):
    self._scope.put_variable(self._col, self._name, v)


class LinenContext(QuantContext):
  """The :class:`~qatjax.ops.context.QuantContext` of one bound Linen module.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from qatjax.linen.context import LinenContext
    >>> class Scaled(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return x * LinenContext(self).param("input_scale", lambda: jnp.float32(2.0))
    >>> Scaled().init(jax.random.key(0), jnp.ones(2))["params"]["input_scale"]
    Array(2., dtype=float32)
  """

  def __init__(self, module):
    self._module = module

  @property
  def path(self) -> str:
    return module_path(self._module)

  def _missing(self, col: str, name: str):
    return ValueError(
      f"layer {self.path}: variable {col}/{name} is missing and {col} is not "
      "mutable; apply the model with the variables from init / from_float"
    )

  def param(self, name: str, init: Callable[[], Any]) -> Any:
    scope = self._module.scope
    if scope.has_variable("params", name):
      return meta.unbox(scope.get_variable("params", name))
    if not scope.is_mutable_collection("params"):
      raise self._missing("params", name)
    value = init()
    scope.put_variable("params", name, value)
    return value

  def stat(self, name: str, init: Callable[[], Any]) -> _Var:
    scope = self._module.scope
    if not scope.has_variable(STATS, name):
      if not scope.is_mutable_collection(STATS):
        raise self._missing(STATS, name)
      scope.put_variable(STATS, name, init())
    return _Var(scope, STATS, name)

  @property
  def observing(self) -> bool:
    m = self._module
    return m.is_mutable_collection(STATS) and not m.is_initializing()

  @property
  def recording(self) -> bool:
    # Never during init: init makes every collection mutable, and the record would otherwise
    # land in the initial variables.
    m = self._module
    return m.is_mutable_collection(RECORD) and not m.is_initializing()

  def record(self, name: str, value: Any) -> None:
    self._module.scope.put_variable(
      RECORD, name, jax.tree_util.tree_map(jax.lax.stop_gradient, value)
    )

  def converted(self, name: str) -> Any | None:
    scope = self._module.scope
    return scope.get_variable("params", name) if scope.has_variable("params", name) else None


def weight_param(module, name: str, init, shape, dtype, *, check: Callable | None = None):
  """The layer's weight ``name``: a converted :class:`QArray` if ``convert`` stored one, else
  ``module.param(name, init, shape, dtype)``.

  ``check(stored_shape)`` runs first on a stored weight, so that a mismatching input gets an
  error that names the layer (rather than Flax's shape error).
  """
  scope = module.scope
  if scope.has_variable("params", name):
    stored = meta.unbox(scope.get_variable("params", name))
    if check is not None:
      check(tuple(stored.shape))
    if isinstance(stored, QArray):
      return stored
  return module.param(name, init, shape, dtype)
