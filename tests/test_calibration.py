"""Calibrators: minmax, ema_minmax, percentile, mse."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qatjax import calibration as cal_lib
from qatjax import fake_quant, scale_zero_point


def run(cal, batches, variant, shape=()):
  """The calibrator's state after ``batches``; ``variant`` (a test's ``self.variant``) wraps the
  update, so it runs jitted or not."""
  update = variant(cal.update)
  state = cal.init(shape)
  for b in batches:
    state = update(state, jnp.asarray(b))
  return state


def test_init_state():
  st = cal_lib.minmax().init((3,))
  assert st.min.shape == (3,) and st.max.shape == (3,) and st.count.shape == ()
  assert int(st.count) == 0 and st.count.dtype == jnp.int32
  assert cal_lib.ema_minmax().init().min.shape == ()


class MinMaxTest(chex.TestCase):
  """Running min / max, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_minmax_running(self):
    batches = [np.array([-1.0, 2.0]), np.array([3.0, 0.5]), np.array([-0.2, -4.0, 1.0])]
    st = run(cal_lib.minmax(), batches, self.variant)
    assert (float(st.min), float(st.max), int(st.count)) == (-4.0, 3.0, 3)
    st1 = run(cal_lib.minmax(), batches[:1], self.variant)
    # The first batch sets the range (the zero-initialised state is not part of it).
    assert (float(st1.min), float(st1.max), int(st1.count)) == (-1.0, 2.0, 1)
    pos = run(cal_lib.minmax(), [np.array([2.0, 5.0])], self.variant)
    assert float(pos.min) == 2.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_minmax_ignores_nan(self):
    st = run(
      cal_lib.minmax(), [np.array([np.nan, -1.0, 2.0]), np.array([np.nan, 7.0])], self.variant
    )
    assert (float(st.min), float(st.max)) == (-1.0, 7.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("axis_0", 0), ("axis_1", 1), ("axis_minus1", -1))
  def test_minmax_per_channel(self, axis):
    rng = np.random.default_rng(axis + 5)
    batches = [rng.normal(0, 1, (5, 4, 3)).astype(np.float32) for _ in range(3)]
    c = batches[0].shape[axis]
    st = run(cal_lib.minmax(axis=axis), batches, self.variant, (c,))
    allx = np.concatenate([np.moveaxis(b, axis, 0).reshape(c, -1) for b in batches], axis=1)
    np.testing.assert_array_equal(st.min, allx.min(1))
    np.testing.assert_array_equal(st.max, allx.max(1))


