"""``make_train_step`` / ``make_eval_step``: pure, jit-compiled QAT (or PTQ) and eval steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh

from qatjax.training._losses import _count, cross_entropy, loss_and_metrics
from qatjax.training._nnx_steps import (
  check_nnx_options,
  is_nnx_state,
  nnx_eval_step,
  nnx_train_step,
)
from qatjax.training._parallel import batch_sharding, replicated, shard_batch
from qatjax.training._schedule import QATSchedule
from qatjax.training._sharding import ShardingRules, shard_state, sharding_rules, state_shardings
from qatjax.training._state import STATE_COLLECTIONS

MODES = ("qat", "ptq")


class Step:
  """A compiled step, called as ``step(state, batch)``; made by :func:`make_train_step` or
  :func:`make_eval_step`. ``state`` is a :class:`TrainState` (Linen) or an
  ``nnx.ModelAndOptimizer`` (NNX, updated in place; see ``qatjax/training/_nnx_steps.py``).

  Attributes:
    jitted: the ``jax.jit`` function (``jitted.lower(...)``, ``jitted._cache_size()``).
    mesh: the mesh, or ``None``.
    param_sharding: the :class:`ShardingRules` for parameters, or ``None`` (replicated).
    apply_kwargs: keyword arguments passed to ``model.apply``.
    schedule: the :class:`QATSchedule`, or ``None``.
    mode: ``"qat"``, ``"ptq"`` or ``"eval"``.

  Example:
    >>> import optax
    >>> from qatjax import QDense
    >>> from qatjax.training import create_train_state, make_train_step
    >>> step = make_train_step()
    >>> s = create_train_state(QDense(2), optax.sgd(0.1), jax.random.key(0), jnp.ones((1, 3)))
    >>> for _ in range(3):
    ...   s, _ = step(s, (jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)))
    >>> step.mode, step.jitted._cache_size()  # one compilation for three steps
    ('qat', 1)
  """

  def __init__(
    self,
    jitted,
    *,
    mesh,
    apply_kwargs,
    schedule,
    mode,
    max_len,
    nnx_step,
    options,
    extra=(),
    param_sharding=None,
  ):
    self.jitted = jitted
    self.extra = extra  # further arguments of ``jitted`` (a teacher's variables)
    self.mesh = mesh
    self.param_sharding = param_sharding
    self._placed_tree = None  # the tree structure of the last state placed on the mesh
    self.apply_kwargs = apply_kwargs
    self.schedule = schedule
    self.mode = mode
    self._max_len = max_len
    self._nnx_step = nnx_step
    self._options = options

  def __repr__(self):
    return f"Step(mode={self.mode!r}, schedule={self.schedule!r}, mesh={self.mesh!r})"

  def __call__(self, state, batch):
    if not isinstance(batch, (tuple, list)) or not 2 <= len(batch) <= self._max_len:
      allowed = "(inputs, labels)" + (" or (inputs, labels, mask)" if self._max_len == 3 else "")
      raise ValueError(
        f"batch must be a tuple {allowed}, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
      )
    batch = tuple(batch)  # a list and a tuple would be two jit cache entries
    if is_nnx_state(state):
      check_nnx_options(**self._options)
      return self._nnx_step(state, batch)
    if self.mesh is not None:
      state = self.shard_state(state)
      batch = shard_batch(self.mesh, batch)
    return self.jitted(state, batch, self.extra)

  def shard_state(self, state):
    """``state`` placed as this step keeps it (:func:`shard_state`; as is without a mesh).

    A state this step returned (same tree, every leaf on the mesh) is passed through as is.

    Example:
      >>> import optax
      >>> from qatjax import QDense, QuantConfig
      >>> from qatjax.training import create_train_state, data_mesh, make_train_step
      >>> s = create_train_state(QDense(2, config=QuantConfig()), optax.sgd(0.1),
      ...                        jax.random.key(0), jnp.ones((1, 3)))
      >>> placed = make_train_step(mesh=data_mesh()).shard_state(s)
      >>> placed.params["kernel"].sharding.is_fully_replicated     # data parallel: replicated
      True
    """
    if self.mesh is None:
      return state
    leaves, tree = jax.tree_util.tree_flatten(state)
    on_mesh = lambda x: isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == self.mesh
    if self._placed_tree is not None and tree == self._placed_tree and all(map(on_mesh, leaves)):
      return state
    state = shard_state(self.mesh, state, self.param_sharding)
    self._placed_tree = tree
    return state


def _check_common(schedule, apply_kwargs, mesh, param_sharding):
  if schedule is not None and not isinstance(schedule, QATSchedule):
    raise ValueError(f"schedule must be a QATSchedule or None, got {schedule!r}")
  kw = dict(apply_kwargs or {})
  clash = sorted({"mutable", "rngs"} & set(kw))
  if clash:
    raise ValueError(f"apply_kwargs may not set {clash}: the step chooses them")
  if mesh is not None and not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
  if param_sharding is None:
    return kw, None
  if mesh is None:
    raise ValueError("param_sharding needs a mesh (e.g. data_model_mesh(2))")
  rules = sharding_rules(param_sharding)
  rules.check_mesh(mesh)
  return kw, rules


def _jit(fn, mesh, rules: ShardingRules | None, out_state: bool, donate: bool):
  """``fn(state, batch)`` jitted; with a mesh, the batch split over its batch axes and the state
  kept where :func:`state_shardings` puts it (the caller places the input state so; the program
  constrains the state it returns the same way)."""
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(fn, donate_argnums=donate_argnums)
  rep = replicated(mesh)

  def placed(state, batch, extra):
    out = fn(state, batch, extra)
    if not out_state:
      return out
    new_state, metrics = out
    return jax.lax.with_sharding_constraint(
      new_state, state_shardings(mesh, new_state, rules)
    ), metrics

  return jax.jit(
    placed,
    in_shardings=(None, batch_sharding(mesh), rep),  # the state comes placed (Step.shard_state)
    out_shardings=(None, rep) if out_state else rep,
    donate_argnums=donate_argnums,
  )


def make_train_step(
  loss_fn: Callable | None = None,
  schedule: QATSchedule | None = None,
  *,
  mode: str = "qat",
  apply_kwargs: Mapping[str, Any] | None = None,
  rng=None,
  mesh: Mesh | None = None,
  param_sharding: Mapping[str, Any] | ShardingRules | None = None,
  donate: bool = False,
  teacher=None,
) -> Step:
  """A jit-compiled ``train_step(state, (inputs, labels)) -> (new_state, metrics)``.

  One step applies the model with the state's collections that change in training
  (``quant_stats`` and ``batch_stats``, those the model has) mutable, takes the gradient of the
  mean loss with respect to ``params`` (weights and learned scales), applies the optimizer and
  increments ``state.step``. With a ``schedule`` the quantization flags are first set from the
  traced ``state.step`` (no recompilation across phases). It compiles once per batch shape.

  ``mode="ptq"`` is post-training quantization with the same call: the step runs the forward
  pass with only ``quant_stats`` mutable (the observers calibrate) and no gradient step;
  ``params``, ``opt_state`` and ``batch_stats`` are returned bitwise unchanged and ``step`` still
  counts batches (so a schedule can freeze observers after N calibration batches). Switching
  ``mode`` is the one change between a PTQ and a QAT run.

  The same step takes an NNX state, ``nnx.ModelAndOptimizer(model, tx, wrt=nnx.Param)``: it runs
  ``nnx.jit`` over it, the model in training mode (``nnx.view(model, use_running_average=False,
  deterministic=False)``; ``mode="ptq"``: evaluation mode with the observers on), updates it in
  place and returns ``(state, metrics)``. ``apply_kwargs`` are passed to ``model(x, ...)``;
  ``rng``, ``mesh`` and ``donate`` are for Linen states only.

  Args:
    loss_fn: ``loss_fn(outputs, labels)`` returning per-example losses (or their mean); default
      :func:`cross_entropy` (integer labels, or one-hot / soft targets shaped like the outputs).
    schedule: a :class:`QATSchedule`, or ``None`` to keep the flags the state holds.
    mode: ``"qat"`` (train) or ``"ptq"`` (calibrate only).
    apply_kwargs: extra keyword arguments for ``model.apply`` (e.g. ``{"train": True}``).
    rng: a PRNG key; if given, ``rngs={"dropout": fold_in(rng, step)}`` is passed to the model
      (deterministic, so a resumed run draws the same masks).
    mesh: a mesh (:func:`data_mesh`, :func:`data_model_mesh`): the batch is split along axis 0
      over its axes but ``"model"``, the state placed by :func:`shard_state` (replicated unless
      ``param_sharding`` splits parameters), and the program compiled with these shardings
      (multi-host: see the ``qatjax.training`` package notes).
    param_sharding: ``{regex: PartitionSpec}`` rules splitting parameters over the mesh
      (:func:`sharding_rules`); quantizer state follows its weight.
    donate: donate the input state's buffers (saves memory; the old state is then invalid).
    teacher: a :class:`Teacher` (distillation): it runs forward on the same inputs and the loss
      becomes :func:`distillation_loss` against its outputs (``loss_fn``, if given, is the label
      term). Its variables are an argument of the compiled step, not constants in it.

  Returns:
    A :class:`Step`. ``metrics`` holds ``loss`` and, for classification outputs, ``accuracy``.

  Raises:
    ValueError: a bad ``mode`` / ``schedule`` / ``apply_kwargs``, ``param_sharding`` without a
      mesh or naming an axis the mesh lacks; when called (before the step runs), a batch that is
      not ``(inputs, labels)`` or whose size the mesh's batch axes do not divide, a sharding rule
      that matches no parameter or cannot split its shape; ``mode="ptq"`` or a schedule with a
      float model; ``rng`` / ``mesh`` /
      ``donate`` / ``param_sharding`` / ``teacher`` with an NNX state.

  Example:
    >>> import optax
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import create_train_state, make_train_step
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> state = create_train_state(QDense(2, config=QuantConfig()), optax.sgd(0.1),
    ...                            jax.random.key(0), x)
    >>> state, metrics = make_train_step()(state, (x, y))
    >>> int(state.step), sorted(metrics)
    (1, ['accuracy', 'loss'])
  """
  label_loss = loss_fn
  loss_fn = cross_entropy if loss_fn is None else loss_fn
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if teacher is not None and mode != "qat":
    raise ValueError(f"a teacher distils into a trained student: mode must be 'qat', got {mode!r}")
  if teacher is not None and not hasattr(teacher, "loss_fn"):
    raise ValueError(f"teacher must be a qatjax.training.Teacher, got {type(teacher).__name__}")
  kw, rules = _check_common(schedule, apply_kwargs, mesh, param_sharding)

  def step(state, batch, teacher_variables):
    x, y = batch
    variables = state.variables
    if schedule is not None:
      variables = schedule.apply(variables, state.step)
    rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, state.step)}
    if mode == "ptq":
      if "quant_stats" not in variables:
        raise ValueError("mode='ptq' needs a quantized model: the state has no quant_stats")
      out, upd = state.apply_fn(variables, x, mutable=["quant_stats"], rngs=rngs, **kw)
      _, metrics = loss_and_metrics(loss_fn, out, y)
      return state.replace(step=state.step + 1, quant_stats=upd["quant_stats"]), metrics

    mutable = [c for c in STATE_COLLECTIONS if c in variables]
    step_loss = loss_fn
    if teacher is not None:
      step_loss = teacher.loss_fn(teacher.logits(teacher_variables, x), label_loss)

    def objective(params):
      v = {**variables, "params": params}
      if mutable:
        out, upd = state.apply_fn(v, x, mutable=mutable, rngs=rngs, **kw)
      else:
        out, upd = state.apply_fn(v, x, rngs=rngs, **kw), {}
      loss, metrics = loss_and_metrics(step_loss, out, y)
      return loss, (metrics, upd)

    (_, (metrics, upd)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, **{c: upd[c] for c in mutable}), metrics

  return Step(
    _jit(step, mesh, rules, True, donate),
    mesh=mesh,
    param_sharding=rules,
    apply_kwargs=kw,
    schedule=schedule,
    mode=mode,
    max_len=2,
    extra=() if teacher is None else teacher.variables,
    nnx_step=nnx_train_step(loss_and_metrics, loss_fn, schedule, mode, kw),
    options={
      "mesh": mesh,
      "rng": rng,
      "donate": donate,
      "param_sharding": param_sharding,
      "teacher": teacher,
    },
  )


def make_eval_step(
  loss_fn: Callable | None = None,
  schedule: QATSchedule | None = None,
  *,
  apply_kwargs: Mapping[str, Any] | None = None,
  mesh: Mesh | None = None,
  param_sharding: Mapping[str, Any] | ShardingRules | None = None,
) -> Step:
  """A jit-compiled ``eval_step(state, (inputs, labels[, mask])) -> metrics``.

  The model runs with every collection immutable: observers use their stored statistics, as
  the deployed model will. ``mask`` (1 = real example, 0 = padding) lets a last, padded batch
  keep the compiled shape; the metrics are means over the real examples and ``count`` is their
  number (a ``loss_fn`` that returns a scalar mean cannot be masked: its value is used as is).
  With an ``nnx.ModelAndOptimizer`` it runs ``nnx.jit`` with the model in evaluation mode
  (``nnx.view(model, use_running_average=True, deterministic=True)``).

  Args:
    loss_fn: as in :func:`make_train_step`.
    schedule: if given, the flags are set from ``state.step`` as the next train step would.
    apply_kwargs: extra keyword arguments for ``model.apply`` (e.g. ``{"train": False}``).
    mesh: a mesh, as in :func:`make_train_step`.
    param_sharding: parameter sharding rules, as in :func:`make_train_step`.

  Returns:
    A :class:`Step` returning ``{"loss", "accuracy" (classification), "count"}``.

  Example:
    >>> import optax
    >>> from qatjax import QDense
    >>> from qatjax.training import create_train_state, make_eval_step
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> state = create_train_state(QDense(2), optax.sgd(0.1), jax.random.key(0), x)
    >>> m = make_eval_step()(state, (x, y, jnp.array([1, 1, 1, 0])))
    >>> float(m["count"])
    3.0
  """
  loss_fn = cross_entropy if loss_fn is None else loss_fn
  kw, rules = _check_common(schedule, apply_kwargs, mesh, param_sharding)

  def step(state, batch, _):
    x, y = batch[0], batch[1]
    mask = batch[2] if len(batch) == 3 else None
    variables = state.variables
    if schedule is not None:
      variables = schedule.apply(variables, state.step)
    out = state.apply_fn(variables, x, **kw)
    _, metrics = loss_and_metrics(loss_fn, out, y, mask)
    metrics["count"] = _count(y, mask)
    return metrics

  return Step(
    _jit(step, mesh, rules, False, False),
    mesh=mesh,
    param_sharding=rules,
    apply_kwargs=kw,
    schedule=schedule,
    mode="eval",
    max_len=3,
    nnx_step=nnx_eval_step(loss_and_metrics, loss_fn, schedule, kw, _count),
    options={"mesh": mesh, "param_sharding": param_sharding},
  )
