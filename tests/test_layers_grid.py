"""With quantization enabled, every quantized kernel and input lies on its grid.

Recomputed by hand in numpy from the layer's state (observer: kernel range and ``quant_stats``;
LSQ: the learned scales in ``params``):
  * the exported kernel (``QArray``, what :func:`qatjax.convert` stores) holds the integers
    ``clip(round(w / s), qmin, qmax)`` and dequantizes to the fake-quantized kernel;
  * the layer's eval output equals the *Flax* layer applied to the hand-fake-quantized input with
    the hand-fake-quantized kernel.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_layers_helpers import cheap_init
from test_layers_helpers import rand as _rand

from qatjax import EPS, QConv, QConvBN, QDense, QDenseGeneral, QEmbed, QuantConfig

CONFIGS = {
  "obs_w8a8_channel": QuantConfig(),
  "obs_w4a8_tensor": QuantConfig(4, 8, weight_granularity="per_tensor"),
  "obs_w4a4_group4_symmetric": QuantConfig(
    4, 4, weight_granularity="per_group", weight_group_size=4, act_symmetric=True
  ),
  "lsq_w8a8_channel": QuantConfig(8, 8, method="lsq"),
  "lsq_w4a4_group4": QuantConfig(
    4, 4, method="lsq", weight_granularity="per_group", weight_group_size=4
  ),
  "lsq_w3a5_tensor_symmetric": QuantConfig(
    3, 5, method="lsq", weight_granularity="per_tensor", act_symmetric=True
  ),
}


def _bias_init(key, shape, dtype=jnp.float32):
  return jnp.linspace(-0.3, 0.3, math.prod(shape), dtype=dtype).reshape(shape)


INIT = dict(kernel_init=cheap_init, bias_init=_bias_init)


# name -> (Q ctor, flax ctor, input shape, (in_axis, out_axis) of the 2-D/N-D kernel view).
LAYERS = {
  "dense": (lambda c: QDense(5, config=c, **INIT), lambda: nn.Dense(5), (4, 7), "dense"),
  "dense_general": (
    lambda c: QDenseGeneral((2, 3), config=c, **INIT),
    lambda: nn.DenseGeneral((2, 3)),
    (3, 2, 9),
    "dense_general",
  ),
  "conv2d": (
    lambda c: QConv(4, (3, 3), strides=(2, 1), config=c, **INIT),
    lambda: nn.Conv(4, (3, 3), strides=(2, 1)),
    (2, 5, 4, 6),
    "conv",
  ),
  "embed": (
    lambda c: QEmbed(9, 6, config=c, embedding_init=cheap_init),
    lambda: nn.Embed(9, 6),
    (3, 4),
    "embed",
  ),
}


def np_fake_quant(x, s, z, qmin, qmax):
  """``(fake-quantized x, its integers)`` with the library's float32 formula."""
  x = np.asarray(x, np.float32)
  s = np.asarray(s, np.float32)
  z = np.asarray(z, np.float32)
  q = np.clip(np.round(x * (np.float32(1.0) / s)) + z, qmin, qmax)
  return ((q - z) * s).astype(np.float32), q


def np_reduce_abs_max(w, cfg, in_axis, out_axis):
  """``max |w|`` per scale, broadcast to ``w``'s shape (groups repeated)."""
  a = np.abs(np.asarray(w, np.float32))
  if cfg.weight_granularity == "per_tensor":
    return np.full_like(a, a.max())
  if cfg.weight_granularity == "per_channel":
    axes = tuple(d for d in range(a.ndim) if d != out_axis)
    return np.broadcast_to(a.max(axis=axes, keepdims=True), a.shape)
  g, out = cfg.weight_group_size, np.empty_like(a)
  other = tuple(d for d in range(a.ndim) if d not in (in_axis, out_axis))
  for start in range(0, a.shape[in_axis], g):
    idx = [slice(None)] * a.ndim
    idx[in_axis] = slice(start, start + g)
    block = a[tuple(idx)]
    out[tuple(idx)] = block.max(axis=other + (in_axis,), keepdims=True)
  return out