class EmaTest(chex.TestCase):
  """EMA of per-batch min / max, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_golden(self):
    x = np.array([-1.0, 0.3, 2.0], np.float32)
    st = run(cal_lib.ema_minmax(0.01), [x, 2 * x], self.variant)
    np.testing.assert_allclose([st.min, st.max], [-1.01, 2.02], rtol=1e-6)
    assert int(st.count) == 2
    s, z = scale_zero_point(st.min, st.max, 0, 255, symmetric=False)
    np.testing.assert_allclose(s, 0.011882353, rtol=1e-6)
    assert float(z) == 85.0
    s, _ = scale_zero_point(st.min, st.max, -128, 127, symmetric=True)
    np.testing.assert_allclose(s, 0.015843136, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_formula_over_several_batches(self):
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, 1 + i, 50).astype(np.float32) for i in range(5)]
    st = run(cal_lib.ema_minmax(0.3), batches, self.variant)
    lo, hi = batches[0].min(), batches[0].max()
    for b in batches[1:]:
      lo, hi = lo + 0.3 * (b.min() - lo), hi + 0.3 * (b.max() - hi)
    np.testing.assert_allclose([st.min, st.max], [lo, hi], rtol=1e-5)
    # momentum 1 tracks the last batch only
    last = run(cal_lib.ema_minmax(1.0), batches, self.variant)
    np.testing.assert_allclose([last.min, last.max], [batches[-1].min(), batches[-1].max()])

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_per_channel(self):
    b1 = np.array([[-1.0, 0.0], [1.0, 4.0]], np.float32)
    b2 = np.array([[-3.0, 2.0], [5.0, 2.0]], np.float32)
    st = run(cal_lib.ema_minmax(0.5, axis=1), [b1, b2], self.variant, (2,))
    np.testing.assert_allclose(st.min, [-1 + 0.5 * (-3 + 1), 0 + 0.5 * (2 - 0)])
    np.testing.assert_allclose(st.max, [1 + 0.5 * (5 - 1), 4 + 0.5 * (2 - 4)])


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5])
def test_bad_momentum(momentum):
  with pytest.raises(ValueError, match="momentum"):
    cal_lib.ema_minmax(momentum)
  with pytest.raises(ValueError, match="momentum"):
    cal_lib.percentile(momentum=momentum)


class PercentileTest(chex.TestCase):
  """Percentile ranges, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_percentile(self):
    st = run(cal_lib.percentile(1.0, 99.0), [np.arange(101.0)], self.variant)
    np.testing.assert_allclose([st.min, st.max], [1.0, 99.0], rtol=1e-6)
    # EMA with momentum 0.5 on the second batch.
    st = run(
      cal_lib.percentile(1.0, 99.0, momentum=0.5),
      [np.arange(101.0), np.arange(101.0) * 3],
      self.variant,
    )
    np.testing.assert_allclose([st.min, st.max], [2.0, 198.0], rtol=1e-6)
    # Outliers are clipped away, unlike min/max.
    x = np.concatenate([np.linspace(-1, 1, 10000), [1000.0]]).astype(np.float32)
    st = run(cal_lib.percentile(0.1, 99.9), [x], self.variant)
    assert float(st.max) < 1.01 and float(st.min) > -1.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_percentile_per_channel_and_errors(self):
    x = np.stack([np.arange(101.0), -np.arange(101.0)], axis=1).astype(np.float32)
    st = run(cal_lib.percentile(10.0, 90.0, axis=1), [x], self.variant, (2,))
    np.testing.assert_allclose(st.min, [10.0, -90.0], rtol=1e-6)
    np.testing.assert_allclose(st.max, [90.0, -10.0], rtol=1e-6)
    for lo, hi in [(50.0, 50.0), (60.0, 40.0), (-1.0, 50.0), (1.0, 101.0)]:
      with pytest.raises(ValueError, match="lower"):
        cal_lib.percentile(lo, hi)


def fq_mse(x, lo, hi, qmin, qmax, symmetric, axis=None):
  s, z = scale_zero_point(lo, hi, qmin, qmax, symmetric=symmetric)
  return float(jnp.mean((fake_quant(x, s, z, qmin, qmax, axis=axis) - x) ** 2))


