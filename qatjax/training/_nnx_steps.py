"""The NNX forms of the train and eval steps: ``nnx.jit`` over an ``nnx.ModelAndOptimizer``.

:func:`make_train_step` / :func:`make_eval_step` return one :class:`Step` that serves both APIs:
called with a Linen :class:`TrainState` it runs the ``jax.jit`` step, called with an
``nnx.ModelAndOptimizer`` (``nnx.ModelAndOptimizer(model, tx, wrt=nnx.Param)``: quantizer steps
train with the weights, :class:`~qatjax.nnx.QuantStat` statistics do not) it runs these. Each
compiles once per batch shape; the model is updated in place and the step returns
``(state, metrics)`` like the Linen one, so :func:`fit` and :func:`evaluate` take either state.

The train step runs the model as ``nnx.view(model, use_running_average=False,
deterministic=False)`` (observers, BatchNorm and dropout in training mode), the eval step in
evaluation mode, whatever the model's own attributes say; ``mode="ptq"`` runs it in evaluation
mode inside :func:`qatjax.nnx.calibrating` and takes no gradient step. A schedule sets the flags
from the traced ``state.step`` (:func:`qatjax.nnx.set_quant_flags`) before the forward pass.
"""

from __future__ import annotations

from flax import nnx

from qatjax.nnx import QuantModule, calibrating, set_quant_flags

_TRAIN = {"use_running_average": False, "deterministic": False}
_EVAL = {"use_running_average": True, "deterministic": True}


def is_nnx_state(state) -> bool:
  """Whether ``state`` is an NNX train state (an ``nnx.Optimizer`` holding its model)."""
  return isinstance(state, nnx.Optimizer)


def _model(state):
  model = getattr(state, "model", None)
  if not isinstance(model, nnx.Module):
    raise ValueError(
      "an NNX step needs an nnx.ModelAndOptimizer(model, tx, wrt=nnx.Param), got an "
      f"{type(state).__name__} without a model"
    )
  return model


def check_nnx_options(
  *, mesh=None, rng=None, donate=False, param_sharding=None, teacher=None
) -> None:
  """The Linen-only options of a step, refused for an NNX state."""
  options = (
    ("mesh", mesh),
    ("rng", rng),
    ("donate", donate or None),
    ("param_sharding", param_sharding),
    ("teacher", teacher),
  )
  for name, value in options:
    if value is not None:
      raise ValueError(
        f"{name}= is not supported with an NNX state (NNX models draw dropout keys from their "
        "own nnx.Rngs; use a Linen TrainState for sharded, donated or distilled steps)"
      )


def _set_flags(schedule, state):
  if schedule is not None:
    set_quant_flags(_model(state), **schedule.flags(state.step[...]))


def nnx_train_step(loss_and_metrics, loss_fn, schedule, mode, kwargs):
  """``step(state, (x, y)) -> (state, metrics)`` for an ``nnx.ModelAndOptimizer``."""

  @nnx.jit
  def step(state, x, y):
    _set_flags(schedule, state)
    if mode == "ptq":
      if not any(isinstance(m, QuantModule) for _, m in nnx.iter_modules(_model(state))):
        raise ValueError("mode='ptq' needs a quantized model: the NNX model has no quantized layer")
      with calibrating():
        out = nnx.view(_model(state), raise_if_not_found=False, **_EVAL)(x, **kwargs)
      state.step[...] += 1
      return loss_and_metrics(loss_fn, out, y)[1]

    def objective(model):
      return loss_and_metrics(loss_fn, model(x, **kwargs), y)

    view = nnx.view(_model(state), raise_if_not_found=False, **_TRAIN)
    (_, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(view)
    state.update(grads)
    return metrics

  def call(state, batch):
    x, y = batch
    return state, step(state, x, y)

  return call


def nnx_eval_step(loss_and_metrics, loss_fn, schedule, kwargs, count):
  """``step(state, (x, y[, mask])) -> metrics`` for an ``nnx.ModelAndOptimizer``."""

  @nnx.jit
  def step(state, batch):
    _set_flags(schedule, state)
    x, y = batch[0], batch[1]
    mask = batch[2] if len(batch) == 3 else None
    out = nnx.view(_model(state), raise_if_not_found=False, **_EVAL)(x, **kwargs)
    _, metrics = loss_and_metrics(loss_fn, out, y, mask)
    metrics["count"] = count(y, mask)
    return metrics

  return step
