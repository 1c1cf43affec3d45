"""qrange, scale_zero_point, quantize / dequantize / int_dtype."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from qatjax import EPS, dequantize, fake_quant, int_dtype, qrange, quantize, scale_zero_point
from qatjax.calibration import ema_minmax

# --- qrange -------------------------------------------------------------------------------------


def test_qrange_table():
  assert qrange(8) == (-128, 127)
  assert qrange(8, narrow=True) == (-127, 127)
  assert qrange(8, signed=False) == (0, 255)
  assert qrange(8, signed=False, narrow=True) == (0, 254)
  assert qrange(4) == (-8, 7)
  assert qrange(4, signed=False) == (0, 15)
  assert qrange(2) == (-2, 1)
  assert qrange(2, narrow=True) == (-1, 1)
  assert qrange(2, signed=False) == (0, 3)


@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange_all_bits(bits):
  lo, hi = qrange(bits)
  assert hi - lo + 1 == 2**bits and lo == -hi - 1
  nlo, nhi = qrange(bits, narrow=True)
  assert (nlo, nhi) == (-hi, hi)
  ulo, uhi = qrange(bits, signed=False)
  assert (ulo, uhi) == (0, 2**bits - 1)
  assert qrange(bits, signed=False, narrow=True) == (0, 2**bits - 2)
  for r in (qrange(bits), qrange(bits, signed=False)):
    assert all(type(v) is int for v in r)


@pytest.mark.parametrize("bits", [1, 9, 0, -8, 16, 8.0, True, "8"])
def test_qrange_bad_bits(bits):
  with pytest.raises(ValueError, match="bits"):
    qrange(bits)


# --- scale_zero_point ---------------------------------------------------------------------------


def test_torch_observer_golden():
  # MovingAverageMinMaxObserver(averaging_constant=0.01): observe [-1, 0.3, 2], then x2.
  cal = ema_minmax(0.01)
  x = jnp.array([-1.0, 0.3, 2.0])
  st_ = cal.update(cal.update(cal.init(), x), 2 * x)
  np.testing.assert_allclose([st_.min, st_.max], [-1.01, 2.02], rtol=1e-6)
  s, z = scale_zero_point(st_.min, st_.max, 0, 255, symmetric=False)  # quint8 affine
  np.testing.assert_allclose(s, 0.011882353, rtol=1e-6)
  assert float(z) == 85.0
  s, z = scale_zero_point(st_.min, st_.max, -128, 127, symmetric=True)  # qint8 symmetric
  np.testing.assert_allclose(s, 0.015843136, rtol=1e-6)
  assert float(z) == 0.0
  s, z = scale_zero_point(st_.min, st_.max, 0, 255, symmetric=True)  # quint8 symmetric
  np.testing.assert_allclose(s, 2.02 / 127.5, rtol=1e-6)
  assert float(z) == 128.0


def test_affine_hand_values():
  s, z = scale_zero_point(jnp.float32(-1.0), jnp.float32(3.0), 0, 255, symmetric=False)
  np.testing.assert_allclose(s, 4.0 / 255, rtol=1e-6)
  assert float(z) == 64.0  # 0 - round(-1 / (4/255)) = round(63.75)
  s, z = scale_zero_point(jnp.float32(-1.0), jnp.float32(3.0), -8, 7, symmetric=False)
  np.testing.assert_allclose(s, 4.0 / 15, rtol=1e-6)
  assert float(z) == -4.0  # -8 - round(-3.75)


def test_symmetric_hand_values():
  s, z = scale_zero_point(jnp.float32(-3.0), jnp.float32(1.0), -8, 7, symmetric=True)
  np.testing.assert_allclose(s, 3.0 / 7.5, rtol=1e-6)
  assert float(z) == 0.0
  s, z = scale_zero_point(jnp.float32(-3.0), jnp.float32(1.0), -7, 7, symmetric=True)
  np.testing.assert_allclose(s, 3.0 / 7.0, rtol=1e-6)


def test_range_widened_to_contain_zero():
  # All positive: affine z = qmin, scale from [0, max].
  s, z = scale_zero_point(jnp.float32(0.5), jnp.float32(2.55), 0, 255, symmetric=False)
  np.testing.assert_allclose(s, 0.01, rtol=1e-6)
  assert float(z) == 0.0
  # All negative: z = qmax.
  s, z = scale_zero_point(jnp.float32(-2.55), jnp.float32(-0.5), 0, 255, symmetric=False)
  np.testing.assert_allclose(s, 0.01, rtol=1e-6)
  assert float(z) == 255.0
  # All zero: scale clamped to eps, never 0 or NaN.
  for sym in (True, False):
    s, z = scale_zero_point(jnp.float32(0.0), jnp.float32(0.0), -128, 127, symmetric=sym)
    assert float(s) == EPS and np.isfinite(float(z))
  s, _ = scale_zero_point(jnp.float32(0.0), jnp.float32(0.0), 0, 15, symmetric=False, eps=1e-3)
  assert float(s) == pytest.approx(1e-3)


class ScaleZeroPointTest(chex.TestCase):
  """scale_zero_point on per-channel vectors, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_channel_vectors_and_zero_exactly_representable(self):
    rng = np.random.default_rng(0)
    lo = -rng.uniform(0, 5, 64).astype(np.float32)
    hi = rng.uniform(0, 5, 64).astype(np.float32)
    lo[:4] = [0.0, 0.3, -1e-9, -5.0]
    hi[:4] = [0.0, 0.9, 1e-9, -1.0]
    for qmin, qmax in [(0, 255), (-128, 127), (-8, 7), (0, 3), (-127, 127)]:
      for sym in (True, False):
        f = self.variant(functools.partial(scale_zero_point, qmin=qmin, qmax=qmax, symmetric=sym))
        s, z = f(lo, hi)
        assert s.shape == (64,) and z.shape == (64,)
        assert np.all(np.asarray(s) > 0)
        np.testing.assert_array_equal(z, np.round(z))
        assert np.all((np.asarray(z) >= qmin) & (np.asarray(z) <= qmax))
        # zero maps exactly onto the grid, and the (widened) range is covered to within a step
        y0 = fake_quant(jnp.zeros((3, 64)), s, z, qmin, qmax, axis=1)
        np.testing.assert_array_equal(y0, 0.0)
        yl = fake_quant(jnp.asarray(np.minimum(lo, 0))[None], s, z, qmin, qmax, axis=1)
        yh = fake_quant(jnp.asarray(np.maximum(hi, 0))[None], s, z, qmin, qmax, axis=1)
        tol = np.asarray(s) * (1.0 if not sym else 0.5) + 1e-5
        assert np.all(np.abs(yl[0] - np.minimum(lo, 0)) <= tol)
        assert np.all(np.abs(yh[0] - np.maximum(hi, 0)) <= tol)


