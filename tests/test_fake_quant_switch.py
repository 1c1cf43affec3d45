"""A layer's ``enabled`` switch inside the straight-through estimators, and the unclipped STE of
dynamic activations.

``broadcast_fake_quant(..., enabled=e)`` is ``where(e, fake_quant(x), x)`` with its gradients
(``dy`` to ``x`` where off, no gradient to the parameters), decided inside the kernels so that
the backward pass needs no select of its own. Dynamic activations, whose scale and zero point
come from the tensor's own range, pass ``dy`` to every element. Expected values: numpy's
fake quantization and hand-derived gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qatjax.core.config import QuantConfig
from qatjax.core.fake_quant import broadcast_fake_quant
from qatjax.ops.act_quantizers import act_state, apply_act

X = jnp.array([[-9.0, -1.26, 0.2, 0.74], [2.5, 7.9, -0.49, 3.1]], jnp.float32)
S = jnp.array([[0.5], [0.25]], jnp.float32)  # per row
DY = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], jnp.float32)
QMIN, QMAX = -4, 3  # 3 bits: -9.0, 2.5, 7.9 and 3.1 lie outside [qmin, qmax] * s


def _np_fake_quant(x, s):
  q = np.round(np.asarray(x) / np.asarray(s))
  return np.clip(q, QMIN, QMAX) * np.asarray(s), (q >= QMIN) & (q <= QMAX)


def _value_and_grads(kind, enabled):
  def f(x, s, on):
    learned = kind == "learned"
    covers = kind == "covers_range"
    kw = dict(learned=learned, covers_range=covers, enabled=on)
    return broadcast_fake_quant(x, s, None, QMIN, QMAX, **kw)

  y, vjp = jax.vjp(lambda x, s: f(x, s, enabled), X, S)
  return y, *vjp(DY)


VARIANTS = (jax.jit, lambda f: f)  # jitted and not


@pytest.mark.parametrize("kind", ["clipped", "covers_range", "learned"])
def test_off_is_the_identity_with_its_gradient(kind):
  for variant in VARIANTS:
    y, dx, ds = variant(lambda on: _value_and_grads(kind, on))(jnp.bool_(False))
    np.testing.assert_array_equal(y, X)
    np.testing.assert_array_equal(dx, DY)  # clipped elements too
    np.testing.assert_array_equal(ds, np.zeros_like(S))


@pytest.mark.parametrize("kind", ["clipped", "covers_range", "learned"])
def test_on_is_the_fake_quantization(kind):
  want_y, in_range = _np_fake_quant(X, S)
  for variant in VARIANTS:
    y, dx, ds = variant(lambda on: _value_and_grads(kind, on))(jnp.bool_(True))
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-7)
    # covers_range promises no clipped element: it passes dy everywhere; the others mask it.
    np.testing.assert_array_equal(dx, DY if kind == "covers_range" else np.where(in_range, DY, 0))
    if kind == "learned":  # LSQ's step gradient is not zero here (its own tests check its value)
      assert np.all(np.abs(np.asarray(ds)) > 0)
    else:
      np.testing.assert_array_equal(ds, np.zeros_like(S))


def test_switch_is_traced_not_static():
  """One compiled program serves both settings (a QAT schedule turns layers on mid-training)."""
  traces = []

  @jax.jit
  def f(on):
    traces.append(on)
    return _value_and_grads("learned", on)

  y_off = f(jnp.bool_(False))[0]
  y_on = f(jnp.bool_(True))[0]
  assert len(traces) == 1
  np.testing.assert_array_equal(y_off, X)
  assert not np.array_equal(y_on, X)


DYNAMIC = QuantConfig(8, 8, act_calibration="dynamic", act_granularity="per_token").act_quant


def test_dynamic_activations_pass_the_gradient_to_every_element():
  """Per-token affine range of row 0: [-11.5, 243.5], s = 1, z = qmin - round(-11.5) = 12; then
  243.5 rounds (half to even) to 244 and 244 + 12 = 256 > qmax = 255: the zero point's rounding
  clips the row's maximum by one step. The forward clips it (the integer model does the same);
  the gradient still reaches it (the range is the row's own: nothing is clipped on purpose)."""
  x = jnp.array([[-11.5, 0.3, 100.25, 243.5], [-1.0, 0.5, 2.0, 3.0]], jnp.float32)
  state = act_state(None, x, DYNAMIC, None, contract_axes=(1,))
  s, z = (np.asarray(a) for a in state)
  np.testing.assert_array_equal(s[0], [1.0])
  np.testing.assert_array_equal(z[0], [12.0])
  y, vjp = jax.vjp(lambda x: apply_act(x, DYNAMIC, state, jnp.bool_(True)), x)
  np.testing.assert_array_equal(y[0], [-12.0, 0.0, 100.0, 243.0])  # 243.5 clipped to 255 - 12
  dy = jnp.arange(1.0, 9.0).reshape(2, 4)
  np.testing.assert_array_equal(vjp(dy)[0], dy)
