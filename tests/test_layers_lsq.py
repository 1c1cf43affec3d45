"""LSQ / LSQ+ quantizers inside layers: initial values and learning.

* ``kernel_scale`` starts at ``2 * mean|w| / sqrt(qmax)`` per scale (Esser et al. 2020), the input
  scale and zero point from the first batch (affine min/max; symmetric: the same LSQ rule);
* ``kernel_scale``, ``input_scale``, ``input_zero_point`` (and PACT's ``input_alpha``) get
  non-zero gradients and move under an ``optax.adam`` step.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qatjax import EPS, QConv, QDense, QuantConfig, lsq_fake_quant, lsq_grad_scale


def _rand(shape, seed, scale=1.0, shift=0.0):
  return jnp.asarray(shift + scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _kernel_init(key, shape, dtype=jnp.float32):
  """Deterministic kernel with per-output-channel magnitudes that differ (so per-channel and
  per-tensor scales differ too)."""
  n = math.prod(shape)
  rng = np.random.default_rng(n)
  w = rng.normal(size=shape) * np.linspace(0.2, 2.0, shape[-1])
  return jnp.asarray(w, dtype)


def _np_lsq_weight_init(w, cfg, in_axis, out_axis):
  a = np.abs(np.asarray(w, np.float64))
  _, qmax = cfg.weight_range
  if cfg.weight_granularity == "per_tensor":
    m = a.mean()
  elif cfg.weight_granularity == "per_channel":
    m = a.mean(axis=tuple(d for d in range(a.ndim) if d != out_axis))
  else:
    g = cfg.weight_group_size
    blocks = [
      np.take(a, range(s, min(s + g, a.shape[in_axis])), axis=in_axis)
      for s in range(0, a.shape[in_axis], g)
    ]
    other = tuple(d for d in range(a.ndim) if d not in (in_axis, out_axis))
    m = np.concatenate(
      [b.mean(axis=other + (in_axis,), keepdims=True) for b in blocks], axis=in_axis
    )
    m = m.reshape([m.shape[d] if d in (in_axis, out_axis) else 1 for d in range(a.ndim)])
  return np.maximum(2.0 * m / math.sqrt(qmax), EPS)


INIT_CASES = {
  "dense_channel_w8": (
    lambda c: QDense(6, config=c, kernel_init=_kernel_init),
    (5, 7),
    0,
    1,
    QuantConfig(8, 8, method="lsq", lsq_init="lsq"),
  ),
  "dense_tensor_w4_symmetric_act": (
    lambda c: QDense(6, config=c, kernel_init=_kernel_init),
    (5, 7),
    0,
    1,
    QuantConfig(
      4, 4, method="lsq", lsq_init="lsq", act_symmetric=True, weight_granularity="per_tensor"
    ),
  ),
  "dense_group3_w4": (
    lambda c: QDense(6, config=c, kernel_init=_kernel_init),
    (5, 7),
    0,
    1,
    QuantConfig(
      4, 8, method="lsq", lsq_init="lsq", weight_granularity="per_group", weight_group_size=3
    ),
  ),
  "conv_channel_w2": (
    lambda c: QConv(4, (3, 2), config=c, kernel_init=_kernel_init),
    (2, 5, 5, 3),
    2,
    3,
    QuantConfig(2, 8, method="lsq", lsq_init="lsq"),
  ),
  "conv_group2_w4": (
    lambda c: QConv(4, (3,), config=c, kernel_init=_kernel_init),
    (2, 5, 5),
    1,
    2,
    QuantConfig(
      4, 4, method="lsq", lsq_init="lsq", weight_granularity="per_group", weight_group_size=2
    ),
  ),
}


@pytest.mark.parametrize("case", sorted(INIT_CASES))
def test_lsq_init_values(case):
  """``lsq_init="lsq"``: the paper's rule (Esser et al. 2020); the other choices are
  test_lsq_init.py's."""
  make, shape, in_axis, out_axis, cfg = INIT_CASES[case]
  x = _rand(shape, 0, 2.0, 0.7)
  v = jax.jit(make(cfg).init)(jax.random.key(0), x)
  p = v["params"]
  want = _np_lsq_weight_init(p["kernel"], cfg, in_axis, out_axis)
  np.testing.assert_allclose(p["kernel_scale"], want.astype(np.float32), rtol=1e-5)
  # Full (not narrow) range by default for LSQ: qmax = 2**(b-1) - 1, qmin = -2**(b-1).
  assert cfg.weight_range == (-(2 ** (cfg.weight_bits - 1)), 2 ** (cfg.weight_bits - 1) - 1)
  qmin, qmax = cfg.act_range
  if cfg.act_symmetric:
    np.testing.assert_allclose(
      p["input_scale"], 2 * np.abs(np.asarray(x)).mean() / math.sqrt(qmax), rtol=1e-5
    )
    assert "input_zero_point" not in p
  else:  # affine: the first batch's range, zero exactly representable
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / (qmax - qmin)
    np.testing.assert_allclose(p["input_scale"], s, rtol=1e-5)
    np.testing.assert_allclose(p["input_zero_point"], np.clip(qmin - np.round(lo / s), qmin, qmax))


