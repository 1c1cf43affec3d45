"""W4A8 layers train with the integer kernel's forward value (issue 12 item 1, for int4 groups).

The converted model's grouped kernel sums int32 group products rescaled one group at a time; a
float fake-quant dot rounds differently, and a near tie then flips a greedy token (issue 10's
"generation identical" goal). Training therefore computes the forward value with the same
integer arithmetic (ops/product.integer_forward) while the gradients stay the fake-quant
straight-through estimators'. Expected values: the converted model's outputs (bitwise) and the
gradients of the pure fake-quant path (the same layer with the integer forward switched off).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax import QDense, QDenseGeneral, QuantConfig
from qatjax.ops import dot_general as dot_op

GROUPED = dict(weight_granularity="per_group", weight_group_size=32)
CONFIGS = {
  "dynamic_per_token": QuantConfig(
    4, 8, **GROUPED, act_calibration="dynamic", act_granularity="per_token"
  ),
  "observer": QuantConfig(4, 8, **GROUPED),
  "lsq": QuantConfig(4, 8, **GROUPED, method="lsq"),
}
X = jax.random.normal(jax.random.key(1), (2, 8, 100))  # 100 inputs: groups of 32, 32, 32, 4


def _layers(config):
  return {
    "dense": QDense(48, config=config),
    "dense_general": QDenseGeneral((3, 16), config=config),
  }


def _state(layer):
  v = jax.jit(layer.init)(jax.random.key(0), X)
  if "quant_stats" in v:  # observers see the batch first
    _, stats = layer.apply(v, X, mutable=["quant_stats"])
    v = {**v, **stats}
  return v


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("kind", ["dense", "dense_general"])
def test_training_forward_is_the_integer_models_output(kind, config):
  layer = _layers(config)[kind]
  v = _state(layer)
  y_train = jax.jit(layer.apply)(v, X)
  y_int = jax.jit(layer.apply)(qatjax.convert(layer, v, X), X)
  np.testing.assert_array_equal(y_train, y_int)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_gradients_are_the_fake_quant_estimators(config, monkeypatch):
  layer = QDense(48, config=config)
  v = _state(layer)

  # A loss linear in the output: its cotangent does not depend on the forward value, which the
  # two paths round differently.
  c = jax.random.normal(jax.random.key(3), (2, 8, 48))

  def grads():
    def loss(params, x):
      return jnp.sum(c * layer.apply({**v, "params": params}, x))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], X)

  got = grads()
  monkeypatch.setattr(dot_op, "_serves_groups", lambda *a: False)  # the pure fake-quant path
  want = grads()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  assert float(jnp.abs(got[1]).sum()) > 0  # the input gradient flows (STE)


def test_a_disabled_layer_is_the_float_layer():
  config = CONFIGS["dynamic_per_token"]
  layer = QDense(48, config=config)
  v = _state(layer)
  off = qatjax.set_quant_flags(v, enabled=False)
  y_float = nn.Dense(48).apply({"params": v["params"]}, X)
  np.testing.assert_allclose(jax.jit(layer.apply)(off, X), y_float, rtol=1e-6, atol=1e-6)
