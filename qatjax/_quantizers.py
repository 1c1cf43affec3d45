"""Weight and input quantizers that declare their state on a bound Flax module.

These functions are called from a layer's ``@compact __call__`` with the layer (``module``) as
first argument and create their variables there, so the same code serves ``QDense`` and an
unmodified ``nn.Dense`` intercepted by :func:`qatjax.quantize_model`.

State (per quantized layer):
  * ``quant_stats/enabled``, ``quant_stats/observe``: bool flags (see :func:`set_quant_flags`).
  * observer activations: ``quant_stats/input_min``, ``input_max``, ``input_count``.
  * LSQ: ``params/kernel_scale``, ``params/input_scale``, ``params/input_zero_point`` (affine).
  * PACT: ``params/input_alpha``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qatjax import _calibration as cal
from qatjax._config import QuantConfig
from qatjax._fake_quant import fake_quant, lsq_fake_quant, lsq_grad_scale, pact
from qatjax._granularity import num_groups
from qatjax._qarray import QArray
from qatjax._quantize import quantize
from qatjax._ranges import EPS, scale_zero_point

STATS = "quant_stats"
EXPORT = "quant_export"  # written (when mutable) by layers for qatjax.convert


def module_path(module) -> str:
  return "/".join(str(p) for p in module.path) or "<root>"


def is_converted(module) -> bool:
  """True when the layer's ``kernel`` (or ``embedding``) holds a :class:`QArray`."""
  for name in ("kernel", "embedding"):
    if module.has_variable("params", name):
      return isinstance(module.get_variable("params", name), QArray)
  return False


def flags(module):
  """The layer's ``(enabled, observe)`` flags from ``quant_stats``."""
  enabled = module.variable(STATS, "enabled", lambda: jnp.ones((), jnp.bool_)).value
  observe = module.variable(STATS, "observe", lambda: jnp.ones((), jnp.bool_)).value
  return enabled, observe


def exporting(module) -> bool:
  """True while :func:`qatjax.convert` collects the integer export (``quant_export`` mutable).

  Never during ``init``: ``init`` makes every collection mutable, and the export (int8 kernels,
  kernel sums, input scales) would otherwise land in the initial variables and be recomputed by
  every training step that passes them back as mutable.
  """
  return module.is_mutable_collection(EXPORT) and not module.is_initializing()


def _export(module, name, value):
  if exporting(module):
    module.put_variable(EXPORT, name, jax.tree_util.tree_map(jax.lax.stop_gradient, value))


# --- activations ---------------------------------------------------------------------------------


def _act_calibrator(cfg: QuantConfig) -> cal.Calibrator:
  qmin, qmax = cfg.act_range
  kind = cfg.act_calibration
  if kind == "ema":
    return cal.ema_minmax(cfg.act_momentum)
  if kind == "minmax":
    return cal.minmax()
  if kind == "percentile":
    return cal.percentile(momentum=cfg.act_momentum)
  return cal.mse(qmin, qmax, symmetric=cfg.act_symmetric, momentum=cfg.act_momentum)


def _observer_input(module, x, cfg, observe, prefix):
  qmin, qmax = cfg.act_range
  v_min = module.variable(STATS, f"{prefix}_min", lambda: jnp.zeros((), jnp.float32))
  v_max = module.variable(STATS, f"{prefix}_max", lambda: jnp.zeros((), jnp.float32))
  v_cnt = module.variable(STATS, f"{prefix}_count", lambda: jnp.zeros((), jnp.int32))
  state = cal.RangeState(v_min.value, v_max.value, v_cnt.value)
  if module.is_mutable_collection(STATS) and not module.is_initializing():
    new = _act_calibrator(cfg).update(state, jax.lax.stop_gradient(x))
    state = jax.tree_util.tree_map(lambda n, o: jnp.where(observe, n, o), new, state)
    v_min.value, v_max.value, v_cnt.value = state
  s, z = scale_zero_point(state.min, state.max, qmin, qmax, symmetric=cfg.act_symmetric)
  return s, z, state.count > 0


def _lsq_input_init(x, cfg):
  qmin, qmax = cfg.act_range
  x = jnp.asarray(x, jnp.float32)
  if cfg.act_symmetric:
    s = jnp.maximum(2.0 * jnp.mean(jnp.abs(x)) / math.sqrt(qmax), EPS)
    return s, jnp.zeros((), jnp.float32)
  return scale_zero_point(jnp.min(x), jnp.max(x), qmin, qmax, symmetric=False)


def quantize_input(module, x, cfg: QuantConfig | None, enabled, observe, prefix: str = "input"):
  """Fake-quantizes a layer's input according to ``cfg`` (identity if no activation bits)."""
  if cfg is None or cfg.act_bits is None:
    return x
  qmin, qmax = cfg.act_range
  if cfg.pact:
    alpha = module.param(f"{prefix}_alpha", lambda _: jnp.asarray(cfg.pact_init, jnp.float32))
    y = pact(x, alpha, cfg.act_bits)
    s, z, ready = jnp.maximum(alpha, EPS) / qmax, jnp.zeros((), jnp.float32), jnp.bool_(True)
  elif cfg.method == "lsq":
    init = lambda: _lsq_input_init(x, cfg)  # noqa: E731  (first batch: Esser et al. 2020)
    s = module.param(f"{prefix}_scale", lambda _: init()[0])
    z = None if cfg.act_symmetric else module.param(f"{prefix}_zero_point", lambda _: init()[1])
    per_example = x.size // x.shape[0] if x.ndim > 1 else x.size
    y = lsq_fake_quant(x, s, z, qmin, qmax, grad_scale=lsq_grad_scale(per_example, qmax))
    s = jnp.maximum(s, EPS)
    z = jnp.zeros((), jnp.float32) if z is None else jnp.clip(jnp.round(z), qmin, qmax)
    ready = jnp.bool_(True)
  else:
    s, z, ready = _observer_input(module, x, cfg, observe, prefix)
    y = fake_quant(x, s, z, qmin, qmax)
  _export(module, prefix, {"scale": s, "zero_point": z, "calibrated": ready})
  return jnp.where(enabled & ready, y, x)