def np_expand_lsq_scale(s, w_shape, cfg, in_axis, out_axis):
  s = np.maximum(np.asarray(s, np.float32), EPS)
  if cfg.weight_granularity == "per_tensor":
    return np.full(w_shape, s, np.float32)
  if cfg.weight_granularity == "per_channel":
    shape = [1] * len(w_shape)
    shape[out_axis] = -1
    return np.broadcast_to(s.reshape(shape), w_shape)
  s = np.repeat(s, cfg.weight_group_size, axis=in_axis)
  s = np.take(s, np.arange(w_shape[in_axis]), axis=in_axis)
  return np.broadcast_to(s, w_shape)


def np_weight_fq(w, cfg, in_axis, out_axis, lsq_scale=None):
  qmin, qmax = cfg.weight_range
  if cfg.method == "lsq":
    s = np_expand_lsq_scale(lsq_scale, w.shape, cfg, in_axis, out_axis)
  else:
    m = np_reduce_abs_max(w, cfg, in_axis, out_axis)
    s = np.maximum(m / np.float32((qmax - qmin) / 2), np.float32(EPS))
  return np_fake_quant(w, s, 0.0, qmin, qmax)


def np_input_qparams(cfg, params, stats):
  """``(scale, zero point)`` of the input, from the observer statistics or LSQ parameters."""
  qmin, qmax = cfg.act_range
  if cfg.method == "lsq":
    s = max(np.float32(params["input_scale"]), np.float32(EPS))
    z = 0.0 if cfg.act_symmetric else np.clip(np.round(params["input_zero_point"]), qmin, qmax)
    return np.float32(s), np.float32(z)
  lo = min(np.float32(stats["input_min"]), np.float32(0))
  hi = max(np.float32(stats["input_max"]), np.float32(0))
  if cfg.act_symmetric:
    return np.maximum(max(-lo, hi) / np.float32((qmax - qmin) / 2), np.float32(EPS)), 0.0
  s = np.maximum((hi - lo) / np.float32(qmax - qmin), np.float32(EPS))
  return np.float32(s), np.clip(qmin - np.round(lo / s), qmin, qmax)


def _run(layer, config):
  """Init, one calibration batch, then eval on another batch; all jitted in one function."""
  make_q, _, shape, _ = LAYERS[layer]
  q, cfg = make_q(CONFIGS[config]), CONFIGS[config]
  if layer == "embed":
    xs = [jnp.asarray(np.random.default_rng(i).integers(0, 9, shape), jnp.int32) for i in (0, 1)]
  else:  # the eval batch is wider than the calibration batch: some inputs clip
    xs = [_rand(shape, 0), _rand(shape, 1, 1.5)]

  @jax.jit
  def go(x_cal, x):
    v = q.init(jax.random.key(0), x_cal)
    _, upd = q.apply(v, x_cal, mutable=["quant_stats"])
    v = {**v, **upd}
    y, exported = q.apply(v, x, mutable=["quant_record"])
    ex = exported["quant_record"]
    qa = ex["embedding" if layer == "embed" else "kernel"]
    return v, y, ex, (qa.unpack(), qa.dequantize())

  return (q, cfg, xs[1], *go(*xs))


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_kernel_and_input_on_grid(layer, config):
  _, cfg, x, v, y, exported, (ints, deq) = _run(layer, config)
  _, make_flax, _, kind = LAYERS[layer]
  params = v["params"]
  wname = "embedding" if kind == "embed" else "kernel"
  w = np.asarray(params[wname], np.float32)
  # The quantizer's view of the kernel: DenseGeneral flattens to (in, out); Embed rows are the
  # output channels; conv kernels are (*spatial, in, out).
  if kind == "dense_general":
    w2 = w.reshape(-1, math.prod(w.shape[-2:]))
    in_axis, out_axis = 0, 1
  elif kind == "embed":
    w2, in_axis, out_axis = w, 1, 0
  else:
    w2, in_axis, out_axis = w, w.ndim - 2, w.ndim - 1
  lsq_scale = params.get(f"{wname}_scale")
  if kind == "dense_general" and lsq_scale is not None and lsq_scale.ndim == w.ndim:
    lsq_scale = lsq_scale.reshape(lsq_scale.shape[0], -1)  # per group: (groups, *features)
  w_fq, w_int = np_weight_fq(w2, cfg, in_axis, out_axis, lsq_scale)
  qmin, qmax = cfg.weight_range

  # The exported integer kernel: in range, the hand-computed integers, dequantizes exactly.
  qa = exported[wname]
  assert qa.bits == cfg.weight_bits
  assert qa.values.dtype == (jnp.uint8 if cfg.weight_bits <= 4 else jnp.int8)
  ints = np.asarray(ints)
  assert ints.shape == w.shape  # N-D kernels stay N-D (a DenseGeneral's (in, heads, dim) too)
  ints, deq = ints.reshape(w2.shape), np.asarray(deq).reshape(w2.shape)
  assert ints.min() >= qmin and ints.max() <= qmax
  if cfg.method == "observer":  # min/max scales: every scale's largest |w| maps to qmax
    assert np.abs(ints).max() == qmax
  assert len(np.unique(ints)) > 4
  np.testing.assert_array_equal(ints, w_int.astype(np.int8))
  # Scales are recomputed in numpy: equal up to float32 rounding of the division (1 ulp).
  np.testing.assert_allclose(np.asarray(deq), w_fq, rtol=3e-7)

  # The eval output: the Flax layer on the hand-quantized input with the hand-quantized kernel.
  fparams = {k: params[k] for k in ("bias",) if k in params}
  fparams[wname] = jnp.asarray(w_fq.reshape(w.shape))
  if kind == "embed":
    x_fq = x
  else:
    s, z = np_input_qparams(cfg, params, v.get("quant_stats", {}))
    aqmin, aqmax = cfg.act_range
    x_fq, x_int = np_fake_quant(x, s, z, aqmin, aqmax)
    if cfg.method == "observer":  # the eval batch is wider than the calibrated range: clips
      assert x_int.min() == aqmin or x_int.max() == aqmax
    np.testing.assert_allclose(exported["input_scale"], s, rtol=3e-7)
    np.testing.assert_array_equal(exported["input_zero_point"], z)
  want = make_flax().apply({"params": fparams}, jnp.asarray(x_fq))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
  # Not trivially equal to the float layer.
  fl = make_flax().apply({"params": {**fparams, wname: params[wname]}}, x)
  assert np.abs(np.asarray(fl) - np.asarray(want)).max() > 1e-4


