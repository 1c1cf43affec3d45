"""fake_quant and pact: forward and gradient against hand-derived values and a numpy reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from qatjax import fake_quant, pact, qrange


def np_fake_quant(x, s, z, qmin, qmax):
  """Numpy reference of PyTorch's CPU kernel: ``y`` and the STE mask (float32 throughout)."""
  x = np.asarray(x, np.float32)
  s = np.asarray(s, np.float32)
  z = np.asarray(z, np.float32)
  inv = (np.float32(1.0) / s).astype(np.float32)
  q = np.round(x * inv).astype(np.float32) + z  # np.round: half to even
  y = ((np.clip(q, qmin, qmax) - z) * s).astype(np.float32)
  mask = ((q >= qmin) & (q <= qmax)).astype(np.float32)
  return y, mask


def pad(a, n=16):
  """Zero-pads a short 1-D array to ``n`` elements: few distinct shapes keep the un-jitted
  variants (one compile per op and shape) fast. Fake quantization is element-wise, and a zero
  cotangent adds nothing to any scale or zero-point sum."""
  a = np.asarray(a)
  return np.pad(a, (0, n - a.shape[0])) if a.ndim == 1 and a.shape[0] < n else a


@functools.lru_cache(maxsize=None)
def _fq_vjp(kw_items):
  kw = dict(kw_items)

  def both(x, s, z):
    y, vjp = jax.vjp(lambda x: fake_quant(x, s, z, **kw), x)
    return y, vjp(jnp.ones_like(y))[0]

  # Cached: tests with the same arguments share one function, so jax.jit (which caches on the
  # function) compiles it once for all of them.
  return both


def fq_and_grad(variant, **kw):
  """``(y, dx)`` of fake_quant(x, s, z) with dy = 1, under ``variant`` (a test's
  ``self.variant``: jitted or not)."""
  f = variant(_fq_vjp(tuple(sorted(kw.items()))))

  def call(x, s, z):
    n = np.shape(x)[0]
    y, dx = f(pad(x), s, z)
    return (y[:n], dx[:n]) if np.ndim(x) == 1 else (y, dx)

  return call


INT8 = dict(qmin=-128, qmax=127)


# --- hand-derived per-tensor cases ----------------------------------------------------------------


