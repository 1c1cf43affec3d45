"""Weight and activation quantizers of the quantized ops, with their state in a ``QuantContext``.

Each quantizer takes a resolved spec (:class:`~qatjax.core.config.WeightQuant` /
:class:`~qatjax.core.config.ActQuant`) and returns the fake-quantized tensor plus what
``convert`` needs to store the integers. State (per layer; names from :mod:`qatjax.ops.registry`):

* observer activations: statistics ``input_min``, ``input_max``, ``input_count`` and
  ``input_count_from_float`` (the count :func:`qatjax.from_float` left; never read here);
* LSQ: parameters ``kernel_scale`` (``embedding_scale``), ``input_scale`` and, affine,
  ``input_zero_point`` (Esser et al. 2020; Bhalgat et al. 2020);
* PACT: parameter ``input_alpha`` (Choi et al. 2018).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qatjax.core import calibration as cal
from qatjax.core.config import ActQuant, WeightQuant
from qatjax.core.fake_quant import (
  broadcast_fake_quant,
  clamp_scale,
  fake_quant,
  lsq_fake_quant,
  lsq_grad_scale,
  pact,
)
from qatjax.core.granularity import num_groups
from qatjax.core.qarray import QArray
from qatjax.core.quantize import broadcast_quantize
from qatjax.core.ranges import scale_zero_point
from qatjax.ops.context import QuantContext
from qatjax.ops.registry import act_leaf, weight_scale

# --- activations ---------------------------------------------------------------------------------


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
  if spec.method == "dynamic":
    return jnp.where(enabled, broadcast_fake_quant(x, *state, qmin, qmax), x)
  if spec.method == "pact":
    return jnp.where(enabled, pact(x, state[0], spec.bits), x)
  if spec.method == "lsq":
    per_example = x.size // x.shape[0] if x.ndim > 1 else x.size
    s, z = state
    y = lsq_fake_quant(x, s, z, qmin, qmax, grad_scale=lsq_grad_scale(per_example, qmax))
    return jnp.where(enabled, y, x)
  s, z, ready = state
  return jnp.where(enabled & ready, fake_quant(x, s, z, qmin, qmax), x)


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


# --- weights -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """Where a weight tensor's scales live, for one :class:`WeightQuant`.

  Attributes:
    shape: the weight's shape.
    contract: the axes the op contracts (a scale is shared along them); the other axes are
      channels, each with its own scale (``"per_channel"``).
    group_axis: the contracted axis along which groups run (``"per_group"``), else ``None``.
    group_size: the group length, else ``None``.
    bshape: the scale's shape broadcast against the weight: 1 along contracted axes, the number
      of groups along ``group_axis``, the channel sizes elsewhere (all 1: per tensor).
    param_shape: the learned (LSQ) scale's shape: ``()`` per tensor, ``(channels,)`` flattened
      per channel, ``bshape`` per group.
  """

  shape: tuple[int, ...]
  contract: tuple[int, ...]
  group_axis: int | None
  group_size: int | None
  bshape: tuple[int, ...]
  param_shape: tuple[int, ...]

  @property
  def numel_per_scale(self) -> int:
    return math.prod(self.shape) // max(math.prod(self.param_shape), 1)


def weight_layout(spec: WeightQuant, shape, contract, group_axis: int | None = None):
  """The :class:`WeightLayout` of a weight of ``shape`` whose ``contract`` axes an op sums over.

  Groups run along ``group_axis`` (default: the last contracted axis).
  """
  shape, contract = tuple(shape), tuple(sorted(a % len(shape) for a in contract))
  if spec.granularity == "per_tensor":
    ones = (1,) * len(shape)
    return WeightLayout(shape, contract, None, None, ones, ())
  if spec.granularity == "per_channel":
    bshape = tuple(1 if a in contract else d for a, d in enumerate(shape))
    return WeightLayout(shape, contract, None, None, bshape, (math.prod(bshape),))
  g_axis = contract[-1] if group_axis is None else group_axis % len(shape)
  g = spec.group_size
  bshape = tuple(
    num_groups(d, g) if a == g_axis else 1 if a in contract else d for a, d in enumerate(shape)
  )
  return WeightLayout(shape, contract, g_axis, g, bshape, bshape)


def _expand(s, layout: WeightLayout):
  """A ``bshape`` scale repeated over its groups (broadcasts against the weight)."""
  if layout.group_axis is None:
    return s
  full = jnp.repeat(s, layout.group_size, axis=layout.group_axis)
  return jax.lax.slice_in_dim(full, 0, layout.shape[layout.group_axis], axis=layout.group_axis)


def _grouped(w, layout: WeightLayout):
  """``(a, axes)``: ``w`` as float32 (per group: NaN-padded to whole groups, the group axis split
  into ``(groups, group_size)``) and the axes of ``a`` whose elements share one scale."""
  a = jnp.asarray(w, jnp.float32)
  if all(d == 1 for d in layout.bshape):
    return a, tuple(range(a.ndim))
  if layout.group_axis is None:
    return a, layout.contract
  ax, g = layout.group_axis, layout.group_size
  n = layout.bshape[ax]
  pad = [(0, 0)] * a.ndim
  pad[ax] = (0, n * g - a.shape[ax])
  a = jnp.pad(a, pad, constant_values=jnp.nan)
  a = a.reshape(a.shape[:ax] + (n, g) + a.shape[ax + 1 :])
  return a, tuple(d + (d > ax) for d in layout.contract if d != ax) + (ax + 1,)


def _abs_reduce(w, layout: WeightLayout, fn):
  """``fn`` (nanmax / nanmean) of ``|w|`` per scale, shaped ``layout.bshape``."""
  a, axes = _grouped(w, layout)
  return fn(jnp.abs(a), axis=axes, keepdims=True).reshape(layout.bshape)


def _minmax_scale(w, spec: WeightQuant, layout: WeightLayout):
  """Symmetric scale per scale from ``max |w|``, shaped ``bshape``."""
  m = _abs_reduce(w, layout, jnp.nanmax)
  return scale_zero_point(-m, m, spec.qmin, spec.qmax, symmetric=True)[0]


def _mse_scale(w, spec: WeightQuant, layout: WeightLayout, no_shrink: bool = False):
  """Symmetric scale per scale minimising the fake-quant MSE of ``w`` among shrunken min/max
  ranges (:func:`~qatjax.core.calibration.batch_mse_range`, with its ``no_shrink``), shaped
  ``bshape``."""
  a, axes = _grouped(w, layout)
  keep = tuple(d for d in range(a.ndim) if d not in axes)
  if len(keep) > 1:  # one column per scale, in bshape order
    a = jnp.transpose(a, axes + keep).reshape(-1, math.prod(a.shape[d] for d in keep))
    keep = (1,)
  axis = keep[0] if keep else None
  lo, hi = cal.batch_mse_range(
    a, spec.qmin, spec.qmax, symmetric=True, axis=axis, no_shrink=no_shrink
  )
  s = scale_zero_point(lo, hi, spec.qmin, spec.qmax, symmetric=True)[0]
  return s.reshape(layout.bshape)


def _observer_scale(w, spec: WeightQuant, layout: WeightLayout):
  """Symmetric scale from the weight's current range (min/max or MSE search), no gradient."""
  w = jax.lax.stop_gradient(w)
  if spec.calibration == "mse":
    return _mse_scale(w, spec, layout)
  return _minmax_scale(w, spec, layout)