# --- weights -------------------------------------------------------------------------------------


def weight_layout(cfg: QuantConfig, shape, in_axis: int, out_axis: int):
  """``(axis, group_size, scale_shape)`` of a kernel's scale for ``cfg.weight_granularity``."""
  if cfg.weight_granularity == "per_tensor":
    return None, None, ()
  if cfg.weight_granularity == "per_channel":
    return out_axis, None, (shape[out_axis],)
  g = cfg.weight_group_size
  scale_shape = [1] * len(shape)
  scale_shape[in_axis] = num_groups(shape[in_axis], g)
  scale_shape[out_axis] = shape[out_axis]
  return in_axis, g, tuple(scale_shape)


def _abs_reduce(w, cfg, in_axis, out_axis, fn):
  """``fn`` (nanmax / nanmean) of ``|w|`` per scale, shaped as the scale."""
  a = jnp.abs(jnp.asarray(w, jnp.float32))
  axis, g, scale_shape = weight_layout(cfg, w.shape, in_axis, out_axis)
  if axis is None:
    return fn(a)
  if g is None:
    return fn(a, axis=tuple(d for d in range(a.ndim) if d != out_axis))
  n = scale_shape[in_axis]
  pad = [(0, 0)] * a.ndim
  pad[in_axis] = (0, n * g - a.shape[in_axis])
  a = jnp.pad(a, pad, constant_values=jnp.nan)
  a = a.reshape(a.shape[:in_axis] + (n, g) + a.shape[in_axis + 1:])
  out = out_axis + (out_axis > in_axis)
  axes = tuple(d for d in range(a.ndim) if d not in (in_axis, out))
  return fn(a, axis=axes, keepdims=True).reshape(scale_shape)


def observer_weight_scale(w, cfg: QuantConfig, in_axis: int, out_axis: int):
  """Symmetric scale from the kernel's current range (min/max or MSE search), no gradient."""
  qmin, qmax = cfg.weight_range
  w = jax.lax.stop_gradient(w)
  if cfg.weight_calibration == "mse" and cfg.weight_granularity != "per_group":
    axis = None if cfg.weight_granularity == "per_tensor" else out_axis
    lo, hi = cal.batch_mse_range(w, qmin, qmax, symmetric=True, axis=axis)
    return scale_zero_point(lo, hi, qmin, qmax, symmetric=True)[0]
  m = _abs_reduce(w, cfg, in_axis, out_axis, jnp.nanmax)
  return scale_zero_point(-m, m, qmin, qmax, symmetric=True)[0]


def lsq_weight_init(w, cfg: QuantConfig, in_axis: int, out_axis: int):
  """LSQ's initial weight step ``2 * mean(|w|) / sqrt(qmax)`` per scale."""
  _, qmax = cfg.weight_range
  return jnp.maximum(2.0 * _abs_reduce(w, cfg, in_axis, out_axis, jnp.nanmean) / math.sqrt(qmax),
                     EPS)


def quantize_weight(module, w, cfg: QuantConfig | None, enabled, *, in_axis: int, out_axis: int,
                    name: str = "kernel"):
  """Fake-quantizes a kernel according to ``cfg`` (identity if no weight bits)."""
  if cfg is None or cfg.weight_bits is None:
    return w
  qmin, qmax = cfg.weight_range
  axis, group, scale_shape = weight_layout(cfg, w.shape, in_axis, out_axis)
  if cfg.method == "lsq":
    s = module.param(f"{name}_scale", lambda _: lsq_weight_init(w, cfg, in_axis, out_axis))
    if jnp.shape(s) != scale_shape:
      raise ValueError(f"layer {module_path(module)}: {name}_scale has shape {jnp.shape(s)}, "
                       f"expected {scale_shape} for {cfg.weight_granularity}")
    per_scale = w.size // max(math.prod(scale_shape), 1)
    y = lsq_fake_quant(w, s, None, qmin, qmax, axis=axis, group_size=group,
                       grad_scale=lsq_grad_scale(per_scale, qmax))
    s = jnp.maximum(s, EPS)
  else:
    s = observer_weight_scale(w, cfg, in_axis, out_axis)
    y = fake_quant(w, s, None, qmin, qmax, axis=axis, group_size=group)
  if exporting(module):
    q = quantize(w, s, None, qmin, qmax, axis=axis, group_size=group)
    bshape = scale_shape if group else [
        w.shape[d] if d == axis else 1 for d in range(w.ndim)]
    _export(module, name, QArray.create(q, jnp.reshape(s, bshape), bits=cfg.weight_bits,
                                        axis=axis if group else None, group_size=group))
  return jnp.where(enabled, y, w)


def converted_input(module, prefix: str = "input"):
  """``(scale, zero_point)`` of a converted layer's input, or ``None`` (weight-only)."""
  if module.has_variable("params", f"{prefix}_scale") and not module.has_variable(
      "params", f"{prefix}_alpha"):
    return (module.get_variable("params", f"{prefix}_scale"),
            module.get_variable("params", f"{prefix}_zero_point"))
  return None