class PerTensorTest(chex.TestCase):
  """Hand-derived per-tensor cases, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_round_half_to_even(self):
    x = jnp.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51])
    y, dx = fq_and_grad(self.variant, **INT8)(x, 1.0, 0.0)
    np.testing.assert_array_equal(y, [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, 0.0, 1.0])
    np.testing.assert_array_equal(dx, np.ones(9))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_with_non_unit_scale(self):
    # x / s = 0.5, 1.5, 2.5 -> 0, 2, 2 steps of 0.25.
    x = jnp.array([0.125, 0.375, 0.625])
    y, _ = fq_and_grad(self.variant, **INT8)(x, 0.25, 0.0)
    np.testing.assert_array_equal(y, [0.0, 0.5, 0.5])

  @chex.variants(with_jit=True, without_jit=True)
  def test_int8_range_ends_and_just_beyond(self):
    x = jnp.array(
      [127.0, 127.4, 127.5, 127.6, 128.0, 1e6, -128.0, -128.4, -128.5, -128.6, -129.0, -1e6]
    )
    y, dx = fq_and_grad(self.variant, **INT8)(x, 1.0, 0.0)
    np.testing.assert_array_equal(
      y, [127, 127, 127, 127, 127, 127, -128, -128, -128, -128, -128, -128]
    )
    # 127.5 -> q = 128 (out, grad 0); -128.5 -> q = -128 (half to even, in range, grad 1).
    np.testing.assert_array_equal(dx, [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_point_at_qmin(self):
    # z = qmin = -128: representable reals are [0, 255] (scale 1).
    x = jnp.array([-1.0, -0.5, 0.0, 3.2, 254.5, 255.0, 255.5, 300.0])
    y, dx = fq_and_grad(self.variant, **INT8)(x, 1.0, -128.0)
    np.testing.assert_array_equal(y, [0, 0, 0, 3, 254, 255, 255, 255])
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 1, 1, 0, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_point_at_qmax(self):
    # z = qmax = 127: representable reals are [-255, 0] (scale 1).
    x = jnp.array([1.0, 0.5, 0.0, -3.2, -254.5, -255.0, -255.5, -300.0])
    y, dx = fq_and_grad(self.variant, **INT8)(x, 1.0, 127.0)
    np.testing.assert_array_equal(y, [0, 0, 0, -3, -254, -255, -255, -255])
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 1, 1, 0, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_point_ends_with_scale(self):
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, (33, 17)), jnp.float32)
    for z in (0.0, 15.0):
      y, dx = fq_and_grad(self.variant, qmin=0, qmax=15)(x, 0.3, z)
      ry, rmask = np_fake_quant(x, 0.3, z, 0, 15)
      np.testing.assert_array_equal(y, ry)
      np.testing.assert_array_equal(dx, rmask)

  @chex.variants(with_jit=True, without_jit=True)
  def test_int_zero_point_dtype(self):
    x = jnp.linspace(-3, 3, 16)
    y_int, _ = fq_and_grad(self.variant, qmin=-8, qmax=7)(x, 0.5, jnp.int32(2))
    y_flt, _ = fq_and_grad(self.variant, qmin=-8, qmax=7)(x, 0.5, 2.0)
    np.testing.assert_array_equal(y_int, y_flt)
    np.testing.assert_array_equal(y_flt, np_fake_quant(x, 0.5, 2.0, -8, 7)[0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_per_tensor_matches_numpy(self):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (33, 17)).astype(np.float32)
    for (qmin, qmax), s, z in [
      ((-128, 127), 0.013, 0.0),
      ((0, 255), 0.02, 100.0),
      ((-8, 7), 0.4, -3.0),
      ((0, 3), 1.1, 1.0),
    ]:
      y, dx = fq_and_grad(self.variant, qmin=qmin, qmax=qmax)(x, s, z)
      ry, rmask = np_fake_quant(x, s, z, qmin, qmax)
      np.testing.assert_array_equal(y, ry)
      np.testing.assert_array_equal(dx, rmask)
      assert 0 < rmask.sum() < rmask.size  # both branches exercised

  @chex.variants(with_jit=True, without_jit=True)
  def test_cotangent_is_passed_through(self):
    x = jnp.array([0.2, 5.0, -0.7, 200.0])
    dy = jnp.array([3.0, -2.0, 0.5, 7.0])
    f = self.variant(lambda x, dy: jax.vjp(lambda x: fake_quant(x, 1.0, 0, -128, 127), x)[1](dy)[0])
    np.testing.assert_array_equal(f(x, dy), [3.0, -2.0, 0.5, 0.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_gradient_to_scale_and_zero_point(self):
    x = jnp.linspace(-300, 300, 41)
    g = self.variant(jax.grad(lambda s, z: fake_quant(x, s, z, -128, 127).sum(), argnums=(0, 1)))
    ds, dz = g(jnp.float32(0.7), jnp.float32(3.0))
    assert float(ds) == 0.0 and float(dz) == 0.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_input_keeps_dtype(self):
    x = jnp.array([0.3, -1.7, 2.2], jnp.bfloat16)
    y = self.variant(lambda x: fake_quant(x, 0.5, 0, -8, 7))(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), [0.5, -1.5, 2.0])


# --- per-channel --------------------------------------------------------------------------------


def np_per_channel(x, s, z, axis, qmin, qmax):
  """Explicit loop over channels of ``axis``."""
  xm = np.moveaxis(np.asarray(x, np.float32), axis, 0)
  y, m = np.empty_like(xm), np.empty_like(xm)
  for c in range(xm.shape[0]):
    y[c], m[c] = np_fake_quant(xm[c], s[c], z[c], qmin, qmax)
  return np.moveaxis(y, 0, axis), np.moveaxis(m, 0, axis)


class PerChannelTest(chex.TestCase):
  """Per-channel scales against a loop over channels, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name=f"{len(shape)}d_axis_{axis}".replace("-", "minus"), shape=shape, axis=axis)
    for shape in [(6, 6), (4, 4, 4), (3, 3, 3, 3)]
    for axis in [0, 1, -1]
  )
  def test_per_channel_matches_channel_loop(self, shape, axis):
    rng = np.random.default_rng(len(shape) * 10 + axis % len(shape))
    x = rng.normal(0, 3, shape).astype(np.float32)
    x.flat[0], x.flat[-1] = 1e3, -1e3  # something out of range
    c = shape[axis]
    s = rng.uniform(0.01, 0.2, c).astype(np.float32)
    z = rng.integers(-20, 20, c).astype(np.float32)
    y, dx = fq_and_grad(self.variant, qmin=-64, qmax=63, axis=axis)(x, s, z)
    ry, rmask = np_per_channel(x, s, z, axis, -64, 63)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(dx, rmask)
    assert 0 < rmask.sum() < rmask.size

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_channel_differs_from_per_tensor(self):
    x = jnp.ones((2, 3)) * 1.0
    y, _ = fq_and_grad(self.variant, qmin=-8, qmax=7, axis=1)(
      x, jnp.array([0.3, 0.6, 0.7]), jnp.zeros(3)
    )
    np.testing.assert_allclose(y, [[0.9, 1.2, 0.7]] * 2, rtol=1e-6)