def _stored_precision(s, spec: WeightQuant):
  """``s`` rounded to the dtype ``convert`` stores scales in (straight-through: a learned scale
  keeps its full-precision gradient), so the fake-quant grid is the integer model's."""
  if spec.scale_dtype == "float32":
    return s
  s = clamp_scale(s)
  return s + jax.lax.stop_gradient(s.astype(spec.scale_dtype).astype(s.dtype) - s)


def lsq_weight_init(w, spec: WeightQuant, layout: WeightLayout):
  """The initial learned weight step per scale, ``param_shape``d, by ``spec.lsq_init``:
  ``"mse"`` the MSE-optimal step among those that do not shrink the scale's weights (LSQ+,
  Bhalgat et al. 2020; the plain optimum shrinks every layer's output and, compounded over an
  MLP, more than doubles its 2-bit output error), ``"minmax"`` from ``max |w|``, ``"lsq"`` LSQ's
  ``2 * mean(|w|) / sqrt(qmax)`` (Esser et al. 2020)."""
  w = jax.lax.stop_gradient(w)
  if spec.lsq_init == "mse":
    s = _mse_scale(w, spec, layout, no_shrink=True)
  elif spec.lsq_init == "minmax":
    s = _minmax_scale(w, spec, layout)
  else:
    s = clamp_scale(2.0 * _abs_reduce(w, layout, jnp.nanmean) / math.sqrt(spec.qmax))
  return s.reshape(layout.param_shape)


