"""lsq_fake_quant (LSQ / LSQ+) gradients against hand-derived values and a numpy reference."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qatjax import fake_quant, lsq_fake_quant, lsq_grad_scale, lsq_init_scale


def np_lsq(x, s, z, qmin, qmax, dy, gf=1.0, noise=None):
  """Element-wise ``y, dx, ds_i, dz_i`` of the formulas in lsq_fake_quant's docstring (with
  ``noise``: stochastic rounding ``floor(v + noise)``)."""
  x = np.asarray(x, np.float32)
  s = np.asarray(s, np.float32)
  z = np.clip(np.round(np.asarray(z, np.float32)), qmin, qmax)
  v = (x * (np.float32(1) / s)).astype(np.float32)
  r = np.round(v) if noise is None else np.floor(v + noise)
  q = r + z
  below, above = q < qmin, q > qmax
  inr = ~below & ~above
  y = ((np.clip(q, qmin, qmax) - z) * s).astype(np.float32)
  dx = np.where(inr, dy, 0.0)
  ds = gf * dy * np.where(below, qmin - z, np.where(above, qmax - z, r - v))
  dz = gf * np.where(inr, 0.0, -dy * s)
  return y, dx, ds, dz


def pad(a, n=16):
  """Zero-pads a short 1-D array to ``n`` elements (few distinct shapes keep the un-jitted variant
  fast); padded elements get a zero cotangent, so they add nothing to ds or dz."""
  a = np.asarray(a)
  return np.pad(a, (0, n - a.shape[0])) if a.ndim == 1 and a.shape[0] < n else a


@functools.lru_cache(maxsize=None)
def _lsq_vjp(kw_items):
  kw = dict(kw_items)

  def vjp_all(x, s, z, dy):
    y, vjp = jax.vjp(lambda x, s, z: lsq_fake_quant(x, s, z, **kw), x, s, z)
    return (y, *vjp(dy))

  # Cached: tests with the same arguments share one function, so jax.jit (which caches on the
  # function) compiles it once for all of them.
  return vjp_all


def lsq_vjp(variant, **kw):
  """``(y, dx, ds, dz)`` of lsq_fake_quant for a cotangent ``dy``, under ``variant`` (a test's
  ``self.variant``: jitted or not)."""
  f = variant(_lsq_vjp(tuple(sorted(kw.items()))))

  def call(x, s, z, dy):
    n = np.shape(x)[0]
    y, dx, ds, dz = f(pad(x), s, z, pad(dy))
    return (y[:n], dx[:n], ds, dz) if np.ndim(x) == 1 else (y, dx, ds, dz)

  return call


# --- hand-derived ---------------------------------------------------------------------------------


class HandDerivedTest(chex.TestCase):
  """Hand-derived values, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_derived_unsigned(self):
    # s = 0.5, z = 0, [0, 255]; v = x / s = -600, -2, 0.6, 4, 600.
    x = jnp.array([-300.0, -1.0, 0.3, 2.0, 300.0])
    y, dx, ds, dz = lsq_vjp(self.variant, qmin=0, qmax=255)(
      x, jnp.float32(0.5), jnp.float32(0.0), jnp.ones(5)
    )
    np.testing.assert_allclose(y, [0.0, 0.0, 0.5, 2.0, 127.5])
    np.testing.assert_array_equal(dx, [0, 0, 1, 1, 0])
    # ds: below -> qmin - z = 0; 0.6 -> round - v = 0.4; 4 -> 0; above -> qmax - z = 255.
    np.testing.assert_allclose(ds, 255.4, rtol=1e-6)
    # dz: -s for each of the 3 out-of-range elements (full gradient even though z == qmin).
    np.testing.assert_allclose(dz, -1.5, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_derived_signed_with_zero_point_and_ties(self):
    # s = 1, z = 3, [-8, 7]: q = round(x) + 3.
    x = jnp.array([-20.0, -11.5, 0.4, 4.5, 10.0])
    dy = jnp.array([1.0, 1.0, 1.0, 1.0, 2.0])
    y, dx, ds, dz = lsq_vjp(self.variant, qmin=-8, qmax=7)(
      x, jnp.float32(1.0), jnp.float32(3.0), dy
    )
    np.testing.assert_array_equal(y, [-11.0, -11.0, 0.0, 4.0, 4.0])
    np.testing.assert_array_equal(dx, [0, 0, 1, 1, 0])
    # -20: below, -11; -11.5 -> -12 (even) -> q = -9: below, -11; 0.4: -0.4; 4.5 -> 4: -0.5;
    # 10: above, (7 - 3) * dy = 8.
    np.testing.assert_allclose(ds, -11 - 11 - 0.4 - 0.5 + 8, rtol=1e-6)
    np.testing.assert_allclose(dz, -1 - 1 - 2, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_grad_scale_scales_ds_and_dz_but_not_dx(self):
    x = jnp.array([-20.0, -11.5, 0.4, 4.5, 10.0])
    args = (x, jnp.float32(1.0), jnp.float32(3.0), jnp.ones(5))
    _, dx1, ds1, dz1 = lsq_vjp(self.variant, qmin=-8, qmax=7)(*args)
    _, dx2, ds2, dz2 = lsq_vjp(self.variant, qmin=-8, qmax=7, grad_scale=0.25)(*args)
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_allclose(ds2, 0.25 * ds1, rtol=1e-6)
    np.testing.assert_allclose(dz2, 0.25 * dz1, rtol=1e-6)
    assert float(ds1) != 0 and float(dz1) != 0


def test_grad_scale_can_be_traced():
  x = jnp.array([-20.0, 0.4, 10.0])
  f = jax.jit(jax.grad(lambda s, gf: lsq_fake_quant(x, s, 3.0, -8, 7, grad_scale=gf).sum()))
  np.testing.assert_allclose(f(1.0, 0.5), 0.5 * f(1.0, 1.0), rtol=1e-6)


# --- numpy reference, all granularities -----------------------------------------------------------


class NumpyReferenceTest(chex.TestCase):
  """Every granularity against the numpy reference, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("int8_z0", -128, 127, 0), ("uint8_z200", 0, 255, 200), ("uint2_z3", 0, 3, 3)
  )
  def test_per_tensor_matches_numpy(self, qmin, qmax, zmax):
    rng = np.random.default_rng(qmax)
    x = rng.normal(0, 1.5, (40, 9)).astype(np.float32)
    dy = rng.normal(0, 1, x.shape).astype(np.float32)
    s, z = np.float32(3.0 / (qmax - qmin)), np.float32(zmax)  # z at the range end
    gf = 0.3
    y, dx, ds, dz = lsq_vjp(self.variant, qmin=qmin, qmax=qmax, grad_scale=gf)(x, s, z, dy)
    ry, rdx, rds, rdz = np_lsq(x, s, z, qmin, qmax, dy, gf)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(dx, rdx)
    np.testing.assert_allclose(ds, rds.sum(), rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(dz, rdz.sum(), rtol=2e-5, atol=1e-4)
    assert 0 < (rdx != 0).sum() < x.size

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("2d_axis_0", (6, 6), 0),
    ("2d_axis_1", (6, 6), 1),
    ("3d_axis_minus1", (4, 4, 4), -1),
    ("4d_axis_1", (3, 3, 3, 3), 1),
  )
  def test_per_channel_matches_numpy(self, shape, axis):
    rng = np.random.default_rng(sum(shape) + axis)
    x = rng.normal(0, 2, shape).astype(np.float32)
    dy = rng.normal(0, 1, shape).astype(np.float32)
    c = shape[axis]
    s = rng.uniform(0.05, 0.5, c).astype(np.float32)
    z = rng.integers(-5, 6, c).astype(np.float32)
    y, dx, ds, dz = lsq_vjp(self.variant, qmin=-8, qmax=7, axis=axis, grad_scale=0.5)(x, s, z, dy)
    assert ds.shape == (c,) and dz.shape == (c,)
    xm, dym = np.moveaxis(x, axis, 0), np.moveaxis(dy, axis, 0)
    for i in range(c):
      ry, rdx, rds, rdz = np_lsq(xm[i], s[i], z[i], -8, 7, dym[i], 0.5)
      np.testing.assert_array_equal(np.moveaxis(np.asarray(y), axis, 0)[i], ry)
      np.testing.assert_array_equal(np.moveaxis(np.asarray(dx), axis, 0)[i], rdx)
      np.testing.assert_allclose(ds[i], rds.sum(), rtol=2e-5, atol=1e-4)
      np.testing.assert_allclose(dz[i], rdz.sum(), rtol=2e-5, atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("last_group_of_2", (6, 12), 1, 5, "full"),  # 3 groups, last of 2
    ("vector_divides", (6, 12), -1, 4, "vector"),  # divides: 3 groups
    ("axis_0_ones", (7, 4), 0, 3, "ones"),  # along axis 0, params (3, 1), last group of 1
  )
  def test_per_group_matches_numpy(self, shape, axis, group_size, layout):
    rng = np.random.default_rng(group_size * 10 + len(layout))
    x = rng.normal(0, 2, shape).astype(np.float32)
    dy = rng.normal(0, 1, shape).astype(np.float32)
    ax = axis % len(shape)
    n = -(-shape[ax] // group_size)
    full = list(shape)
    full[ax] = n
    pshape = tuple(full) if layout == "full" else tuple(n if d == ax else 1 for d in range(2))
    s = rng.uniform(0.05, 0.5, pshape).astype(np.float32)
    z = rng.integers(-5, 6, pshape).astype(np.float32)
    ps, pz = (s.reshape(n), z.reshape(n)) if layout == "vector" else (s, z)
    y, dx, ds, dz = lsq_vjp(self.variant, qmin=-8, qmax=7, axis=axis, group_size=group_size)(
      x, ps, pz, dy
    )
    assert ds.shape == ps.shape and dz.shape == pz.shape
    sb, zb = np.broadcast_to(s, full), np.broadcast_to(z, full)
    rds_full, rdz_full = np.zeros(full), np.zeros(full)
    for g in range(n):
      sl = [slice(None)] * 2
      sl[ax] = slice(g * group_size, min((g + 1) * group_size, shape[ax]))
      psl = [slice(None)] * 2
      psl[ax] = slice(g, g + 1)
      sl, psl = tuple(sl), tuple(psl)
      ry, rdx, rds, rdz = np_lsq(x[sl], sb[psl], zb[psl], -8, 7, dy[sl])
      np.testing.assert_array_equal(np.asarray(y)[sl], ry)
      np.testing.assert_array_equal(np.asarray(dx)[sl], rdx)
      rds_full[psl] = rds.sum(axis=ax, keepdims=True)
      rdz_full[psl] = rdz.sum(axis=ax, keepdims=True)
    other = 1 - ax
    if layout != "full":  # parameters shared along the other axis: sum over it too
      rds_full, rdz_full = rds_full.sum(other, keepdims=True), rdz_full.sum(other, keepdims=True)
    np.testing.assert_allclose(ds, rds_full.reshape(ps.shape), rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(dz, rdz_full.reshape(pz.shape), rtol=2e-5, atol=1e-4)


# --- zero point handling --------------------------------------------------------------------------


class ZeroPointTest(chex.TestCase):
  """Zero point handling, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_point_none_is_fixed_zero(self):
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (40, 9)).astype(np.float32)
    g_none = self.variant(jax.value_and_grad(lambda s: lsq_fake_quant(x, s, None, -8, 7).sum()))
    g_zero = self.variant(jax.value_and_grad(lambda s: lsq_fake_quant(x, s, 0.0, -8, 7).sum()))
    (y0, ds0), (y1, ds1) = g_none(jnp.float32(0.1)), g_zero(jnp.float32(0.1))
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_allclose(ds0, ds1, rtol=1e-6)
    _, _, rds, _ = np_lsq(x, 0.1, 0.0, -8, 7, np.ones_like(x))
    np.testing.assert_allclose(ds0, rds.sum(), rtol=2e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_point_none_per_channel(self):
    # z fixed at 0: below -> qmin = -8, 0.3 -> round(0.3) - 0.3, above -> qmax = 7.
    x = jnp.array([[-20.0, -9.0], [0.3, 0.2], [9.0, 6.6]])
    g = self.variant(jax.grad(lambda s: lsq_fake_quant(x, s, None, -8, 7, axis=0).sum()))
    np.testing.assert_allclose(g(jnp.ones(3)), [-16.0, -0.5, 7.0 + 0.4], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_point_rounded_and_clipped_in_forward_straight_through(self):
    x = jnp.array([-30.0, -2.2, 0.0, 1.3, 30.0])
    dy = jnp.ones(5)
    f = lsq_vjp(self.variant, qmin=0, qmax=15)
    for z_in, z_used in [(2.4, 2.0), (2.5, 2.0), (3.5, 4.0), (-3.0, 0.0), (40.0, 15.0)]:
      y, dx, ds, dz = f(x, jnp.float32(1.0), jnp.float32(z_in), dy)
      ry, rdx, rds, rdz = np_lsq(x, 1.0, z_used, 0, 15, np.ones(5))
      np.testing.assert_array_equal(y, ry)
      np.testing.assert_array_equal(dx, rdx)
      np.testing.assert_allclose(ds, rds.sum(), rtol=1e-6)
      # straight through round and clip: the gradient reaches z even when it was clipped
      np.testing.assert_allclose(dz, rdz.sum(), rtol=1e-6)
      assert float(dz) != 0


class ForwardAndSpecialValuesTest(chex.TestCase):
  """Forward vs fake_quant, stochastic rounding, NaN and infinities, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_equals_fake_quant(self):
    rng = np.random.default_rng(12)
    x = rng.normal(0, 1, (16, 8)).astype(np.float32)
    s = rng.uniform(0.01, 0.1, 8).astype(np.float32)
    z = rng.integers(-3, 3, 8).astype(np.float32)
    a = self.variant(lambda x, s, z: lsq_fake_quant(x, s, z, -8, 7, axis=1))(x, s, z)
    b = self.variant(lambda x, s, z: fake_quant(x, s, z, -8, 7, axis=1))(x, s, z)
    np.testing.assert_array_equal(a, b)

  @chex.variants(with_jit=True, without_jit=True)
  def test_stochastic_rounding_matches_fake_quant_and_grad(self):
    x = jnp.linspace(-2.0, 2.0, 16)
    k = jax.random.key(5)
    a = self.variant(lambda x: lsq_fake_quant(x, 0.3, 1.0, -4, 3, key=k))(x)
    b = self.variant(lambda x: fake_quant(x, 0.3, 1.0, -4, 3, key=k))(x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fake_quant(x, 0.3, 1.0, -4, 3))
    # The gradients use the forward's draw (floor(x / s + u), u = uniform(key, x.shape)): numpy's
    # formulas with that noise give the same forward, mask and parameter gradients.
    dy = jnp.asarray(np.random.default_rng(3).normal(size=16), jnp.float32)
    f = self.variant(lambda x, s, z: jax.vjp(lambda *a: lsq_fake_quant(*a, -4, 3, key=k), x, s, z))
    y, vjp = f(x, jnp.float32(0.3), jnp.float32(1.0))
    dx, ds, dz = vjp(dy)
    u = np.asarray(jax.random.uniform(k, x.shape, jnp.float32))
    ry, rdx, rds, rdz = np_lsq(x, 0.3, 1.0, -4, 3, np.asarray(dy), noise=u)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(dx, rdx)
    np.testing.assert_allclose(ds, rds.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dz, rdz.sum(), rtol=1e-5, atol=1e-6)
    assert 0 < (rdx != 0).sum() < 16 and float(dz) != 0

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_and_inf_gradients(self):
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.3])
    y, dx, ds, dz = lsq_vjp(self.variant, qmin=-8, qmax=7)(
      x, jnp.float32(1.0), jnp.float32(1.0), jnp.ones(4)
    )
    assert np.isnan(y[0])
    np.testing.assert_array_equal(y[1:], [6.0, -9.0, 0.0])
    np.testing.assert_array_equal(dx, [0, 0, 0, 1])
    # NaN contributes nothing; +inf: qmax - z = 6; -inf: qmin - z = -9; 0.3: -0.3.
    np.testing.assert_allclose(ds, 6 - 9 - 0.3, rtol=1e-6)
    np.testing.assert_allclose(dz, -2.0)


def test_errors():
  x = jnp.ones((4, 6))
  with pytest.raises(ValueError, match="qmin"):
    lsq_fake_quant(x, 1.0, 0.0, 3, 3)
  with pytest.raises(ValueError, match="scale"):
    lsq_fake_quant(x, jnp.ones(4), None, -8, 7, axis=1)
  with pytest.raises(ValueError, match="axis"):
    lsq_fake_quant(x, jnp.ones(6), None, -8, 7, axis=5)
  with pytest.raises(ValueError, match="group_size"):
    lsq_fake_quant(x, jnp.ones(6), None, -8, 7, axis=1, group_size=0)
  with pytest.raises(ValueError, match="floating"):
    lsq_fake_quant(jnp.ones(3, jnp.int8), 1.0, None, -8, 7)


# --- helpers --------------------------------------------------------------------------------------


def test_lsq_grad_scale():
  assert lsq_grad_scale(100, 127) == pytest.approx(1 / math.sqrt(12700), rel=1e-12)
  assert lsq_grad_scale(4096, 7) == pytest.approx(1 / math.sqrt(4096 * 7), rel=1e-12)
  assert lsq_grad_scale(0, 7) == pytest.approx(1 / math.sqrt(7))  # numel clamped to 1
  assert round(lsq_grad_scale(100, 127), 6) == 0.008874


class InitScaleTest(chex.TestCase):
  """lsq_init_scale, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_lsq_init_scale(self):
    x = jnp.array([[1.0, -2.0], [-3.0, 6.0], [2.0, 1.0]])
    f = self.variant(lambda x: lsq_init_scale(x, 4))
    np.testing.assert_allclose(f(x), 2 * 15 / 6 / 2, rtol=1e-6)
    g = self.variant(lambda x: lsq_init_scale(x, 9, axis=1))
    np.testing.assert_allclose(g(x), [2 * 2 / 3, 2 * 3 / 3], rtol=1e-6)
    h = self.variant(lambda x: lsq_init_scale(x, 4, axis=0))
    np.testing.assert_allclose(h(x), [1.5, 4.5, 1.5], rtol=1e-6)
    z = self.variant(lambda x: lsq_init_scale(x, 7))(jnp.zeros(5))
    assert float(z) == pytest.approx(2.0**-23)
    with pytest.raises(ValueError, match="axis"):
      lsq_init_scale(x, 7, axis=2)


def test_lsq_learns_scale_towards_lower_error():
  # A few SGD steps on the reconstruction error reduce it from a too-large initial step.
  x = jax.random.normal(jax.random.key(0), (4096,))
  loss = jax.jit(lambda s: jnp.mean((lsq_fake_quant(x, s, None, -8, 7) - x) ** 2))
  grad = jax.jit(jax.grad(lambda s: jnp.mean((lsq_fake_quant(x, s, None, -8, 7) - x) ** 2)))
  s = jnp.float32(1.0)
  l0 = loss(s)
  for _ in range(50):
    s = s - 0.5 * grad(s)
  assert float(loss(s)) < 0.5 * float(l0)
  assert 0.2 < float(s) < 0.8