# --- per-group ----------------------------------------------------------------------------------


def np_per_group(x, s, z, axis, group_size, qmin, qmax):
  """Explicit loop over groups; ``s``/``z`` have x.ndim dims with dim ``axis`` = #groups."""
  x = np.asarray(x, np.float32)
  y, m = np.empty_like(x), np.empty_like(x)
  size = x.shape[axis]
  n = -(-size // group_size)
  for g in range(n):
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(g * group_size, min((g + 1) * group_size, size))
    psl = [slice(None)] * x.ndim
    psl[axis] = slice(g, g + 1)
    y[tuple(sl)], m[tuple(sl)] = np_fake_quant(
      x[tuple(sl)], s[tuple(psl)], z[tuple(psl)], qmin, qmax
    )
  return y, m


class PerGroupTest(chex.TestCase):
  """Per-group scales against a loop over groups, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("divides", (4, 12), 1, 4, "full"),
    ("last_group_of_2", (4, 12), 1, 5, "full"),  # 3 groups, last of 2
    ("params_of_ones", (4, 12), 1, 5, "ones"),  # params of shape (1, 3)
    ("vector_last_group_of_1", (4, 12), -1, 11, "vector"),  # 2 groups, last of 1
    ("group_longer_than_axis", (4, 12), 1, 16, "full"),
    ("axis_0_uneven", (4, 12), 0, 3, "full"),
    ("3d_uneven", (2, 7, 3), 1, 3, "full"),
  )
  def test_per_group_matches_group_loop(self, shape, axis, group_size, param_layout):
    rng = np.random.default_rng(len(shape) * 100 + group_size)
    x = rng.normal(0, 2, shape).astype(np.float32)
    ax = axis % len(shape)
    n = -(-shape[ax] // group_size)
    full = list(shape)
    full[ax] = n
    if param_layout == "full":
      pshape = tuple(full)
    else:
      pshape = tuple(n if d == ax else 1 for d in range(len(shape)))
    s = rng.uniform(0.02, 0.3, pshape).astype(np.float32)
    z = rng.integers(-3, 4, pshape).astype(np.float32)
    ry, rmask = np_per_group(
      x, np.broadcast_to(s, full), np.broadcast_to(z, full), ax, group_size, -16, 15
    )
    if param_layout == "vector":
      s, z = s.reshape(n), z.reshape(n)
    y, dx = fq_and_grad(self.variant, qmin=-16, qmax=15, axis=axis, group_size=group_size)(x, s, z)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(dx, rmask)

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_size_equal_to_one_channel_is_per_channel(self):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (5, 6)).astype(np.float32)
    s = rng.uniform(0.05, 0.2, 6).astype(np.float32)
    z = np.zeros(6, np.float32)
    pc = self.variant(lambda x, s, z: fake_quant(x, s, z, -8, 7, axis=1))(x, s, z)
    pg = self.variant(lambda x, s, z: fake_quant(x, s, z, -8, 7, axis=1, group_size=1))(x, s, z)
    np.testing.assert_array_equal(pc, pg)


# --- transformations ----------------------------------------------------------------------------


class TransformationsTest(chex.TestCase):
  """vmap and grad of fake_quant, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_inputs(self):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (7, 11)).astype(np.float32)
    f = self.variant(jax.vmap(lambda r: fake_quant(r, 0.1, 1.0, -8, 7)))
    np.testing.assert_array_equal(f(x), np_fake_quant(x, 0.1, 1.0, -8, 7)[0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_scales_equals_per_channel(self):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (6, 9)).astype(np.float32)
    s = rng.uniform(0.05, 0.3, 6).astype(np.float32)
    z = rng.integers(-4, 4, 6).astype(np.float32)
    vm = self.variant(jax.vmap(lambda r, s, z: fake_quant(r, s, z, -8, 7)))(x, s, z)
    pc = self.variant(lambda x, s, z: fake_quant(x, s, z, -8, 7, axis=0))(x, s, z)
    np.testing.assert_array_equal(vm, pc)
    np.testing.assert_array_equal(vm, np_per_channel(x, s, z, 0, -8, 7)[0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_of_grad(self):
    # s = 0.1, [-8, 7]: 0.76 -> 8 (out), -0.76 -> -8 (in), -0.86 -> -9 (out).
    x = jnp.array([[0.1, 9.0, -9.0], [0.74, 0.76, -0.76], [0.0, -0.86, 0.7]])
    g = self.variant(jax.vmap(jax.grad(lambda r: fake_quant(r, 0.1, 0, -8, 7).sum())))
    np.testing.assert_array_equal(g(x), [[1, 0, 0], [1, 0, 1], [1, 0, 1]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_grad_of_sum_of_squares(self):
    # d/dx sum(fq(x)^2) = 2 * fq(x) * mask
    x = jnp.array([0.26, -0.74, 0.9, -2.0])
    g = self.variant(jax.grad(lambda x: (fake_quant(x, 0.25, 0, -3, 3) ** 2).sum()))(x)
    np.testing.assert_allclose(g, [0.5, -1.5, 0.0, 0.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_second_order_grad_is_zero(self):
    x = jnp.array([0.3, 1.2])
    g2 = self.variant(
      jax.grad(lambda x: jax.grad(lambda x: fake_quant(x, 0.5, 0, -8, 7).sum())(x).sum())
    )
    np.testing.assert_array_equal(g2(x), [0.0, 0.0])


# --- special values -----------------------------------------------------------------------------


class SpecialValuesTest(chex.TestCase):
  """NaN, infinities and non-positive scales, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_and_inf(self):
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.0])
    y, dx = fq_and_grad(self.variant, **INT8)(x, 0.5, 3.0)
    assert np.isnan(y[0])
    np.testing.assert_array_equal(y[1:], [(127 - 3) * 0.5, (-128 - 3) * 0.5, 1.0])
    np.testing.assert_array_equal(dx, [0, 0, 0, 1])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero", 0.0), ("minus_one", -1.0), ("minus_tiny", -1e-30))
  def test_nonpositive_scale_clamped_to_eps(self, scale):
    x = jnp.array([0.0, 1e-7, 1.0, -1.0])
    y, dx = fq_and_grad(self.variant, qmin=-8, qmax=7)(x, scale, 0.0)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    eps = 2.0**-23
    np.testing.assert_allclose(y, np_fake_quant(x, eps, 0.0, -8, 7)[0], rtol=1e-6)
    y2, _ = fq_and_grad(self.variant, qmin=-8, qmax=7, eps=1e-3)(x, scale, 0.0)
    np.testing.assert_allclose(y2, [0.0, 0.0, 7e-3, -8e-3], rtol=1e-6)


# --- stochastic rounding ------------------------------------------------------------------------


class StochasticRoundingTest(chex.TestCase):
  """fake_quant with a key, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_stochastic_rounding_is_floor_or_ceil_and_unbiased(self):
    x = jnp.array([0.1, 0.25, 0.5, 0.9, -0.3, -1.75, 2.0, 0.0])
    s = 0.5
    f = self.variant(jax.vmap(lambda k: fake_quant(x, s, 0, -128, 127, key=k)))
    ys = np.asarray(f(jax.random.split(jax.random.key(0), 4000)))
    v = np.asarray(x) / s
    q = ys / s
    np.testing.assert_array_equal(q, np.round(q))  # on the grid
    assert np.all((q == np.floor(v)) | (q == np.ceil(v)))
    np.testing.assert_allclose(ys.mean(0), x, atol=0.02)  # unbiased; std of mean <= 0.25/63
    # Exact grid points never move; non-integers take both values.
    np.testing.assert_array_equal(ys[:, 6], 2.0)
    np.testing.assert_array_equal(ys[:, 7], 0.0)
    assert len(np.unique(ys[:, 0])) == 2

  @chex.variants(with_jit=True, without_jit=True)
  def test_stochastic_rounding_key_determinism(self):
    x = jnp.asarray(np.random.default_rng(6).normal(0, 1, 512), jnp.float32)
    f = self.variant(lambda x, k: fake_quant(x, 0.1, 0, -128, 127, key=k))
    a = f(x, jax.random.key(1))
    np.testing.assert_array_equal(a, f(x, jax.random.key(1)))
    assert not np.array_equal(a, f(x, jax.random.key(2)))
    det = self.variant(lambda x: fake_quant(x, 0.1, 0, -128, 127))(x)
    assert not np.array_equal(a, det)
    np.testing.assert_array_equal(det, np_fake_quant(x, 0.1, 0, -128, 127)[0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_stochastic_rounding_gradient_mask(self):
    # 3.6 / 0.5 = 7.2 rounds to 7 (in range, grad 1) or 8 (out, grad 0); the backward must use the
    # forward's draw. A wider range with the same key (same noise) shows the unclipped q.
    x = jnp.full((256,), 3.6)

    def both(x, k):
      y, vjp = jax.vjp(lambda x: fake_quant(x, 0.5, 0, -8, 7, key=k), x)
      wide = fake_quant(x, 0.5, 0, -16, 15, key=k)
      return wide, vjp(jnp.ones_like(y))[0]

    wide, dx = self.variant(both)(x, jax.random.key(3))
    np.testing.assert_array_equal(dx, (np.asarray(wide) / 0.5 <= 7).astype(np.float32))
    assert 0 < dx.sum() < 256


# --- errors -------------------------------------------------------------------------------------


def test_errors():
  x = jnp.ones((4, 6))
  with pytest.raises(ValueError, match="qmin"):
    fake_quant(x, 1.0, 0, 7, 7)
  with pytest.raises(ValueError, match="qmin"):
    fake_quant(x, 1.0, 0, 8, -8)
  with pytest.raises(ValueError, match="qmax"):
    fake_quant(x, 1.0, 0, -8, 7.0)
  with pytest.raises(ValueError, match="axis"):
    fake_quant(x, jnp.ones(6), 0, -8, 7, axis=2)
  with pytest.raises(ValueError, match="axis"):
    fake_quant(x, jnp.ones(6), 0, -8, 7, axis=-3)
  with pytest.raises(ValueError, match="scale"):
    fake_quant(x, jnp.ones(4), jnp.zeros(6), -8, 7, axis=1)
  with pytest.raises(ValueError, match="zero_point"):
    fake_quant(x, jnp.ones(6), jnp.zeros(4), -8, 7, axis=1)
  with pytest.raises(ValueError, match="scale"):
    fake_quant(x, jnp.ones(6), 0, -8, 7)  # vector scale per tensor
  with pytest.raises(ValueError, match="scale"):
    fake_quant(x, jnp.ones(3), 0, -8, 7, axis=1, group_size=4)  # needs 2 groups
  with pytest.raises(ValueError, match="group_size"):
    fake_quant(x, jnp.ones(1), 0, -8, 7, axis=1, group_size=0)
  with pytest.raises(ValueError, match="group_size"):
    fake_quant(x, jnp.ones(1), 0, -8, 7, axis=1, group_size=-2)
  with pytest.raises(ValueError, match="group_size"):
    fake_quant(x, 1.0, 0, -8, 7, group_size=2)  # no axis
  with pytest.raises(ValueError, match="x must be a floating"):
    fake_quant(jnp.ones(3, jnp.int32), 1.0, 0, -8, 7)


def test_pact_bits_errors():
  for bits in (1, 9, 0, 2.0, True):
    with pytest.raises(ValueError, match="bits"):
      pact(jnp.ones(3), 1.0, bits)


# --- PACT ---------------------------------------------------------------------------------------


class PactTest(chex.TestCase):
  """PACT forward and gradients, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("bits_2", 2), ("bits_4", 4), ("bits_8", 8))
  def test_pact_forward_and_gradient(self, bits):
    alpha = 1.5
    x = jnp.array([-2.0, -1e-3, 0.0, 0.1, 0.74, 1.0, 1.4999, 1.5, 1.6, 40.0])
    dy = jnp.arange(1.0, 11.0)

    def both(x, a):
      y, vjp = jax.vjp(lambda x, a: pact(x, a, bits), x, a)
      return (y, *vjp(dy))

    y, dx, da = self.variant(both)(x, jnp.float32(alpha))
    xn = np.asarray(x)
    s = np.float32(alpha) / np.float32(2**bits - 1)
    ry = np.round(np.clip(xn, 0, alpha) / s) * s
    np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-7)
    assert np.max(np.asarray(y)) <= alpha + 1e-6
    mask = (xn >= 0) & (xn < alpha)
    np.testing.assert_array_equal(dx, np.where(mask, dy, 0.0))
    np.testing.assert_allclose(da, np.sum(np.where(xn >= alpha, dy, 0.0)))
    assert float(da) == 8 + 9 + 10

  @chex.variants(with_jit=True, without_jit=True)
  def test_pact_grid_and_per_channel_alpha(self):
    x = jnp.asarray(np.random.default_rng(7).normal(0.5, 1, (5, 3)), jnp.float32)
    alpha = jnp.array([0.5, 1.0, 2.0])
    y, da = self.variant(lambda x, a: (pact(x, a, 3), jax.grad(lambda a: pact(x, a, 3).sum())(a)))(
      x, alpha
    )
    steps = np.asarray(y) / (np.asarray(alpha) / 7)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
    assert steps.min() >= 0 and steps.max() <= 7 + 1e-4
    np.testing.assert_array_equal(da, (np.asarray(x) >= np.asarray(alpha)).sum(0))


# --- properties ---------------------------------------------------------------------------------

RANGES = [
  qrange(b, signed=sg, narrow=n) for b in (2, 4, 8) for sg in (True, False) for n in (False, True)
]
PROP = settings(max_examples=50, deadline=None)


@st.composite
def fq_case(draw, in_range=False):
  qmin, qmax = draw(st.sampled_from(RANGES))
  z = draw(st.integers(qmin, qmax))
  s = np.float32(draw(st.floats(2.0**-10, 8.0, width=32)))
  lo, hi = ((qmin - z), (qmax - z)) if in_range else (-2.0 * (qmax - qmin), 2.0 * (qmax - qmin))
  # A fixed length keeps one compiled function per range.
  vals = draw(st.lists(st.floats(lo, hi, width=32), min_size=16, max_size=16))
  x = (np.asarray(vals, np.float32) * s).astype(np.float32)
  return x, s, np.float32(z), qmin, qmax


@functools.lru_cache(maxsize=None)
def _jit_fq(qmin, qmax):
  return jax.jit(lambda x, s, z: fake_quant(x, s, z, qmin, qmax))


@functools.lru_cache(maxsize=None)
def _jit_fq_grad(qmin, qmax):
  return jax.jit(jax.grad(lambda x, s, z: fake_quant(x, s, z, qmin, qmax).sum()))


@PROP
@given(fq_case())
def test_property_on_grid_and_idempotent(case):
  x, s, z, qmin, qmax = case
  f = _jit_fq(qmin, qmax)
  y = np.asarray(f(x, s, z))
  k = np.rint(y.astype(np.float64) / np.float64(s) + z)
  assert np.all((k >= qmin) & (k <= qmax))
  np.testing.assert_array_equal(y, ((k - z).astype(np.float32) * s).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(f(y, s, z)), y)
  np.testing.assert_array_equal(y, np_fake_quant(x, s, z, qmin, qmax)[0])


@PROP
@given(fq_case(in_range=True))
def test_property_error_at_most_half_step_in_range(case):
  x, s, z, qmin, qmax = case
  y = np.asarray(_jit_fq(qmin, qmax)(x, s, z))
  err = np.abs(y.astype(np.float64) - x)
  assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-6 * np.abs(x))
  g = _jit_fq_grad(qmin, qmax)(x, s, z)
  np.testing.assert_array_equal(g, np.ones_like(x))  # everything in range passes the gradient