def weight_state(ctx: QuantContext, w, spec: WeightQuant, layout: WeightLayout, name: str):
  """The weight's scale, shaped ``bshape``, before clamping: the learned step (LSQ, a parameter
  of ``ctx``) or the observer's scale from ``w``; rounded to ``spec.scale_dtype``."""
  if spec.method == "lsq":
    s = ctx.param(weight_scale(name), lambda: lsq_weight_init(w, spec, layout))
    if jnp.shape(s) != layout.param_shape:
      raise ValueError(
        f"layer {ctx.path}: {weight_scale(name)} has shape {jnp.shape(s)}, "
        f"expected {layout.param_shape} for {spec.granularity}"
      )
    return _stored_precision(jnp.reshape(s, layout.bshape), spec)
  return _stored_precision(_observer_scale(w, spec, layout), spec)


def apply_weight(w, spec: WeightQuant, s, layout: WeightLayout, enabled):
  """Fake-quantizes ``w`` with :func:`weight_state`'s scale (pure); ``w`` while disabled."""
  if spec.method == "lsq":
    grad_scale = lsq_grad_scale(layout.numel_per_scale, spec.qmax)
    y = broadcast_fake_quant(
      w, _expand(s, layout), None, spec.qmin, spec.qmax, learned=True, grad_scale=grad_scale
    )
  else:
    y = broadcast_fake_quant(w, _expand(s, layout), None, spec.qmin, spec.qmax)
  return jnp.where(enabled, y, w)


def weight_scale_used(spec: WeightQuant, s):
  """The scale the weight's integers use (a learned step is clamped at ``eps``)."""
  return clamp_scale(s) if spec.method == "lsq" else s


def quantize_weight(
  ctx: QuantContext,
  w,
  spec: WeightQuant | None,
  enabled,
  layout: WeightLayout,
  name: str = "kernel",
):
  """Fake-quantizes the weight ``w``; returns ``(y, scale)`` (``scale`` shaped ``bshape``).

  ``y`` is ``w`` itself while the layer is disabled.
  """
  if spec is None:
    return w, None
  s = weight_state(ctx, w, spec, layout, name)
  return apply_weight(w, spec, s, layout, enabled), weight_scale_used(spec, s)


def weight_integers(w, s, spec: WeightQuant, layout: WeightLayout):
  """``(integers, stored scale)`` of ``w`` quantized with scale ``s`` (``bshape``), unpacked, in
  the weight's own order."""
  q = broadcast_quantize(jax.lax.stop_gradient(w), _expand(s, layout), spec.qmin, spec.qmax)
  return q, jax.lax.stop_gradient(s).astype(spec.scale_dtype)


def weight_qarray(w, s, spec: WeightQuant, layout: WeightLayout, perm=None) -> QArray:
  """The integers ``convert`` stores for ``w`` quantized with scale ``s`` (``bshape``)."""
  q, stored_scale = weight_integers(w, s, spec, layout)
  return QArray.create(
    q,
    stored_scale,
    bits=spec.bits,
    axis=layout.group_axis,
    group_size=layout.group_size,
    perm=perm,
  )