GRAD_CASES = {
  "dense_lsq_plus_w4a4": (
    lambda c: QDense(6, config=c, kernel_init=_kernel_init),
    (8, 7),
    QuantConfig(4, 4, method="lsq"),
    ("kernel_scale", "input_scale", "input_zero_point"),
  ),
  "conv_lsq_w8a8_group": (
    lambda c: QConv(4, (3, 3), config=c, kernel_init=_kernel_init),
    (2, 5, 5, 3),
    QuantConfig(8, 8, method="lsq", weight_granularity="per_group", weight_group_size=2),
    ("kernel_scale", "input_scale", "input_zero_point"),
  ),
  "dense_lsq_symmetric_pact": (
    lambda c: QDense(6, config=c, kernel_init=_kernel_init),
    (8, 7),
    QuantConfig(4, 4, method="lsq", pact=True, pact_init=1.0),
    ("kernel_scale", "input_alpha"),
  ),
}


# Jitted only: op-by-op gradients + Adam compile hundreds of tiny kernels (about 8 s on CPU).
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_lsq_scales_get_gradients_and_move_under_adam(case):
  make, shape, cfg, learned = GRAD_CASES[case]
  q = make(cfg)
  x_init = _rand(shape, 0)
  # A wider batch than the init batch: some inputs clip, so the offset gets a gradient too.
  x, t = _rand(shape, 1, 2.5, 0.3), _rand(shape[:-1] + (q.features,), 2)
  v = jax.jit(q.init)(jax.random.key(0), x_init)
  opt = optax.adam(1e-2)

  def step(params, opt_state, rest, x, t):
    def loss(p):
      return jnp.mean((q.apply({**rest, "params": p}, x) - t) ** 2)

    value, g = jax.value_and_grad(loss)(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return value, g, optax.apply_updates(params, upd), opt_state

  rest = {k: c for k, c in v.items() if k != "params"}
  params = v["params"]
  loss, grads, new, _ = jax.jit(step)(params, opt.init(params), rest, x, t)
  assert np.isfinite(float(loss))
  for name in learned:
    assert name in params, name
    g = np.asarray(grads[name])
    assert np.all(np.isfinite(g)) and np.any(g != 0), (name, g)
    assert not np.allclose(np.asarray(new[name]), np.asarray(params[name])), name
  # The kernel learns too (straight-through estimator inside the clip range).
  assert np.any(np.asarray(grads["kernel"]) != 0)


def test_input_scale_gradient_uses_lsq_grad_scale():
  """The layer's input-scale gradient is LSQ's, scaled by 1 / sqrt(features per example * qmax)."""
  cfg = QuantConfig(8, 8, method="lsq", act_symmetric=True)
  qmin, qmax = cfg.act_range
  q = QDense(3, config=cfg, kernel_init=_kernel_init)
  x = _rand((4, 6), 0)
  v = q.init(jax.random.key(0), x)
  p = v["params"]
  g_layer = jax.jit(
    jax.grad(lambda s: jnp.sum(q.apply({**v, "params": {**p, "input_scale": s}}, x)))
  )(p["input_scale"])
  w_fq = lsq_fake_quant(p["kernel"], p["kernel_scale"], None, *cfg.weight_range, axis=1)

  def ref(s, grad_scale):
    xq = lsq_fake_quant(x, s, None, qmin, qmax, grad_scale=grad_scale)
    return jnp.sum(xq @ w_fq + p["bias"])

  g_ref = jax.jit(jax.grad(ref))
  np.testing.assert_allclose(g_layer, g_ref(p["input_scale"], lsq_grad_scale(6, qmax)), rtol=1e-5)
  assert float(g_layer) != 0.0
  assert not np.allclose(g_layer, g_ref(p["input_scale"], 1.0), rtol=1e-3)


KERNEL_GRAD_CASES = {
  # name: (layer, flax twin, input shape, config, weights sharing one scale)
  "dense_per_channel": (
    lambda c: QDense(4, config=c, use_bias=False, kernel_init=_kernel_init),
    lambda: nn.Dense(4, use_bias=False),
    (5, 6),
    QuantConfig(4, None, method="lsq"),
    6,
  ),
  "dense_per_group": (
    lambda c: QDense(4, config=c, use_bias=False, kernel_init=_kernel_init),
    lambda: nn.Dense(4, use_bias=False),
    (5, 6),
    QuantConfig(4, None, method="lsq", weight_granularity="per_group", weight_group_size=3),
    3,
  ),
  "conv_per_tensor": (
    lambda c: QConv(3, (3,), config=c, use_bias=False, kernel_init=_kernel_init),
    lambda: nn.Conv(3, (3,), use_bias=False),
    (2, 5, 4),
    QuantConfig(4, None, method="lsq", weight_granularity="per_tensor"),
    3 * 4 * 3,
  ),
}


@pytest.mark.parametrize("case", sorted(KERNEL_GRAD_CASES))
def test_kernel_scale_gradient_is_lsq_formula(case):
  """d loss / d kernel_scale = g * sum(dL/dw_q * (qmin | qmax | round(v) - v)), g = 1 / sqrt(n *
  qmax) for the n weights that share the scale (Esser et al. 2020, section 2.2), by hand."""
  make, make_flax, shape, cfg, n = KERNEL_GRAD_CASES[case]
  q = make(cfg)
  x, dy_seed = _rand(shape, 0), 1
  v = jax.jit(q.init)(jax.random.key(0), x)
  w = np.asarray(v["params"]["kernel"], np.float32)
  pshape = v["params"]["kernel_scale"].shape
  # Scales that clip the largest weights: max |w| per scale maps to 10 steps (per tensor: the
  # smaller of max w and -min w maps to 9.5, so that both ends clip).
  if case == "dense_per_channel":
    s = np.abs(w).max(0) / 10
    s_full = np.broadcast_to(s, w.shape)
  elif case == "dense_per_group":  # groups of 3 input features: scales (2, 4)
    s = np.abs(w).reshape(2, 3, 4).max(1) / 10
    s_full = np.repeat(s, 3, axis=0)
  else:
    s = np.float32(min(w.max(), -w.min()) / 9.5)
    s_full = np.full(w.shape, s)
  s = np.asarray(s, np.float32).reshape(pshape)
  y_shape = jax.eval_shape(q.apply, v, x).shape
  dy = _rand(y_shape, dy_seed)

  @jax.jit
  def grads(s):
    params = {**v["params"], "kernel_scale": s}
    return jax.grad(lambda p: jnp.vdot(q.apply({**v, "params": p}, x), dy))(params)

  g_layer = np.asarray(grads(jnp.asarray(s))["kernel_scale"])
  # By hand: the weights' grid, then the float Flax layer's kernel gradient at those weights.
  qmin, qmax = cfg.weight_range
  s_full = np.asarray(s_full, np.float32)
  vv = w * (np.float32(1) / s_full)
  r = np.round(vv)
  w_q = (np.clip(r, qmin, qmax) * s_full).astype(np.float32)
  f = make_flax()
  _, vjp = jax.vjp(lambda k: f.apply({"params": {"kernel": k}}, x), jnp.asarray(w_q))
  (g_wq,) = vjp(dy)
  term = np.where(r < qmin, qmin, np.where(r > qmax, qmax, r - vv))
  assert (r < qmin).any() and (r > qmax).any() and ((r >= qmin) & (r <= qmax)).any()
  per_elem = np.asarray(g_wq, np.float64) * term / np.sqrt(n * qmax)
  if case == "dense_per_channel":
    want = per_elem.sum(0)
  elif case == "dense_per_group":
    want = per_elem.reshape(2, 3, 4).sum(1)
  else:
    want = per_elem.sum()
  np.testing.assert_allclose(g_layer, np.reshape(want, pshape), rtol=1e-4, atol=1e-6)
