"""``NNXContext``: the quantized ops' state in the attributes of an ``nnx.Module``.

The ops name their state (``"kernel_scale"``, ``"input_min"``, ...); on an NNX module each name
is an attribute holding a variable:

* learned quantizer parameters (LSQ / PACT) are ``nnx.Param``: ``nnx.Optimizer(model, tx,
  wrt=nnx.Param)`` trains them with the weights;
* observer statistics and the switches (``enabled``, ``observe``, ``bn_frozen``) are
  :class:`QuantStat`, never trained; ``nnx.state(model, QuantStat)`` selects them;
* what :func:`qatjax.nnx.convert` stored for integer serving is ``nnx.Param`` again (as Linen
  keeps it in ``params``).

When observers update: while the module's ``use_running_average`` is False, which is what
``model.train()`` sets (``model.eval()`` and ``nnx.view(model, use_running_average=True)`` freeze
them), exactly as ``nnx.BatchNorm`` updates its statistics; inside :func:`calibrating` they update
whatever that attribute says.

Quantizer variables whose shape or value depends on data (LSQ steps from the first batch) are
created by one *example pass* (:func:`qatjax.nnx.init_quantizers`, which
:func:`qatjax.nnx.quantize_model` runs) before any ``nnx.jit`` traces the model; a quantized
module called without them raises a ``ValueError`` that says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules, resolve
from qatjax.ops.context import QuantContext


class QuantStat(nnx.Variable):
  """Observer statistics and quantization switches of a quantized NNX module (not trained).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, QuantStat, init_quantizers
    >>> layer = QLinear(3, 2, config=QuantConfig(), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((1, 3)))
    >>> sorted(nnx.to_pure_dict(nnx.state(layer, QuantStat)))
    ['enabled', 'input_count', 'input_count_from_float', 'input_max', 'input_min', 'observe']
  """


@dataclasses.dataclass(frozen=True)
class _Pass:
  """What a forward pass may do beyond the modules' own modes."""

  create: dict | None = None  # create missing variables, logged {(path, name): type}
  observe: bool | None = None  # observers update (None: as use_running_average says)
  record: dict | None = None  # convert's record: {path: {name: value}}


_NO_PASS = _Pass()
_PASS = contextvars.ContextVar("qatjax_nnx_pass", default=None)


def _current() -> _Pass:
  return _PASS.get() or _NO_PASS


@contextlib.contextmanager
def in_pass(**kwargs):
  """Runs the body as a :class:`_Pass` (``create`` / ``observe`` / ``record``)."""
  token = _PASS.set(_Pass(**kwargs))
  try:
    yield
  finally:
    _PASS.reset(token)


def calibrating():
  """A context in which every quantized module's observers update, even in ``eval`` mode.

  Post-training calibration runs the model in evaluation mode (BatchNorm on running statistics,
  no dropout) with the observers on: ``model.eval()`` then a forward pass inside
  ``with calibrating():``. Under ``nnx.jit`` enter it inside the jitted function (it is read
  while tracing). :func:`qatjax.nnx.calibrate` does all of this.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, calibrating, init_quantizers
    >>> layer = QLinear(2, 2, config=QuantConfig(act_calibration="minmax"), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((1, 2)))
    >>> layer.eval()
    >>> with calibrating():
    ...   _ = layer(jnp.full((1, 2), 3.0))
    >>> float(layer.input_max[...])
    3.0
  """
  return in_pass(observe=True)


class _VarRef:
  """A ``Ref`` (``.value``) onto an ``nnx.Variable``."""

  def __init__(self, var: nnx.Variable):
    self._var = var

  @property
  def value(self):
    return self._var.get_value()

  @value.setter
  def value(self, v):
    self._var.set_value(v)