def test_scale_zero_point_errors():
  with pytest.raises(ValueError, match="qmin"):
    scale_zero_point(-1.0, 1.0, 5, 5, symmetric=True)
  with pytest.raises(ValueError, match="qmin"):
    scale_zero_point(-1.0, 1.0, 127, -128, symmetric=False)


# --- quantize / dequantize ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "qmin,qmax,dtype",
  [
    (-128, 127, jnp.int8),
    (-127, 127, jnp.int8),
    (-8, 7, jnp.int8),
    (0, 127, jnp.int8),
    (0, 15, jnp.int8),
    (0, 255, jnp.uint8),
    (0, 254, jnp.uint8),
    (1, 255, jnp.uint8),
    (128, 255, jnp.uint8),
    (-129, 127, jnp.int32),
    (0, 256, jnp.int32),
    (-1, 255, jnp.int32),
  ],
)
def test_int_dtype(qmin, qmax, dtype):
  assert int_dtype(qmin, qmax) == dtype


class QuantizeDequantizeTest(chex.TestCase):
  """quantize / dequantize, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_quantize_dtypes_and_values(self):
    x = jnp.array([-1.0, 0.3, 2.0, -40.0, 0.125, 0.375, 40.0])
    q8 = self.variant(lambda x: quantize(x, 0.25, 0, -128, 127))(x)
    assert q8.dtype == jnp.int8
    np.testing.assert_array_equal(q8, [-4, 1, 8, -128, 0, 2, 127])  # .5 ties to even
    qu = self.variant(lambda x: quantize(x, 0.25, 128, 0, 255))(x)
    assert qu.dtype == jnp.uint8
    np.testing.assert_array_equal(qu, [124, 129, 136, 0, 128, 130, 255])
    q4 = self.variant(lambda x: quantize(x, 0.5, 0, 0, 15))(x)
    assert q4.dtype == jnp.int8  # [0, 15] fits int8, the smallest type
    np.testing.assert_array_equal(q4, [0, 1, 4, 0, 0, 1, 15])
    q32 = self.variant(lambda x: quantize(x, 0.25, 0, -128, 127, dtype=jnp.int32))(x)
    assert q32.dtype == jnp.int32
    np.testing.assert_array_equal(q32, q8)

  @chex.variants(with_jit=True, without_jit=True)
  def test_quantize_int_extremes_do_not_wrap(self):
    x = jnp.array([1e9, -1e9, jnp.inf, -jnp.inf])
    np.testing.assert_array_equal(
      self.variant(lambda x: quantize(x, 1.0, 0, -128, 127))(x), [127, -128, 127, -128]
    )
    np.testing.assert_array_equal(
      self.variant(lambda x: quantize(x, 1.0, 0, 0, 255))(x), [255, 0, 255, 0]
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_dequantize_values_and_inverse(self):
    q = jnp.arange(-128, 128, dtype=jnp.int8)
    d = self.variant(lambda q: dequantize(q, 0.25, 3.0))(q)
    assert d.dtype == jnp.float32
    np.testing.assert_array_equal(d, (np.arange(-128, 128) - 3.0) * 0.25)
    np.testing.assert_array_equal(self.variant(lambda d: quantize(d, 0.25, 3.0, -128, 127))(d), q)
    qu = jnp.arange(0, 256, dtype=jnp.int32).astype(jnp.uint8)
    du = dequantize(qu, 0.1, 128)
    np.testing.assert_array_equal(quantize(du, 0.1, 128, 0, 255), qu)
    assert dequantize(q, 0.5, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(dequantize(q, 0.5), np.arange(-128, 128) * 0.5)  # z=None

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("per_tensor", dict(), ()),
    ("axis_0", dict(axis=0), (6,)),
    ("axis_minus1", dict(axis=-1), (10,)),
    ("group_4", dict(axis=1, group_size=4), (6, 3)),
    ("group_3_vector", dict(axis=1, group_size=3), (4,)),
  )
  def test_dequantize_of_quantize_is_fake_quant(self, kw, pshape):
    rng = np.random.default_rng(len(pshape) + sum(pshape))
    x = rng.normal(0, 2, (6, 10)).astype(np.float32)
    x[0, 0], x[-1, -1] = 100.0, -100.0  # clipped at every scale
    s = rng.uniform(0.01, 0.1, pshape).astype(np.float32)
    z = rng.integers(-20, 20, pshape).astype(np.float32)

    def f(x, s, z):
      q = quantize(x, s, z, -128, 127, **kw)
      return q, dequantize(q, s, z, **kw), fake_quant(x, s, z, -128, 127, **kw)

    q, d, y = self.variant(f)(x, s, z)
    assert q.dtype == jnp.int8
    np.testing.assert_array_equal(d, y)
    assert np.abs(np.asarray(q, np.int32)).max() >= 127  # some clipping exercised

  @chex.variants(with_jit=True, without_jit=True)
  def test_quantize_stochastic_matches_fake_quant(self):
    x = jnp.linspace(-1, 1, 333)
    k = jax.random.key(9)
    q = self.variant(lambda x: quantize(x, 0.03, 2, -16, 15, key=k))(x)
    y = self.variant(lambda x: fake_quant(x, 0.03, 2, -16, 15, key=k))(x)
    np.testing.assert_array_equal(dequantize(q, 0.03, 2), y)
    assert not np.array_equal(q, quantize(x, 0.03, 2, -16, 15))


def test_quantize_dequantize_errors():
  x = jnp.ones((4, 6))
  with pytest.raises(ValueError, match="qmin"):
    quantize(x, 1.0, 0, 4, 4)
  with pytest.raises(ValueError, match="scale"):
    quantize(x, jnp.ones(4), 0, -8, 7, axis=1)
  with pytest.raises(ValueError, match="axis"):
    quantize(x, jnp.ones(6), 0, -8, 7, axis=2)
  with pytest.raises(ValueError, match="floating"):
    quantize(jnp.ones(3, jnp.int32), 1.0, 0, -8, 7)
  q = jnp.ones((4, 6), jnp.int8)
  with pytest.raises(ValueError, match="scale"):
    dequantize(q, jnp.ones(5), axis=1)
  with pytest.raises(ValueError, match="zero_point"):
    dequantize(q, jnp.ones(6), jnp.ones(5), axis=1)
  with pytest.raises(ValueError, match="axis"):
    dequantize(q, jnp.ones(6), axis=-3)
  with pytest.raises(ValueError, match="group_size"):
    dequantize(q, jnp.ones(6), axis=1, group_size=0)


# --- property: dequantize(quantize(x)) == fake_quant(x) exactly -----------------------------------

RANGES = [
  qrange(b, signed=sg, narrow=n) for b in (2, 3, 8) for sg in (True, False) for n in (False, True)
]


@functools.lru_cache(maxsize=None)
def _roundtrip(qmin, qmax):
  return jax.jit(
    lambda x, s, z: (
      dequantize(quantize(x, s, z, qmin, qmax), s, z),
      fake_quant(x, s, z, qmin, qmax),
    )
  )


@settings(max_examples=50, deadline=None)
@given(rng=st.sampled_from(RANGES), data=st.data())
def test_property_dequantize_quantize_equals_fake_quant(rng, data):
  qmin, qmax = rng
  z = np.float32(data.draw(st.integers(qmin, qmax)))
  s = np.float32(data.draw(st.floats(2.0**-12, 16.0, width=32)))
  vals = data.draw(
    st.lists(st.floats(-1e4, 1e4, width=32, allow_subnormal=False), min_size=16, max_size=16)
  )
  x = np.asarray(vals, np.float32)
  d, y = _roundtrip(qmin, qmax)(x, s, z)
  np.testing.assert_array_equal(d, y)
