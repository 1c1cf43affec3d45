"""fake_quant and lsq_fake_quant against PyTorch's fake-quantization kernels (CPU).

Following /work/shared/notes/pytorch-numerics.md: even non-negative integer zero points and data
without exact .5 ties (PyTorch's learnable backward rounds ``z + x * inv`` together, sometimes with
an FMA, so single elements at ties may legitimately differ).
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
  np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-6, atol=1e-7)
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
  np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(dx, tx.grad.numpy())
  np.testing.assert_allclose(ds, ts.grad.numpy(), rtol=1e-4, atol=_sum_tol(n) * gf)
  np.testing.assert_allclose(dz, tz.grad.numpy(), rtol=1e-4, atol=_sum_tol(n) * gf)
  assert np.abs(tz.grad.numpy()).max() > 0