class NNXContext(QuantContext):
  """The :class:`~qatjax.ops.context.QuantContext` of one quantized NNX module.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, init_quantizers
    >>> from qatjax.nnx.context import NNXContext
    >>> layer = QLinear(2, 2, config=QuantConfig(method="lsq"), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((1, 2)))
    >>> ctx = NNXContext(layer)
    >>> ctx.path, ctx.param("input_scale", None) is not None, ctx.observing
    ('<root>', True, True)
  """

  def __init__(self, module):
    self._module = module

  @property
  def path(self) -> str:
    return self._module.quant_path or f"<{type(self._module).__name__}>"

  def _variable(self, name: str, kind: type, init: Callable[[], Any]) -> nnx.Variable:
    var = vars(self._module).get(name)
    if isinstance(var, nnx.Variable):
      return var
    created = _current().create
    if created is None:
      raise ValueError(
        f"layer {self.path}: quantizer variable {name!r} does not exist yet; run "
        "qatjax.nnx.init_quantizers(model, *example_args) (or qatjax.nnx.quantize_model) once, "
        "outside nnx.jit, before calling or jitting the model"
      )
    var = kind(init())
    setattr(self._module, name, var)
    created[(self.path, name)] = kind
    return var

  def param(self, name: str, init: Callable[[], Any]) -> Any:
    return self._variable(name, nnx.Param, init).get_value()

  def stat(self, name: str, init: Callable[[], Any]) -> _VarRef:
    return _VarRef(self._variable(name, QuantStat, init))

  @property
  def observing(self) -> bool:
    observe = _current().observe
    return (not self._module.use_running_average) if observe is None else observe

  @property
  def recording(self) -> bool:
    return _current().record is not None

  def record(self, name: str, value: Any) -> None:
    layer = _current().record.setdefault(self.path, {})
    layer[name] = jax.tree_util.tree_map(jax.lax.stop_gradient, value)

  def converted(self, name: str) -> Any | None:
    var = vars(self._module).get(name)
    return var.get_value() if isinstance(var, nnx.Variable) else None


def custom_promotion(module) -> str | None:
  """What of ``module``'s dtype handling a quantized op cannot reproduce, else ``None``."""
  if module.promote_dtype is not dtypes.promote_dtype:
    return "a custom promote_dtype"
  if getattr(module, "preferred_element_type", None) is not None:
    return "preferred_element_type"
  return None


class QuantModule:
  """What every quantized NNX module adds to its Flax counterpart (a mixin).

  Attributes:
    config: a :class:`QuantConfig`, a :class:`QuantRules` (looked up by the module's path, which
      :func:`qatjax.nnx.init_quantizers` assigns) or ``None`` (the float layer).
    use_running_average: observers (and ``QConvBN``'s BatchNorm) use their stored statistics and
      do not update them; ``model.train()`` sets False, ``model.eval()`` True.
    quant_path: the module's path in its model (``"block/linear"``), for rules and messages.

  Example:
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, QuantModule
    >>> layer = QLinear(3, 2, config=QuantConfig(4, 8), rngs=nnx.Rngs(0))
    >>> isinstance(layer, (QuantModule, nnx.Linear)), layer.quant_config.weight_bits
    (True, 4)
    >>> layer.eval()
    >>> layer.use_running_average
    True
  """

  # No instance layout of its own: a float layer can become its quantized subclass in place.
  __slots__ = ()

  def init_quant(self, config, use_running_average: bool = False) -> None:
    """Sets the quantization attributes (at construction, or when ``quantize_model`` turns a
    float layer into this class)."""
    if config is not None and not isinstance(config, (QuantConfig, QuantRules)):
      raise ValueError(
        f"config of {type(self).__name__} must be a QuantConfig, QuantRules or None, got {config!r}"
      )
    reason = self.unsupported(self)
    if reason is not None:
      raise ValueError(f"{type(self).__name__}: {reason} cannot be quantized")
    self.config = config
    self.use_running_average = use_running_average
    self.quant_path = None

  @classmethod
  def unsupported(cls, module) -> str | None:
    """Why the float layer ``module`` cannot run as this class (a custom ``dot_general``, ...),
    or ``None``."""
    return None

  def set_view(self, use_running_average: bool | None = None):
    """``nnx.view(model, use_running_average=...)`` support (as ``nnx.BatchNorm``)."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  @property
  def quant_config(self) -> QuantConfig | None:
    """The config this module uses (its rule's, for a :class:`QuantRules`)."""
    if isinstance(self.config, QuantRules) and self.quant_path is None:
      raise ValueError(
        f"{type(self).__name__} has QuantRules but no path yet: run "
        "qatjax.nnx.init_quantizers(model, *example_args) on the model that holds it"
      )
    return resolve(self.config, self.quant_path or "<root>")

  def quant_specs(self):
    """``(weight spec, activation spec)`` of :attr:`quant_config` (``None`` each when float)."""
    cfg = self.quant_config
    return (None, None) if cfg is None else (cfg.weight_quant, cfg.act_quant)

  @property
  def quant_context(self) -> NNXContext:
    return NNXContext(self)

  def reject_out_sharding(self, out_sharding) -> None:
    """Quantized layers do not take ``out_sharding`` (``ValueError`` when one is given)."""
    if out_sharding is not None:
      raise ValueError(f"layer {self.quant_context.path}: out_sharding is not supported")
