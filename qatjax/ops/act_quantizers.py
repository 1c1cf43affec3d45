"""Activation quantizers of the quantized ops, with their state in a ``QuantContext``.

Each takes a resolved :class:`~qatjax.core.config.ActQuant` spec. :func:`act_state` reads (and,
for observers, updates) the state; :func:`apply_act` fake-quantizes with it (pure);
:func:`act_params` is what ``convert`` stores. State (per layer and site; names from
:mod:`qatjax.ops.registry`):

* observers: statistics ``input_min``, ``input_max``, ``input_count`` and
  ``input_count_from_float`` (the count :func:`qatjax.from_float` left; never read here);
* LSQ: parameters ``input_scale`` and, affine, ``input_zero_point`` (Esser et al. 2020;
  Bhalgat et al. 2020);
* PACT: parameter ``input_alpha`` (Choi et al. 2018);
* dynamic scales: none (computed from each tensor).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qatjax.core import calibration as cal
from qatjax.core.config import ActQuant
from qatjax.core.fake_quant import (
  broadcast_fake_quant,
  clamp_scale,
  lsq_grad_scale,
  pact,
)
from qatjax.core.ranges import scale_zero_point
from qatjax.ops.context import QuantContext
from qatjax.ops.registry import act_leaf


@dataclasses.dataclass(frozen=True)
class ActParams:
  """The scale and zero point an activation was quantized with, whether they are set (an
  observer that has seen no batch yet is not), its bit width, and whether they are frozen for
  serving (dynamic scales are not: the integer model recomputes them from each tensor)."""

  scale: jax.Array
  zero_point: jax.Array
  ready: jax.Array
  bits: int
  frozen: bool = True


def _observer(ctx: QuantContext, x, spec: ActQuant, observe, site: str):
  zeros = lambda dtype: lambda: jnp.zeros((), dtype)
  v_min = ctx.stat(act_leaf(site, "min"), zeros(jnp.float32))
  v_max = ctx.stat(act_leaf(site, "max"), zeros(jnp.float32))
  v_cnt = ctx.stat(act_leaf(site, "count"), zeros(jnp.int32))
  ctx.stat(act_leaf(site, "count_from_float"), zeros(jnp.int32))
  state = cal.RangeState(v_min.value, v_max.value, v_cnt.value)
  if ctx.observing:
    new = spec.calibrator.update(state, jax.lax.stop_gradient(x))
    state = jax.tree_util.tree_map(lambda n, o: jnp.where(observe, n, o), new, state)
    v_min.value, v_max.value, v_cnt.value = state
  s, z = scale_zero_point(state.min, state.max, spec.qmin, spec.qmax, symmetric=spec.symmetric)
  return s, z, state.count > 0


def _lsq_input_init(x, spec: ActQuant):
  """The first batch's step and offset, by ``spec.lsq_init``: ``"mse"`` the MSE-optimal range
  (LSQ+, Bhalgat et al. 2020), ``"minmax"`` the batch's range, ``"lsq"`` LSQ's rule (Esser et al.
  2020) when symmetric and the batch's range when affine (LSQ+)."""
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  if spec.lsq_init == "lsq" and spec.symmetric:
    return (
      clamp_scale(2.0 * jnp.mean(jnp.abs(x)) / math.sqrt(spec.qmax)),
      jnp.zeros((), jnp.float32),
    )
  if spec.lsq_init == "mse":
    lo, hi = cal.batch_mse_range(x, spec.qmin, spec.qmax, symmetric=spec.symmetric)
  else:
    lo, hi = cal.batch_minmax(x)
  return scale_zero_point(lo, hi, spec.qmin, spec.qmax, symmetric=spec.symmetric)


def dynamic_act_params(x, spec: ActQuant, contract_axes=None):
  """The scale and zero point of a dynamic activation, computed from ``x`` itself.

  Per token: the range of each row, i.e. over the ``contract_axes`` the op sums over (kept as
  size-1 dims, so the result broadcasts against ``x``); per tensor: over all of ``x``. The
  formulas are the observers' (:func:`qatjax.scale_zero_point`); no gradient flows into them.
  """
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  if spec.granularity == "per_token" and contract_axes is not None:
    axes = tuple(a % x.ndim for a in contract_axes)
  else:
    axes = tuple(range(x.ndim))
  lo, hi = jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)
  return scale_zero_point(lo, hi, spec.qmin, spec.qmax, symmetric=spec.symmetric)


