"""fake_quant and lsq_fake_quant against PyTorch's fake-quantization kernels (CPU).

Following /work/shared/notes/pytorch-numerics.md. Random data: even non-negative integer zero
points and no exact .5 ties, where every kernel's forward and backward agree with each other.
Then the hard cases (power-of-two scales, so that every value is exact): ties on k + 0.5 steps
(round half to even), odd, negative and fractional zero points, per-channel exact equality. There
PyTorch's learnable backward disagrees with its own forward on some elements (a quirk the notes
say not to copy); those elements are identified by an emulation of PyTorch's backward, checked
against PyTorch, and left out of the backward comparison (see
``test_lsq_ties_and_odd_negative_fractional_zero_points``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qatjax import fake_quant, lsq_fake_quant, lsq_grad_scale

torch = pytest.importorskip("torch")

# Everything here runs jitted; the un-jitted path is checked against the same numerics (an exact
# numpy reference) in test_fake_quant.py and test_lsq.py.


def no_ties(x, s, axis=None):
  """Nudges elements whose ``x / s`` is within 1e-3 of a .5 tie (per-channel scales on ``axis``)."""
  x = np.asarray(x, np.float32).copy()
  s = np.asarray(s, np.float32)
  if axis is not None:
    s = s.reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])
  v = x * (np.float32(1) / s)
  near = np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-3
  x = np.where(near, x + 0.01 * np.broadcast_to(s, x.shape), x).astype(np.float32)
  return x


def data(seed, shape, spread):
  return np.random.default_rng(seed).normal(0, spread, shape).astype(np.float32)


RANGES = [(-128, 127, 0), (-128, 127, 2), (0, 255, 0), (0, 255, 254), (0, 15, 4)]


@pytest.mark.parametrize("qmin,qmax,z", RANGES)
def test_per_tensor_fake_quant(qmin, qmax, z):
  s = np.float32(0.037)
  x = no_ties(data(qmax + z, (64, 33), 0.8 * s * (qmax - qmin)), s)
  dy = data(1, x.shape, 1.0)
  tx = torch.tensor(x, requires_grad=True)
  ty = torch.fake_quantize_per_tensor_affine(tx, float(s), z, qmin, qmax)
  ty.backward(torch.tensor(dy))

  def f(x, dy):
    y, vjp = jax.vjp(lambda x: fake_quant(x, s, z, qmin, qmax), x)
    return y, vjp(dy)[0]

  y, dx = jax.jit(f)(x, dy)
  np.testing.assert_array_equal(y, ty.detach().numpy())
  np.testing.assert_array_equal(dx, tx.grad.numpy())
  assert 0 < (tx.grad.numpy() == 0).sum() < x.size  # some clipping


def test_per_tensor_boundaries():
  # The notes' boundary examples (exact ties at the ends; the per-tensor STE kernel agrees there).
  x = np.array([127.5, -128.5, 126.5, -127.5, 0.5, 1.5], np.float32)
  tx = torch.tensor(x, requires_grad=True)
  ty = torch.fake_quantize_per_tensor_affine(tx, 1.0, 0, -128, 127)
  ty.sum().backward()
  f = jax.jit(lambda x: jax.vjp(lambda x: fake_quant(x, 1.0, 0, -128, 127), x)[1](jnp.ones(6)))
  y = jax.jit(lambda x: fake_quant(x, 1.0, 0, -128, 127))(x)
  np.testing.assert_array_equal(y, ty.detach().numpy())
  np.testing.assert_array_equal(f(x)[0], tx.grad.numpy())
  np.testing.assert_array_equal(tx.grad.numpy(), [0, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("shape,axis", [((16, 6), 0), ((16, 6), 1), ((3, 4, 5, 6), 3)])
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255)])
def test_per_channel_fake_quant(shape, axis, qmin, qmax):
  c = shape[axis]
  rng = np.random.default_rng(c * 7 + qmax)
  s = rng.uniform(0.01, 0.1, c).astype(np.float32)
  hi = qmax if qmin < 0 else qmax // 2
  z = (2 * rng.integers(0, hi // 2 + 1, c)).astype(np.int32)  # even, non-negative
  x = no_ties(data(c, shape, 0.6 * float(s.mean()) * (qmax - qmin)), s, axis)
  dy = data(2, shape, 1.0)
  tx = torch.tensor(x, requires_grad=True)
  ty = torch.fake_quantize_per_channel_affine(
    tx, torch.tensor(s), torch.tensor(z), axis, qmin, qmax
  )
  ty.backward(torch.tensor(dy))

  def f(x, dy):
    y, vjp = jax.vjp(lambda x: fake_quant(x, s, z, qmin, qmax, axis=axis), x)
    return y, vjp(dy)[0]

  y, dx = jax.jit(f)(x, dy)
  np.testing.assert_array_equal(y, ty.detach().numpy())
  np.testing.assert_array_equal(dx, tx.grad.numpy())


def _sum_tol(n):
  return 1e-5 * np.sqrt(n) + 1e-5


@pytest.mark.parametrize(
  "qmin,qmax,z,learn_zp", [(*r, True) for r in RANGES] + [(*r, False) for r in RANGES if r[2] == 0]
)  # None means z = 0
def test_lsq_per_tensor(qmin, qmax, z, learn_zp):
  shape = (32, 24)
  s = np.float32(0.041)
  x = no_ties(data(abs(qmin) + z + 3, shape, 0.7 * s * (qmax - qmin)), s)
  dy = data(4, shape, 1.0)
  gf = lsq_grad_scale(x.size, qmax)
  tx = torch.tensor(x, requires_grad=True)
  ts = torch.tensor([s], requires_grad=True)
  tz = torch.tensor([float(z)], requires_grad=True)
  ty = torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, qmin, qmax, gf)
  ty.backward(torch.tensor(dy))

  def f(x, s, z, dy):
    zp = z if learn_zp else None
    y, vjp = jax.vjp(lambda x, s: lsq_fake_quant(x, s, zp, qmin, qmax, grad_scale=gf), x, s)
    dx, ds = vjp(dy)
    dz = jax.grad(lambda z: jnp.vdot(lsq_fake_quant(x, s, z, qmin, qmax, grad_scale=gf), dy))(z)
    return y, dx, ds, dz

  y, dx, ds, dz = jax.jit(f)(x, s, np.float32(z), dy)
  np.testing.assert_array_equal(y, ty.detach().numpy())
  np.testing.assert_array_equal(dx, tx.grad.numpy())
  np.testing.assert_allclose(ds, ts.grad.numpy()[0], rtol=1e-4, atol=_sum_tol(x.size) * gf)
  np.testing.assert_allclose(dz, tz.grad.numpy()[0], rtol=1e-4, atol=_sum_tol(x.size) * gf)
  assert abs(float(tz.grad[0])) > 0  # the range is exceeded somewhere


@pytest.mark.parametrize("shape,axis", [((24, 8), 0), ((24, 8), 1), ((2, 3, 4, 5), 1)])
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255)])
def test_lsq_per_channel(shape, axis, qmin, qmax):
  c = shape[axis]
  rng = np.random.default_rng(c + qmax + axis)
  s = rng.uniform(0.02, 0.2, c).astype(np.float32)
  hi = qmax if qmin < 0 else qmax // 2
  z = (2 * rng.integers(0, hi // 2 + 1, c)).astype(np.float32)
  z[0] = 0.0  # z == qmin for the unsigned ranges
  x = no_ties(data(c + 1, shape, 0.6 * float(s.mean()) * (qmax - qmin)), s, axis)
  dy = data(5, shape, 1.0)
  gf = lsq_grad_scale(x.size, qmax)  # PyTorch: the whole tensor's numel even per channel
  tx = torch.tensor(x, requires_grad=True)
  ts = torch.tensor(s, requires_grad=True)
  tz = torch.tensor(z, requires_grad=True)
  ty = torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, axis, qmin, qmax, gf)
  ty.backward(torch.tensor(dy))

  def f(x, s, z, dy):
    y, vjp = jax.vjp(
      lambda x, s, z: lsq_fake_quant(x, s, z, qmin, qmax, axis=axis, grad_scale=gf), x, s, z
    )
    return (y, *vjp(dy))

  y, dx, ds, dz = jax.jit(f)(x, s, z, dy)
  n = x.size // c
  np.testing.assert_array_equal(y, ty.detach().numpy())
  np.testing.assert_array_equal(dx, tx.grad.numpy())
  np.testing.assert_allclose(ds, ts.grad.numpy(), rtol=1e-4, atol=_sum_tol(n) * gf)
  np.testing.assert_allclose(dz, tz.grad.numpy(), rtol=1e-4, atol=_sum_tol(n) * gf)
  assert np.abs(tz.grad.numpy()).max() > 0


# --- ties, odd / negative / fractional zero points, exact per-channel equality -------------------
#
# Power-of-two scales make x * (1 / s) and z + x * (1 / s) exact, so ties (x on k + 0.5 steps) are
# real ties for both libraries and every value below is exact: the comparisons are exact.

S2 = np.float32(2.0**-4)


def grid(lo, hi, s):
  """Every quarter step from ``lo`` to ``hi`` steps: integers, ties (k + 0.5) and in-betweens."""
  return (np.arange(4 * lo, 4 * hi + 1) / 4).astype(np.float32) * s


def round_half_even(v):
  return np.round(v)  # numpy rounds half to even


def torch_fq_and_grad(fq, x, dy):
  tx = torch.tensor(x, requires_grad=True)
  ty = fq(tx)
  ty.backward(torch.tensor(dy))
  return ty.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize(
  "qmin,qmax,z", [(-128, 127, -5), (-128, 127, 3), (0, 255, 7), (-8, 7, -3), (-8, 7, 7)]
)
def test_per_tensor_ties_and_odd_negative_zero_points(qmin, qmax, z):
  x = grid(qmin - z - 6, qmax - z + 6, S2)
  dy = data(7, x.shape, 1.0)
  want = torch_fq_and_grad(
    lambda t: torch.fake_quantize_per_tensor_affine(t, float(S2), z, qmin, qmax), x, dy
  )
  f = jax.jit(lambda x, dy: jax.vjp(lambda x: fake_quant(x, S2, z, qmin, qmax), x)[1](dy)[0])
  y = jax.jit(lambda x: fake_quant(x, S2, z, qmin, qmax))(x)
  np.testing.assert_array_equal(y, want[0])
  np.testing.assert_array_equal(f(x, dy), want[1])
  # Ties round half to even: k + 0.5 goes to the even neighbour (upwards for half of them).
  ties = (x / S2) % 1 == 0.5
  k = np.round(x[ties] / S2)
  inside = (k + z >= qmin) & (k + z <= qmax)
  assert np.all(k % 2 == 0) and inside.sum() > 10
  np.testing.assert_array_equal(np.asarray(y)[ties][inside], k[inside] * S2)


def test_per_channel_ties_exact():
  s = np.array([2.0**-3, 2.0**-4, 2.0**-5], np.float32)
  z = np.array([-3, 5, 0], np.int32)  # odd, negative
  steps = grid(-14, 14, np.float32(1))  # in steps of each channel's scale
  x = (steps[:, None] * s).astype(np.float32)
  dy = data(8, x.shape, 1.0)
  want = torch_fq_and_grad(
    lambda t: torch.fake_quantize_per_channel_affine(t, torch.tensor(s), torch.tensor(z), 1, -8, 7),
    x,
    dy,
  )
  f = jax.jit(lambda x, dy: jax.vjp(lambda x: fake_quant(x, s, z, -8, 7, axis=1), x)[1](dy)[0])
  np.testing.assert_array_equal(jax.jit(lambda x: fake_quant(x, s, z, -8, 7, axis=1))(x), want[0])
  np.testing.assert_array_equal(f(x, dy), want[1])


def lsq_elementwise(x, s, z, q, qmin, qmax, dy, gf):
  """PyTorch's per-element LSQ backward (the notes' formulas) for the integer ``q`` and zero point
  ``z`` it uses: ``(dx, ds_i, dz_i)``."""
  inr = (q >= qmin) & (q <= qmax)
  xfq = (np.clip(q, qmin, qmax) - z) * s
  dx = np.where(inr, dy, 0.0)
  ds = gf * dy * np.where(q < qmin, qmin - z, np.where(q > qmax, qmax - z, (xfq - x) / s))
  dz = np.where(inr, 0.0, -dy * s * gf)
  return dx, ds, dz


def torch_lsq(per_channel, x, s, z, qmin, qmax, gf, dy):
  tx = torch.tensor(x, requires_grad=True)
  ts = torch.tensor(np.atleast_1d(s), requires_grad=True)
  tz = torch.tensor(np.atleast_1d(z).astype(np.float32), requires_grad=True)
  if per_channel:
    ty = torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, 1, qmin, qmax, gf)
  else:
    ty = torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, qmin, qmax, gf)
  ty.backward(torch.tensor(dy))
  ds, dz = ts.grad.numpy(), tz.grad.numpy()
  return ty.detach().numpy(), tx.grad.numpy(), *((ds, dz) if per_channel else (ds[0], dz[0]))


LSQ_CASES = {
  # per tensor: z, (qmin, qmax)
  "odd": (3.0, (-8, 7)),
  "negative_even": (-2.0, (-8, 7)),
  "negative_odd": (-5.0, (-128, 127)),
  "fraction_tie": (2.5, (-8, 7)),  # rounds (half to even) to 2
  "fraction": (3.4, (-8, 7)),
  "negative_fraction_tie": (-1.5, (-8, 7)),  # rounds to -2
  # per channel: one zero point per channel
  "per_channel": (np.array([3.0, -5.0, 2.5, -0.5], np.float32), (-8, 7)),
}


@pytest.mark.parametrize("case", sorted(LSQ_CASES))
def test_lsq_ties_and_odd_negative_fractional_zero_points(case):
  z, (qmin, qmax) = LSQ_CASES[case]
  per_channel = np.ndim(z) == 1
  z_used = np.clip(round_half_even(z), qmin, qmax)  # the forward's zero point, in both libraries
  lo, hi = qmin - int(np.max(z_used)) - 5, qmax - int(np.min(z_used)) + 5
  x = grid(lo, hi, S2)
  s = S2
  if per_channel:
    s = np.array([S2, 2 * S2, S2 / 2, S2], np.float32)
    x = (x[:, None] / S2 * s).astype(np.float32)
  sb = np.broadcast_to(s, x.shape)
  v = x / sb  # exact
  gf = lsq_grad_scale(x.size, qmax)
  dy = data(9, x.shape, 1.0)
  # PyTorch's backward differs from its own forward on some elements (notes, "quirks NOT to
  # copy"): per tensor it uses trunc(z + 0.5) for the zero point (not the forward's round half to
  # even: -3 -> -2, 2.5 -> 3) and, in both kernels, rounds z + x / s together, so at a tie an odd z
  # moves q by one. qatjax's backward is its forward's (q = round(z) + round(x / s)). Emulate
  # PyTorch's backward, check the emulation against PyTorch, and compare qatjax with PyTorch where
  # PyTorch's backward agrees with its forward: the cotangent is zero elsewhere.
  z_bwd = z_used if per_channel else np.trunc(np.float32(z) + np.float32(0.5))
  theirs = lsq_elementwise(x, sb, z_bwd, round_half_even(z_bwd + v), qmin, qmax, 1.0, 1.0)
  ours = lsq_elementwise(x, sb, z_used, z_used + round_half_even(v), qmin, qmax, 1.0, 1.0)
  agree = np.all([a == b for a, b in zip(theirs, ours)], axis=0)
  assert agree.sum() > x.size // 4, agree.mean()

  y_t, dx_t, ds_t, dz_t = torch_lsq(per_channel, x, s, z, qmin, qmax, gf, dy)
  axes = 0 if per_channel else None
  emulated = lsq_elementwise(x, sb, z_bwd, round_half_even(z_bwd + v), qmin, qmax, dy, gf)
  np.testing.assert_array_equal(dx_t, emulated[0])
  np.testing.assert_allclose(ds_t, emulated[1].sum(axes), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dz_t, emulated[2].sum(axes), rtol=1e-5, atol=1e-6)

  dy_agree = np.where(agree, dy, 0.0).astype(np.float32)
  _, dx_t, ds_t, dz_t = torch_lsq(per_channel, x, s, z, qmin, qmax, gf, dy_agree)
  kw = dict(axis=1) if per_channel else {}

  @jax.jit
  def ours_vjp(x, s, z, dy):
    y, vjp = jax.vjp(
      lambda x, s, z: lsq_fake_quant(x, s, z, qmin, qmax, grad_scale=gf, **kw), x, s, z
    )
    return (y, *vjp(dy))

  y, dx, ds, dz = ours_vjp(x, s, np.float32(z) if not per_channel else z, dy_agree)
  np.testing.assert_array_equal(y, y_t)  # forwards agree everywhere, ties included
  np.testing.assert_array_equal(dx, dx_t)
  np.testing.assert_allclose(ds, ds_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dz, dz_t, rtol=1e-5, atol=1e-6)
  if np.all(z_bwd == z_used):
    assert np.any(dz_t != 0)  # elements out of range are compared too
  else:  # PyTorch's clipped elements use its other zero point: none of them agree
    assert not np.any(agree & (ours[2] != 0))
