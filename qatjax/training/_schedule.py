"""``QATSchedule``: QAT phases (float warm-up, observer freeze, BN freeze) from the step counter."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from qatjax.model.flags import set_quant_flags


def _check_step(name, value):
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"QATSchedule.{name} must be a non-negative int or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QATSchedule:
  """Switches quantization phases from the (traced) step counter inside the jitted train step.

  At step ``s`` (``state.step`` before the update) the forward pass runs with

  * ``enabled = s >= float_steps``: float warm-up for the first ``float_steps`` steps, then
    fake quantization;
  * ``observe = s < freeze_observers_step``: observer statistics frozen from that step on;
  * ``bn_frozen = s >= freeze_bn_step``: ``QConvBN`` switches to running statistics and stops
    updating them from that step on.

  ``None`` leaves that switch as the state holds it (by default quantization on, observers on,
  BN not frozen: the event never happens). The flags are ``jnp.where``-style values of the step,
  so one compiled step serves every phase; the flags used by the last step are written back to
  ``state.quant_stats``.

  Attributes:
    float_steps: first quantized step (0: quantize from the start).
    freeze_observers_step: first step with frozen observers.
    freeze_bn_step: first step with frozen BatchNorm statistics.

  Example:
    >>> from qatjax.training import QATSchedule
    >>> sched = QATSchedule(float_steps=2, freeze_observers_step=5)
    >>> {k: bool(v) for k, v in sched.flags(jnp.int32(2)).items() if v is not None}
    {'enabled': True, 'observe': True}
  """

  float_steps: int | None = 0
  freeze_observers_step: int | None = None
  freeze_bn_step: int | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      _check_step(f.name, getattr(self, f.name))

  def flags(self, step) -> dict:
    """``{"enabled", "observe", "bn_frozen"}`` at ``step`` (traced bools, or ``None``).

    Example:
      >>> from qatjax.training import QATSchedule
      >>> bool(QATSchedule(freeze_bn_step=3).flags(3)["bn_frozen"])
      True
    """
    step = jnp.asarray(step)
    return {
      "enabled": None if self.float_steps is None else step >= self.float_steps,
      "observe": (
        None if self.freeze_observers_step is None else step < self.freeze_observers_step
      ),
      "bn_frozen": None if self.freeze_bn_step is None else step >= self.freeze_bn_step,
    }

  def apply(self, variables: dict, step) -> dict:
    """``variables`` with the flags at ``step`` set (:func:`qatjax.set_quant_flags`).

    Raises:
      ValueError: ``variables`` have no ``quant_stats`` (a float model).

    Example:
      >>> from qatjax import QDense, QuantConfig
      >>> from qatjax.training import QATSchedule
      >>> v = QDense(2, config=QuantConfig()).init(jax.random.key(0), jnp.ones((1, 3)))
      >>> bool(QATSchedule(float_steps=10).apply(v, 3)["quant_stats"]["enabled"])
      False
    """
    if "quant_stats" not in variables:
      raise ValueError(
        "QATSchedule needs a quantized model: the variables have no 'quant_stats' collection"
      )
    return set_quant_flags(variables, **self.flags(step))