def act_state(
  ctx: QuantContext, x, spec: ActQuant, observe, site: str = "input", contract_axes=None
) -> tuple:
  """The arrays an activation quantizer applies to ``x`` (:func:`apply_act`), read from (and,
  for observers, updated in) ``ctx``: dynamic ``(s, z)`` from ``x``; PACT ``(alpha,)``; LSQ
  ``(s, z or None)`` (parameters); observers ``(s, z, ready)``."""
  if spec.method == "dynamic":
    return dynamic_act_params(x, spec, contract_axes)
  if spec.method == "pact":
    return (ctx.param(act_leaf(site, "alpha"), lambda: jnp.asarray(spec.pact_init, jnp.float32)),)
  if spec.method == "lsq":
    init = lambda: _lsq_input_init(x, spec)
    s = ctx.param(act_leaf(site, "scale"), lambda: init()[0])
    z = None if spec.symmetric else ctx.param(act_leaf(site, "zero_point"), lambda: init()[1])
    return s, z
  return _observer(ctx, x, spec, observe, site)


def apply_act(x, spec: ActQuant, state: tuple, enabled):
  """Fake-quantizes ``x`` with the arrays :func:`act_state` gave (pure: no state changes);
  ``x`` itself while the layer is disabled or an observer has no range yet."""
  qmin, qmax = spec.qmin, spec.qmax
  if spec.method == "dynamic":  # x's own range
    return broadcast_fake_quant(x, *state, qmin, qmax, covers_range=True, enabled=enabled)
  if spec.method == "pact":
    return jnp.where(enabled, pact(x, state[0], spec.bits), x)
  if spec.method == "lsq":
    per_example = x.size // x.shape[0] if x.ndim > 1 else x.size
    s, z = state
    grad_scale = lsq_grad_scale(per_example, qmax)
    return broadcast_fake_quant(
      x, s, z, qmin, qmax, learned=True, grad_scale=grad_scale, enabled=enabled
    )
  s, z, ready = state
  return broadcast_fake_quant(x, s, z, qmin, qmax, enabled=enabled & ready)


def act_params(spec: ActQuant, state: tuple) -> ActParams:
  """The scale and zero point :func:`act_state`'s arrays stand for (what ``convert`` stores)."""
  if spec.method == "dynamic":
    return ActParams(*state, jnp.bool_(True), spec.bits, frozen=False)
  if spec.method == "pact":
    zero = jnp.zeros((), jnp.float32)
    return ActParams(clamp_scale(state[0]) / spec.qmax, zero, jnp.bool_(True), spec.bits)
  if spec.method == "lsq":
    s, z = state
    z = jnp.zeros((), jnp.float32) if z is None else jnp.clip(jnp.round(z), spec.qmin, spec.qmax)
    return ActParams(clamp_scale(s), z, jnp.bool_(True), spec.bits)
  return ActParams(*state, spec.bits)


def quantize_act(
  ctx: QuantContext,
  x,
  spec: ActQuant | None,
  enabled,
  observe,
  site: str = "input",
  contract_axes=None,
):
  """Fake-quantizes the activation ``x`` at ``site``; returns ``(y, ActParams or None)``.

  ``y`` is ``x`` itself while the layer is disabled or its observer has no range yet.
  ``contract_axes`` are the axes of ``x`` the op sums over (for per-token dynamic scales).
  """
  if spec is None:
    return x, None
  state = act_state(ctx, x, spec, observe, site, contract_axes)
  return apply_act(x, spec, state, enabled), act_params(spec, state)


def serving_act_params(ctx: QuantContext, x, spec: ActQuant | None, site: str, contract_axes):
  """An activation's ``(scale, zero point)`` in the integer model: computed from ``x`` when
  dynamic, the frozen ones ``convert`` stored otherwise; ``None`` for a weight-only layer."""
  if spec is None:
    return None
  if spec.method == "dynamic":
    return dynamic_act_params(x, spec, contract_axes)
  s = ctx.converted(act_leaf(site, "scale"))
  return None if s is None else (s, ctx.converted(act_leaf(site, "zero_point")))


def serving_dtype(x, dtype=None):
  """The dtype an integer kernel returns: the layer's ``dtype`` if set, else ``x``'s dtype
  promoted with float32 (what the float layer returns with its default float32 parameters).

  Example:
    >>> serving_dtype(jnp.ones(2, jnp.bfloat16)), serving_dtype(jnp.ones(2), jnp.bfloat16)
    (dtype('float32'), dtype(bfloat16))
  """
  return jnp.dtype(jnp.result_type(x.dtype, jnp.float32) if dtype is None else dtype)


def record_act(
  ctx: QuantContext, act: ActParams | None, site: str = "input", calibrated: bool = False
) -> None:
  """Records an activation's frozen scale, zero point and bit width for ``convert`` (and, with
  ``calibrated``, whether they are set: a standalone activation quantizer's exporters need it)."""
  if act is None or not act.frozen or not ctx.recording:
    return
  ctx.record(act_leaf(site, "scale"), act.scale)
  ctx.record(act_leaf(site, "zero_point"), act.zero_point)
  ctx.record(act_leaf(site, "bits"), jnp.int8(act.bits))
  if calibrated:
    ctx.record(act_leaf(site, "calibrated"), act.ready)
