"""Observer (min/max) activation quantizers inside layers: when statistics move, and what eval uses.

* ``quant_stats`` moves only when the caller makes it mutable and is not initializing;
* ``observe=False`` freezes it (count included), ``enabled=False`` does not;
* in eval (immutable) the layer uses the stored range, never the current batch's;
* uncalibrated (``input_count == 0``) the input passes through un-quantized;
* every ``act_calibration`` (ema, minmax, percentile, mse) and ``weight_calibration="mse"`` give
  the ranges a numpy reimplementation gives;
* gradients pass straight through the quantizers inside their range (Flax's float layer's
  gradients at the hand-quantized values, masked where the input clips).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from test_layers_helpers import np_fake_quant

import qatjax
from qatjax import QAct, QConv, QDense, QDenseGeneral, QuantConfig


def _rand(shape, seed, scale=1.0, shift=0.0):
  return jnp.asarray(shift + scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _zeros_init(key, shape, dtype=jnp.float32):
  return jnp.linspace(-0.5, 0.5, int(np.prod(shape)), dtype=dtype).reshape(shape)


LAYERS = {
  "dense": (lambda cfg: QDense(3, config=cfg, kernel_init=_zeros_init), (4, 5)),
  "conv": (lambda cfg: QConv(3, (3,), config=cfg, kernel_init=_zeros_init), (4, 6, 2)),
}


def _weight_only(make, v, x):
  """The same layer (same params) with weight-only quantization, applied to ``x``."""
  q = make(QuantConfig(8, None))
  return q.apply({**q.init(jax.random.key(0), x), "params": v["params"]}, x)


def _stats(v):
  s = v["quant_stats"]
  return float(s["input_min"]), float(s["input_max"]), int(s["input_count"])


class ObserverStatsTest(chex.TestCase):
  """When observer statistics move and what eval uses, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((name, name) for name in sorted(LAYERS))
  def test_stats_move_only_when_mutable_and_not_initializing(self, layer):
    make, shape = LAYERS[layer]
    q = make(QuantConfig(act_momentum=0.25))
    x1, x2 = _rand(shape, 1), _rand(shape, 2, 3.0, 1.0)

    def run(v, x1, x2):
      # Initializing never calibrates, even though init makes every collection mutable.
      v0 = q.init(jax.random.key(0), x1)
      _, s1 = q.apply(v, x1, mutable=["quant_stats"])
      y2, s2 = q.apply({**v, **s1}, x2, mutable=["quant_stats"])
      _, s_all = q.apply(v, x1, mutable=True)
      _, s_params_only = q.apply(v, x1, mutable=["params"])
      return v0, {**v, **s1}, {**v, **s2}, {**v, **s_all}, s_params_only, y2

    v = q.init(jax.random.key(0), x1)
    v0, v1, v2, v_all, s_params_only, y2 = self.variant(run)(v, x1, x2)
    assert _stats(v0) == (0.0, 0.0, 0)
    lo1, hi1 = float(x1.min()), float(x1.max())
    np.testing.assert_allclose(_stats(v1)[:2], (lo1, hi1), rtol=1e-6)  # the first batch sets it
    assert _stats(v1)[2] == 1
    # then an EMA with momentum 0.25
    want = (lo1 + 0.25 * (float(x2.min()) - lo1), hi1 + 0.25 * (float(x2.max()) - hi1))
    np.testing.assert_allclose(_stats(v2)[:2], want, rtol=1e-6)
    assert _stats(v2)[2] == 2
    assert _stats(v_all) == _stats(v1)
    assert "quant_stats" not in s_params_only
    # Immutable: apply returns only the output, computed with the stored range: that of a frozen
    # observer (whose statistics stay v1's), not the range x2 moves the statistics to (y2).
    y_imm = self.variant(q.apply)(v1, x2)
    frozen = qatjax.set_quant_flags(v1, observe=False)
    y_frozen, s_frozen = self.variant(lambda v, x: q.apply(v, x, mutable=["quant_stats"]))(
      frozen, x2
    )
    assert _stats(s_frozen) == _stats(v1)
    np.testing.assert_array_equal(y_imm, y_frozen)
    assert not np.allclose(y_imm, y2, rtol=1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((name, name) for name in sorted(LAYERS))
  def test_observe_false_freezes_and_enabled_false_does_not(self, layer):
    make, shape = LAYERS[layer]
    q = make(QuantConfig())
    x1, x2 = _rand(shape, 1), _rand(shape, 2, 3.0)
    v = q.init(jax.random.key(0), x1)
    _, s = q.apply(v, x1, mutable=["quant_stats"])
    v1 = {**v, **s}

    def step(v, x):
      return q.apply(v, x, mutable=["quant_stats"])[1]

    frozen = self.variant(step)(qatjax.set_quant_flags(v1, observe=False), x2)
    assert _stats(frozen) == _stats(v1)
    assert not bool(frozen["quant_stats"]["observe"])
    # Fake quantization off: the observer still calibrates (the usual first phase of QAT).
    moved = self.variant(step)(qatjax.set_quant_flags(v1, enabled=False), x2)
    assert _stats(moved)[2] == 2 and _stats(moved) != _stats(v1)
    # Flags flipped per layer path.
    both = qatjax.set_quant_flags(v1, observe=False, path="^Nothing$")
    assert bool(both["quant_stats"]["observe"])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((name, name) for name in sorted(LAYERS))
  def test_eval_uses_stored_stats_never_the_batch(self, layer):
    make, shape = LAYERS[layer]
    q = make(QuantConfig(act_calibration="minmax"))
    x_cal = _rand(shape, 0)
    v = q.init(jax.random.key(0), x_cal)
    _, s = q.apply(v, x_cal, mutable=["quant_stats"])
    v = {**v, **s}
    # Two batches sharing example 0; the rest of batch b has a 50x wider range.
    b1 = _rand(shape, 1)
    b2 = b1.at[1:].multiply(50.0)

    def run(v, b1, b2):
      eval1, eval2 = q.apply(v, b1), q.apply(v, b2)
      train1, _ = q.apply(v, b1, mutable=["quant_stats"])
      train2, _ = q.apply(v, b2, mutable=["quant_stats"])
      return eval1, eval2, train1, train2

    eval1, eval2, train1, train2 = self.variant(run)(v, b1, b2)
    np.testing.assert_array_equal(eval1[0], eval2[0])
    # Training (mutable) updates the range with the batch first, so there it does differ: the
    # equality above is not vacuous.
    assert not np.allclose(train1[0], train2[0], rtol=1e-3)
    # The stored range clips the wide batch.
    lo, hi = float(v["quant_stats"]["input_min"]), float(v["quant_stats"]["input_max"])
    w_only = np.asarray(_weight_only(make, v, jnp.clip(b2, lo, hi)))
    assert np.abs(np.asarray(eval2) - w_only).max() < 0.05 * np.abs(w_only).max()

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((name, name) for name in sorted(LAYERS))
  def test_uncalibrated_passes_input_through(self, layer):
    make, shape = LAYERS[layer]
    x = _rand(shape, 3)
    q = make(QuantConfig(8, 8))
    v = q.init(jax.random.key(0), x)
    assert int(v["quant_stats"]["input_count"]) == 0
    y = self.variant(q.apply)(v, x)
    # Only the kernel is quantized: exactly the weight-only layer.
    np.testing.assert_array_equal(y, _weight_only(make, v, x))
    # Once calibrated the input is quantized too.
    _, s = q.apply(v, x, mutable=["quant_stats"])
    assert not np.array_equal(self.variant(q.apply)({**v, **s}, x), y)

  @chex.variants(with_jit=True, without_jit=True)
  def test_qact_uncalibrated_identity_then_on_grid(self):
    q = QAct(QuantConfig(weight_bits=None, act_bits=4))
    x = _rand((16,), 0)
    v = q.init(jax.random.key(0), x)
    np.testing.assert_array_equal(self.variant(q.apply)(v, x), x)
    y, s = self.variant(lambda v, x: q.apply(v, x, mutable=["quant_stats"]))(v, x)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 15
    k = np.asarray(y) / scale + np.round(-lo / scale)  # y = (k - zero_point) * scale
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert np.round(k).min() >= 0 and np.round(k).max() <= 15
    assert len(np.unique(np.asarray(y))) <= 16
    assert int(s["quant_stats"]["input_count"]) == 1


def np_affine(lo, hi, qmin, qmax):
  """PyTorch's affine (scale, zero point) of a range widened to contain 0."""
  lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
  s = max((hi - lo) / np.float32(qmax - qmin), np.float32(qatjax.EPS))
  return np.float32(s), np.clip(qmin - np.round(lo / s), qmin, qmax)


def mse_candidates(x, lo, hi, qmin, qmax, symmetric):
  """``(ratios, errors)``: the mean squared fake-quantization error of ``x`` for every shrunken
  range ``ratio * [lo, hi]`` of the MSE search (64 ratios in [0.2, 1])."""
  ratios = np.linspace(0.2, 1.0, 64).astype(np.float32)
  errors = []
  for r in ratios:
    if symmetric:
      s, z = np.float32(max(-lo * r, hi * r, 0) / ((qmax - qmin) / 2)), 0.0
    else:
      s, z = np_affine(lo * r, hi * r, qmin, qmax)
    errors.append(np.mean((np_fake_quant(x, s, z, qmin, qmax).astype(np.float64) - x) ** 2))
  return ratios, np.asarray(errors)


def check_mse_choice(x, lo, hi, got_lo, got_hi, qmin, qmax, symmetric):
  """``[got_lo, got_hi]`` is one of the MSE search's candidates for ``x`` and (up to float32
  summation order) the best one; returns its ratio."""
  ratios, errors = mse_candidates(x, lo, hi, qmin, qmax, symmetric)
  i = np.argmin(np.abs(ratios * hi - got_hi))
  np.testing.assert_allclose((got_lo, got_hi), (ratios[i] * lo, ratios[i] * hi), rtol=1e-5)
  assert errors[i] <= errors.min() * (1 + 1e-4), (ratios[i], ratios[np.argmin(errors)])
  return ratios[i]


def test_layer_act_calibrators_match_numpy():
  """Each ``act_calibration`` of a layer tracks its own range, recomputed in numpy: the first
  batch sets it, the second moves it by ``act_momentum`` (minmax: running min / max)."""
  x1 = np.asarray(_rand((64, 5), 0, shift=0.5))
  x2 = np.asarray(_rand((64, 5), 1, 0.5))
  kinds = ("ema", "minmax", "percentile", "mse")
  qmin, qmax = 0, 15  # 4-bit activations: the MSE optimum is well inside the min/max range

  @jax.jit
  def run(x1, x2):
    out = {}
    for kind in kinds:
      cfg = QuantConfig(8, 4, act_calibration=kind, act_momentum=0.5)
      q = QDense(3, config=cfg, kernel_init=_zeros_init)
      v = q.init(jax.random.key(0), x1)
      out[kind] = []
      for b in (x1, x2):
        _, s = q.apply(v, b, mutable=["quant_stats"])
        v = {**v, **s}
        out[kind].append(v)
    return out

  out = {kind: [_stats(v) for v in vs] for kind, vs in run(x1, x2).items()}
  assert all([c[2] for c in states] == [1, 2] for states in out.values())
  ema = lambda old, new: old + 0.5 * (new - old)
  rng1, rng2 = (x1.min(), x1.max()), (x2.min(), x2.max())
  np.testing.assert_allclose(out["ema"][0][:2], rng1, rtol=1e-6)
  np.testing.assert_allclose(out["ema"][1][:2], ema(np.array(rng1), np.array(rng2)), rtol=1e-6)
  both = np.concatenate([x1, x2])
  np.testing.assert_allclose(out["minmax"][1][:2], (both.min(), both.max()), rtol=1e-6)
  p1, p2 = (np.percentile(b, [0.01, 99.99]) for b in (x1, x2))
  np.testing.assert_allclose(out["percentile"][0][:2], p1, rtol=1e-5)
  np.testing.assert_allclose(out["percentile"][1][:2], ema(p1, p2), rtol=1e-5)
  assert out["percentile"][0][1] < x1.max() - 1e-3  # percentiles clip the extremes
  # MSE: the first batch's choice, then the second batch's choice recovered from the EMA.
  (lo1, hi1), (lo2, hi2) = out["mse"][0][:2], out["mse"][1][:2]
  r1 = check_mse_choice(x1, *rng1, lo1, hi1, qmin, qmax, symmetric=False)
  b_lo, b_hi = lo1 + (lo2 - lo1) / 0.5, hi1 + (hi2 - hi1) / 0.5
  r2 = check_mse_choice(x2, *rng2, b_lo, b_hi, qmin, qmax, symmetric=False)
  assert r1 < 0.95 and r2 < 0.95  # really a search, not the min/max range


MSE_LAYERS = {
  "dense_per_channel": (lambda c, init: QDense(4, config=c, kernel_init=init), (32, 4)),
  "dense_general_per_channel": (
    lambda c, init: QDenseGeneral((2, 3), config=c, kernel_init=init),
    (32, 2, 3),
  ),
  "dense_per_tensor": (lambda c, init: QDense(4, config=c, kernel_init=init), (32, 4)),
}


@pytest.mark.parametrize("layer", sorted(MSE_LAYERS))
def test_weight_mse_calibration_matches_numpy_search(layer):
  """``weight_calibration="mse"``: every weight scale is the MSE search's best clipping of its
  channel (numpy), and the layer multiplies by the kernel quantized with it."""
  make, kshape = MSE_LAYERS[layer]
  granularity = "per_tensor" if layer.endswith("per_tensor") else "per_channel"
  cfg = QuantConfig(4, None, weight_calibration="mse", weight_granularity=granularity)
  w = np.random.default_rng(5).laplace(size=kshape).astype(np.float32)  # heavy tails
  q = make(cfg, lambda *_: jnp.asarray(w))
  x = _rand((3, 32), 1)

  @jax.jit
  def run(x):
    v = q.init(jax.random.key(0), x)
    return q.apply(v, x, mutable=["quant_record"])

  y, rec = run(x)
  scales = np.asarray(rec["quant_record"]["kernel"].scale, np.float32).reshape(-1)
  qmin, qmax = cfg.weight_range
  cols = w.reshape(1, -1) if granularity == "per_tensor" else w.reshape(32, -1).T
  assert len(cols) == len(scales)
  ratios = []
  for col, s in zip(cols, scales):
    # Symmetric: candidate r has the scale r * max|w| / ((qmax - qmin) / 2), that of [-r m, r m].
    m, got = np.abs(col).max(), s * np.float32((qmax - qmin) / 2)
    ratios.append(check_mse_choice(col, -m, m, -got, got, qmin, qmax, symmetric=True))
  assert min(ratios) < 0.95
  w_q = np_fake_quant(w.reshape(32, -1), scales, 0.0, qmin, qmax)  # (K, channels) view
  want = np.asarray(x) @ w_q  # the bias is zero-initialised
  np.testing.assert_allclose(np.reshape(y, want.shape), want, rtol=1e-5, atol=1e-5)


FLAX_TWINS = {"dense": lambda: nn.Dense(3), "conv": lambda: nn.Conv(3, (3,))}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_gradients_through_observer_quantizers(layer):
  """Observer quantizers pass gradients straight through inside their range: the input gradient
  is the float layer's at the quantized input and kernel, masked where the input clips; the
  kernel gradient is the float layer's at the quantized input (min/max weights never clip)."""
  make, shape = LAYERS[layer]
  q = make(QuantConfig())
  x_cal = _rand(shape, 0)
  x = 1.5 * _rand(shape, 4)  # wider than the calibration batch: some inputs clip
  v = q.init(jax.random.key(0), x_cal)
  _, s = q.apply(v, x_cal, mutable=["quant_stats"])
  v = {**v, **s}
  dy = _rand(jax.eval_shape(q.apply, v, x).shape, 5)

  @jax.jit
  def grads(params, x):
    return jax.grad(lambda p, x: jnp.vdot(q.apply({**v, "params": p}, x), dy), (0, 1))(params, x)

  g_params, g_x = grads(v["params"], x)
  # By hand: the input on its affine grid, the kernel on its per-channel narrow int8 grid.
  st = v["quant_stats"]
  sx, zx = np_affine(float(st["input_min"]), float(st["input_max"]), 0, 255)
  xn = np.asarray(x)
  qx = np.round(xn * (np.float32(1) / sx)) + zx
  mask = (qx >= 0) & (qx <= 255)
  assert 0 < mask.mean() < 1
  w = np.asarray(v["params"]["kernel"])
  sw = np.abs(w).max(tuple(range(w.ndim - 1))) / np.float32(127)
  fparams = {"kernel": np_fake_quant(w, sw, 0.0, -127, 127), "bias": v["params"]["bias"]}
  flax_layer = FLAX_TWINS[layer]()
  _, vjp = jax.vjp(
    lambda p, x: flax_layer.apply({"params": p}, x), fparams, np_fake_quant(xn, sx, zx, 0, 255)
  )
  want_params, want_x = vjp(dy)
  np.testing.assert_allclose(g_x, np.where(mask, want_x, 0.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_params["kernel"], want_params["kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_params["bias"], want_params["bias"], rtol=1e-6)


@pytest.mark.parametrize("p", [90.0, 99.99])
def test_act_percentile_sets_the_observed_range(p):
  """One batch: the observer's range is numpy's (100 - p)-th and p-th percentiles of the input."""
  x = _rand((64, 5), 2, 0.5)
  q = QDense(3, config=QuantConfig(act_calibration="percentile", act_percentile=p))
  v = q.init(jax.random.key(0), x)
  _, s = q.apply(v, x, mutable=["quant_stats"])
  lo, hi, _ = _stats(s)
  want = np.percentile(np.asarray(x, np.float64), [100.0 - p, p])
  np.testing.assert_allclose((lo, hi), want, rtol=1e-5)