class MseTest(chex.TestCase):
  """MSE range search, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("symmetric_int4", True, -8, 7), ("affine_int2", False, -2, 1))
  def test_mse_beats_minmax_on_heavy_tails(self, symmetric, qmin, qmax):
    x = jax.random.laplace(jax.random.key(0), (8192,))
    mm = run(cal_lib.minmax(), [x], self.variant)
    ms = run(cal_lib.mse(qmin, qmax, symmetric=symmetric), [x], self.variant)
    assert float(ms.max) < float(mm.max) and float(ms.min) > float(mm.min)
    e_mm = fq_mse(x, mm.min, mm.max, qmin, qmax, symmetric)
    e_ms = fq_mse(x, ms.min, ms.max, qmin, qmax, symmetric)
    assert e_ms < 0.8 * e_mm, (e_ms, e_mm)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mse_per_channel(self):
    rng = np.random.default_rng(2)
    scales = np.array([0.1, 1.0, 10.0], np.float32)
    x = (rng.laplace(0, 1, (3000, 3)) * scales).astype(np.float32)
    ms = run(cal_lib.mse(-8, 7, symmetric=True, axis=1), [x], self.variant, (3,))
    mm = run(cal_lib.minmax(axis=1), [x], self.variant, (3,))
    assert ms.max.shape == (3,)
    assert np.all(np.asarray(ms.max) < np.asarray(mm.max))
    for c in range(3):  # each channel chosen on its own data
      e_ms = fq_mse(jnp.asarray(x[:, c]), ms.min[c], ms.max[c], -8, 7, True)
      e_mm = fq_mse(jnp.asarray(x[:, c]), mm.min[c], mm.max[c], -8, 7, True)
      assert e_ms < e_mm
    # channel ranges scale with the data
    assert 50 < float(ms.max[2] / ms.max[0]) < 200


def test_batch_mse_range_is_best_candidate():
  x = jax.random.laplace(jax.random.key(1), (4000,))
  lo, hi = cal_lib.batch_mse_range(x, -8, 7, symmetric=True, num_candidates=16, min_ratio=0.1)
  e_best = fq_mse(x, lo, hi, -8, 7, True)
  for r in np.linspace(0.1, 1.0, 16):
    assert e_best <= fq_mse(x, x.min() * r, x.max() * r, -8, 7, True) * (1 + 1e-5)
  ratio = float(hi / x.max())
  assert 0.1 <= ratio < 1.0
  np.testing.assert_allclose(float(lo / x.min()), ratio, rtol=1e-5)


def test_mse_bad_range():
  with pytest.raises(ValueError, match="qmin"):
    cal_lib.mse(7, -8, symmetric=True)


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
def test_jit_scan_matches_python_loop(name):
  make = {
    "minmax": lambda: cal_lib.minmax(),
    "ema": lambda: cal_lib.ema_minmax(0.1),
    "percentile": lambda: cal_lib.percentile(1.0, 99.0, momentum=0.2),
    "mse": lambda: cal_lib.mse(-8, 7, symmetric=False, num_candidates=8),
  }[name]
  cal = make()
  xs = jax.random.normal(jax.random.key(3), (4, 256)) * jnp.arange(1.0, 5.0)[:, None]
  loop = cal.init()
  for x in xs:
    loop = cal.update(loop, x)

  @jax.jit
  def scanned(xs):
    return jax.lax.scan(lambda s, x: (cal.update(s, x), None), cal.init(), xs)[0]

  sc = scanned(xs)
  np.testing.assert_allclose([sc.min, sc.max], [loop.min, loop.max], rtol=1e-5)
  assert int(sc.count) == 4 == int(loop.count)
  # And both are the calibrator's range over the four batches (numpy; mse: inside min/max).
  batch_range, momentum = {
    "minmax": (lambda x: (x.min(), x.max()), None),
    "ema": (lambda x: (x.min(), x.max()), 0.1),
    "percentile": (lambda x: tuple(np.percentile(x, [1.0, 99.0])), 0.2),
    "mse": (lambda x: (x.min(), x.max()), None),
  }[name]
  xs = np.asarray(xs)
  lo, hi = batch_range(xs[0])
  for x in xs[1:]:
    b_lo, b_hi = batch_range(x)
    if momentum is None:
      lo, hi = min(lo, b_lo), max(hi, b_hi)
    else:
      lo, hi = lo + momentum * (b_lo - lo), hi + momentum * (b_hi - hi)
  if name == "mse":  # shrunken ranges (EMA of the per-batch searches) inside the overall min/max
    assert lo < float(sc.min) < 0 < float(sc.max) < hi
  else:
    np.testing.assert_allclose([sc.min, sc.max], [lo, hi], rtol=1e-5)


def test_vmap_over_independent_states():
  cal = cal_lib.minmax()
  xs = jnp.array([[1.0, -2.0], [5.0, 3.0]])
  states = jax.vmap(lambda x: cal.update(cal.init(), x))(xs)
  np.testing.assert_array_equal(states.min, [-2.0, 3.0])
  np.testing.assert_array_equal(states.max, [1.0, 5.0])
