"""Learned scales never die: the ``eps`` clamp on a scale is straight-through.

A learned LSQ step (or PACT alpha) that an optimizer update pushed to or below ``eps`` used to get
exactly zero gradient from ``jnp.maximum(s, eps)``, so it stayed there. Now the forward uses
``max(s, eps)`` and the gradient passes: from ``s = -0.01`` and ``s = 1e-9`` the gradient is the one
at ``eps`` (derived by hand below) and a few Adam steps bring ``s`` back above ``eps``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qatjax import EPS, QDense, QuantConfig, fake_quant, lsq_fake_quant, pact

DEAD = [-0.01, 1e-9]
X = jnp.array([-1.0, -0.5, 0.25, 0.75])
DY = jnp.array([1.0, 2.0, 3.0, 4.0])


def _adam_steps(loss, p0, steps=5, lr=1e-2):
  """``steps`` Adam updates of ``p0`` on ``loss``, in one jitted scan; returns the trajectory."""
  opt = optax.adam(lr)

  def step(carry, _):
    p, state = carry
    upd, state = opt.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, upd)
    return (p, state), p

  _, path = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=steps))(p0)
  return path


@pytest.mark.parametrize("s0", DEAD)
def test_lsq_step_gradient_passes_the_clamp(s0):
  # Forward at eps: every |x| / eps is far outside [-8, 7], so ds = sum(dy * (qmin or qmax))
  # = 1 * -8 + 2 * -8 + 3 * 7 + 4 * 7 = 25 (grad_scale 1); jnp.maximum would give 0.
  ds = jax.grad(lambda s: jnp.vdot(lsq_fake_quant(X, s, None, -8, 7), DY))(jnp.float32(s0))
  assert float(ds) == 25.0


@pytest.mark.parametrize("s0", DEAD)
def test_pact_alpha_gradient_passes_the_clamp(s0):
  # Forward at alpha = eps: every x >= eps saturates, so dalpha = sum(dy where x >= eps) = 3 + 4.
  da = jax.grad(lambda a: jnp.vdot(pact(X, a, 4), DY))(jnp.float32(s0))
  assert float(da) == 7.0


def test_observer_scale_still_gets_no_gradient():
  ds = jax.grad(lambda s: jnp.vdot(fake_quant(X, s, 0.0, -8, 7), DY))(jnp.float32(-0.01))
  assert float(ds) == 0.0


@pytest.mark.parametrize("s0", DEAD)
def test_adam_revives_lsq_step_and_pact_alpha(s0):
  x = jnp.linspace(-2.0, 2.0, 64)
  relu = jnp.maximum(x, 0.0)
  lsq_path = _adam_steps(lambda s: jnp.mean((lsq_fake_quant(x, s, None, -8, 7) - x) ** 2), s0)
  pact_path = _adam_steps(lambda a: jnp.mean((pact(relu, a, 4) - relu) ** 2), s0)
  for path in (lsq_path, pact_path):
    assert float(path[-1]) > EPS, np.asarray(path)
    assert np.all(np.diff(np.asarray(path)) > 0), np.asarray(path)  # climbs every step


@pytest.mark.parametrize("s0", DEAD)
def test_adam_revives_qdense_lsq_scales(s0):
  cfg = QuantConfig(4, 4, method="lsq")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  layer = QDense(5, config=cfg)
  v = layer.init(jax.random.key(0), x)
  target = x @ v["params"]["kernel"] + v["params"]["bias"]
  dead = {"kernel_scale": jnp.full((5,), s0, jnp.float32), "input_scale": jnp.float32(s0)}
  p0 = {**v["params"], **dead}
  rest = {k: c for k, c in v.items() if k != "params"}

  def loss(p):
    return jnp.mean((layer.apply({**rest, "params": p}, x) - target) ** 2)

  g = jax.jit(jax.grad(loss))(p0)
  for name in dead:
    assert np.all(np.asarray(g[name]) != 0), (name, g[name])
  p = jax.tree_util.tree_map(lambda a: a[-1], _adam_steps(loss, p0))
  for name in dead:
    assert np.all(np.asarray(p[name]) > EPS), (name, p[name])
