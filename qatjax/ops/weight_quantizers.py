"""Weight quantizers of the quantized ops, with their state in a ``QuantContext``.

Each takes a resolved :class:`~qatjax.core.config.WeightQuant` spec and a
:class:`WeightLayout` (per tensor, per channel or per group). :func:`weight_state` gives the
scale (an observer's from the weight, or the learned LSQ step, parameter ``kernel_scale`` /
``embedding_scale``; Esser et al. 2020); :func:`apply_weight` fake-quantizes with it (pure);
:func:`weight_qarray` is the integers ``convert`` stores.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qatjax.core import calibration as cal
from qatjax.core.config import WeightQuant
from qatjax.core.fake_quant import broadcast_fake_quant, clamp_scale, lsq_grad_scale
from qatjax.core.granularity import num_groups
from qatjax.core.qarray import QArray
from qatjax.core.quantize import broadcast_quantize
from qatjax.core.ranges import scale_zero_point
from qatjax.ops.context import QuantContext
from qatjax.ops.registry import weight_scale


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
  """Symmetric scale per scale from ``max |w|`` (NaNs ignored), shaped ``bshape``."""
  m = cal.nan_ignoring(
    lambda: _abs_reduce(w, layout, jnp.max), lambda: _abs_reduce(w, layout, jnp.nanmax)
  )
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
  scale = _expand(s, layout)
  if spec.method == "lsq":
    grad_scale = lsq_grad_scale(layout.numel_per_scale, spec.qmax)
    return broadcast_fake_quant(
      w, scale, None, spec.qmin, spec.qmax, learned=True, grad_scale=grad_scale, enabled=enabled
    )
  covers = _covers_range(spec)
  return broadcast_fake_quant(
    w, scale, None, spec.qmin, spec.qmax, covers_range=covers, enabled=enabled
  )


def _covers_range(spec: WeightQuant) -> bool:
  """Whether the observer's scale clips no weight: ``max |w| / qmax`` of the weights it
  quantizes, in float32 (``w / s`` is then at most ``qmax`` up to float rounding and rounds to at
  most ``qmax``). The STE's in-range mask is all true (for finite weights) and is skipped."""
  return spec.calibration == "minmax" and spec.scale_dtype == "float32" and spec.qmin == -spec.qmax


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
