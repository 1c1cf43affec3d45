"""qatjax.training: separate optimizers for learned quantizer parameters and weights."""

import flax.linen as nn
import jax
import numpy as np
import optax

from qatjax import QDense, QuantConfig
from qatjax.training import create_train_state, make_optimizer, make_train_step, quant_param_labels

LSQ = QuantConfig(method="lsq")
QUANT = {"kernel_scale", "input_scale", "input_zero_point", "input_alpha"}


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(QDense(8, config=LSQ)(x))
    return QDense(3, config=QuantConfig(method="lsq", pact=True))(x)


def leaves(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_labels():
  x = np.ones((2, 4), np.float32)
  params = jax.eval_shape(Net().init, jax.random.key(0), x)["params"]
  labels = quant_param_labels(params)
  assert labels["QDense_0"] == {
    "bias": "weights",
    "input_scale": "quant",
    "input_zero_point": "quant",
    "kernel": "weights",
    "kernel_scale": "quant",
  }
  assert labels["QDense_1"]["input_alpha"] == "quant"


def run(weights_lr, quant_lr):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  y = rng.integers(0, 3, 16).astype(np.int32)
  tx = make_optimizer(optax.sgd(weights_lr), optax.adamw(quant_lr, weight_decay=0.1))
  s0 = create_train_state(Net(), tx, jax.random.key(0), x)
  s = s0
  step = make_train_step()
  for _ in range(2):
    s, _ = step(s, (x, y))
  return leaves(s0.params), leaves(s.params)


def test_quant_params_use_quant_optimizer():
  before, after = run(weights_lr=0.1, quant_lr=0.0)  # lr 0 (and decay scaled by lr) for scales
  for k in before:
    same = np.array_equal(before[k], after[k])
    assert same == any(f"'{n}'" in k for n in QUANT), k
  before, after = run(weights_lr=0.0, quant_lr=0.01)
  for k in before:
    same = np.array_equal(before[k], after[k])
    assert same == (not any(f"'{n}'" in k for n in QUANT)), k
