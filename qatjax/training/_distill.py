"""Distillation: the quantized student trains on the float teacher's probabilities."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qatjax.training._losses import cross_entropy


def distillation_loss(
  student_logits,
  teacher_logits,
  labels=None,
  *,
  temperature: float = 1.0,
  alpha: float = 1.0,
  label_loss: Callable | None = None,
):
  """Per-example (per-token) ``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE``.

  ``p = softmax(logits / T)`` over the last axis; the ``T^2`` factor keeps the gradient's scale
  independent of the temperature (Hinton et al. 2015). Gemma 3's QAT used the float checkpoint's
  probabilities as targets in this way. ``alpha=1`` uses the teacher only (``labels`` unused).

  Args:
    student_logits: ``(..., classes)``.
    teacher_logits: same shape; no gradient flows into them.
    labels: what ``label_loss`` takes (integer labels for the default cross-entropy).
    temperature: ``T > 0``.
    alpha: weight of the distillation term, in ``[0, 1]``.
    label_loss: ``(logits, labels) -> per-example loss`` (default: softmax cross-entropy).

  Returns:
    The per-example loss, shaped as ``student_logits`` without its last axis.

  Example:
    >>> from qatjax.training import distillation_loss
    >>> s = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(distillation_loss(s, s)[0])          # identical distributions: KL = 0
    0.0
    >>> # KL(uniform || softmax(s)) = mean(log(1/3) - log_softmax(s)) = 0.7379 at T = 1
    >>> round(float(distillation_loss(s, jnp.zeros((1, 3)))[0]), 4)
    0.7379
  """
  check_distillation(temperature, alpha)
  t = jnp.float32(temperature)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, -1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * t * t
  if alpha == 1.0:
    return kl
  hard = (label_loss or cross_entropy)(student_logits, labels)
  return alpha * kl + (1.0 - alpha) * jnp.asarray(hard, jnp.float32)


def check_distillation(temperature, alpha) -> None:
  """``ValueError`` unless ``temperature > 0`` and ``0 <= alpha <= 1``."""
  if not (isinstance(temperature, (int, float)) and temperature > 0):
    raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
  if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A float teacher for :func:`make_train_step` (``teacher=``): it runs forward only, on the
  same inputs, and the student's loss becomes :func:`distillation_loss`.

  Attributes:
    model: the teacher's Flax module (e.g. the float model the QAT run started from).
    variables: its variables (passed to the compiled step as an argument, not baked in).
    temperature: softmax temperature.
    alpha: weight of the distillation term (``1 - alpha`` on the label loss).
    apply_kwargs: keyword arguments of the teacher's ``apply`` (e.g. ``{"train": False}``).

  Example:
    >>> import flax.linen as nn, optax
    >>> from qatjax.training import Teacher, create_train_state, make_train_step
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> teacher = Teacher(nn.Dense(2), nn.Dense(2).init(jax.random.key(0), x), temperature=2.0)
    >>> state = create_train_state(QDense(2, config=QuantConfig()), optax.sgd(0.1),
    ...                            jax.random.key(1), x)
    >>> state, metrics = make_train_step(teacher=teacher)(state, (x, y))
    >>> sorted(metrics)
    ['accuracy', 'loss']
  """

  model: Any
  variables: Any
  temperature: float = 1.0
  alpha: float = 1.0
  apply_kwargs: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    check_distillation(self.temperature, self.alpha)
    if not hasattr(self.model, "apply"):
      raise ValueError(f"Teacher.model must be a Flax module, got {type(self.model).__name__}")
    if not (hasattr(self.variables, "keys") and "params" in self.variables):
      raise ValueError("Teacher.variables must be the teacher's variables dict (with 'params')")

  def logits(self, variables, x):
    """The teacher's outputs on ``x`` (no gradient).

    Example:
      >>> import flax.linen as nn
      >>> from qatjax.training import Teacher
      >>> x = jnp.ones((2, 3))
      >>> v = nn.Dense(4).init(jax.random.key(0), x)
      >>> Teacher(nn.Dense(4), v).logits(v, x).shape
      (2, 4)
    """
    return jax.lax.stop_gradient(self.model.apply(variables, x, **self.apply_kwargs))

  def loss_fn(self, teacher_out, label_loss: Callable | None):
    """``(student_out, labels) -> per-example distillation loss`` against ``teacher_out``.

    Example:
      >>> import flax.linen as nn
      >>> from qatjax.training import Teacher
      >>> x = jnp.ones((1, 3))
      >>> t = Teacher(nn.Dense(2), nn.Dense(2).init(jax.random.key(0), x))
      >>> logits = jnp.array([[1.0, -1.0]])
      >>> float(t.loss_fn(logits, None)(logits, jnp.array([0]))[0])   # student = teacher: 0
      0.0
    """
    return lambda out, labels: distillation_loss(
      out,
      teacher_out,
      labels,
      temperature=self.temperature,
      alpha=self.alpha,
      label_loss=label_loss,
    )