@pytest.mark.parametrize("config", ["obs_w8a8_channel", "lsq_w4a4_group4"])
def test_conv_bn_folded_kernel_on_grid(config):
  cfg = CONFIGS[config]
  layer = QConvBN(4, (3, 3), config=cfg, padding="VALID", kernel_init=cheap_init)
  x_cal, x = _rand((2, 6, 6, 8), 0), _rand((2, 6, 6, 8), 1, 1.5)
  rng = np.random.default_rng(3)
  gamma = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
  beta = jnp.asarray(rng.normal(size=4), jnp.float32)
  mean = jnp.asarray(rng.normal(size=4), jnp.float32)
  var = jnp.asarray(rng.uniform(0.5, 3.0, 4), jnp.float32)

  @jax.jit
  def go(x_cal, x):
    v = layer.init(jax.random.key(0), x_cal, use_running_average=True)
    v = {
      **v,
      "params": {**v["params"], "bn_scale": gamma, "bn_bias": beta},
      "batch_stats": {"mean": mean, "var": var},
    }
    _, upd = layer.apply(v, x_cal, use_running_average=True, mutable=["quant_stats"])
    v = {**v, **upd}
    y, ex = layer.apply(v, x, use_running_average=True, mutable=["quant_record"])
    ex = ex["quant_record"]
    return v, y, ex, ex["kernel"].unpack(), ex["kernel"].dequantize()

  v, y, ex, ints, deq = go(x_cal, x)
  f = np.asarray(gamma) / np.sqrt(np.asarray(var) + np.float32(1e-5))
  w = np.asarray(v["params"]["kernel"]) * f  # BN folded into the kernel before quantization
  w_fq, w_int = np_weight_fq(w, cfg, 2, 3, v["params"].get("kernel_scale"))
  np.testing.assert_array_equal(np.asarray(ints), w_int.astype(np.int8))
  np.testing.assert_allclose(np.asarray(deq), w_fq, rtol=1e-6)
  s, z = np_input_qparams(cfg, v["params"], v.get("quant_stats", {}))
  x_fq, _ = np_fake_quant(x, s, z, *cfg.act_range)
  conv = nn.Conv(4, (3, 3), padding="VALID", use_bias=False)
  c = conv.apply({"params": {"kernel": jnp.asarray(w_fq)}}, jnp.asarray(x_fq))
  want = (np.asarray(c) / f - np.asarray(mean)) * f + np.asarray(beta)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ex["bias"], np.asarray(beta) - np.asarray(mean) * f, rtol=1e-6)
