"""qatjax.training: TrainState creation, train / eval steps (one compilation), metrics, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qatjax import QConvBN, QDense, QuantConfig, from_float, quantize_model
from qatjax.training import (
  TrainState,
  create_train_state,
  cross_entropy,
  make_eval_step,
  make_train_step,
)


class MLP(nn.Module):
  config: QuantConfig | None = QuantConfig()

  @nn.compact
  def __call__(self, x):
    x = nn.relu(QDense(16, config=self.config)(x))
    return QDense(3, config=self.config)(x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(QConvBN(4, (3, 3), config=QuantConfig())(x, use_running_average=not train))
    return QDense(3, config=QuantConfig())(x.reshape(x.shape[0], -1))


def data(n=16, d=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)


def counting(calls):
  def loss(logits, labels):
    calls.append(1)  # runs only while tracing
    return cross_entropy(logits, labels)

  return loss


def test_create_train_state_collections():
  x, _ = data()
  s = create_train_state(MLP(), optax.adam(1e-3), jax.random.key(0), x[:2])
  assert isinstance(s, TrainState) and s.step.dtype == jnp.int32 and int(s.step) == 0
  assert sorted(s.variables) == ["params", "quant_stats"] and s.batch_stats == {}
  assert "quant_record" not in s.variables
  f = create_train_state(MLP(config=None), optax.adam(1e-3), 0, x[:2])
  assert f.quant_stats == {} and sorted(f.variables) == ["params"]


def test_create_train_state_from_float_variables():
  x, _ = data()
  float_model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  fvars = float_model.init(jax.random.key(0), x)
  qmodel = quantize_model(float_model, QuantConfig(method="lsq"))
  qvars = from_float(qmodel, fvars, x)
  s = create_train_state(qmodel, optax.sgd(0.1), None, x, variables=qvars)
  np.testing.assert_array_equal(
    s.params["layers_0"]["kernel"], fvars["params"]["layers_0"]["kernel"]
  )
  assert "kernel_scale" in s.params["layers_0"]
  with pytest.raises(
    ValueError,
    match=r"params/layers_0/kernel has shape \(5, 8\) in the given "
    r"variables but \(3, 8\) in the model",
  ):
    create_train_state(qmodel, optax.sgd(0.1), None, x[:, :3], variables=qvars)
  with pytest.raises(ValueError, match="'params'"):
    create_train_state(qmodel, optax.sgd(0.1), None, x, variables={"quant_stats": {}})


def test_train_step_compiles_once_and_learns():
  x, y = data(64)
  calls = []
  step = make_train_step(loss_fn=counting(calls))
  s = create_train_state(MLP(), optax.adam(1e-2), jax.random.key(0), x[:1])
  losses = []
  for i in range(12):
    sl = slice((i % 4) * 16, (i % 4 + 1) * 16)
    before = s
    s, m = step(s, [x[sl], y[sl]] if i % 2 else (x[sl], y[sl]))  # list or tuple: same program
    losses.append(float(m["loss"]))
  assert len(calls) == 1 and step.jitted._cache_size() == 1
  assert int(s.step) == 12 and sorted(m) == ["accuracy", "loss"]
  # The metrics are the step's forward pass (observers updating) on its batch, before the update.
  logits, _ = jax.jit(lambda v, x: MLP().apply(v, x, mutable=["quant_stats"]))(
    before.variables, x[sl]
  )
  want_loss = np.mean(np.asarray(cross_entropy(logits, y[sl])))
  np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
  assert float(m["accuracy"]) == np.mean(np.argmax(np.asarray(logits), -1) == y[sl])
  assert losses[-1] < losses[0]
  assert int(s.quant_stats["QDense_0"]["input_count"]) == 12  # observers updated in the step


def test_train_step_updates_batch_stats_and_eval_uses_running_stats():
  x = np.random.default_rng(0).normal(size=(8, 6, 6, 1)).astype(np.float32)
  y = np.arange(8) % 3
  s = create_train_state(ConvNet(), optax.sgd(0.1), jax.random.key(0), x[:1])
  s2, _ = make_train_step(apply_kwargs={"train": True})(s, (x, y))
  assert not np.array_equal(s2.batch_stats["QConvBN_0"]["mean"], s.batch_stats["QConvBN_0"]["mean"])
  ev = make_eval_step(apply_kwargs={"train": False})
  m = ev(s2, (x, y))
  assert float(m["count"]) == 8.0 and sorted(m) == ["accuracy", "count", "loss"]
  # eval does not change anything and is a pure function of the state
  np.testing.assert_array_equal(ev(s2, (x, y))["loss"], m["loss"])


def test_eval_mask_ignores_padding():
  x, y = data(8)
  s = create_train_state(MLP(), optax.sgd(0.1), jax.random.key(0), x[:1])
  s, _ = make_train_step()(s, (x, y))
  ev = make_eval_step()
  full = ev(s, (x[:5], y[:5]))
  xp, yp = np.concatenate([x[:5], 100 * x[5:]]), np.concatenate([y[:5], y[5:]])
  masked = ev(s, (xp, yp, np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)))
  np.testing.assert_allclose(masked["loss"], full["loss"], rtol=1e-6)
  np.testing.assert_allclose(masked["accuracy"], full["accuracy"])
  assert float(masked["count"]) == 5.0


def test_float_model_and_custom_loss():
  x, y = data()
  s = create_train_state(MLP(config=None), optax.sgd(0.1), 0, x[:1])
  mse = lambda out, t: jnp.mean((out[:, 0] - t) ** 2)
  s, m = make_train_step(loss_fn=mse)(s, (x, y.astype(np.float32)))
  assert sorted(m) == ["loss"] and int(s.step) == 1


def test_bad_arguments():
  x, y = data()
  s = create_train_state(MLP(config=None), optax.sgd(0.1), 0, x[:1])
  with pytest.raises(ValueError, match="mode"):
    make_train_step(mode="train")
  with pytest.raises(ValueError, match="schedule"):
    make_train_step(schedule=3)
  with pytest.raises(ValueError, match="mutable"):
    make_train_step(apply_kwargs={"mutable": True})
  with pytest.raises(ValueError, match="batch must be a tuple"):
    make_train_step()(s, x)
  with pytest.raises(ValueError, match="batch must be a tuple"):
    make_train_step()(s, (x, y, y))
  with pytest.raises(ValueError, match="quant_stats"):
    make_train_step(mode="ptq")(s, (x, y))
  with pytest.raises(ValueError, match="optax"):
    create_train_state(MLP(), "adam", 0, x[:1])


def test_one_hot_and_soft_targets_train_like_integer_labels():
  """One-hot targets give the integer labels' step exactly; soft targets (mixup, distillation)
  give numpy's -sum(t * log_softmax) loss."""
  x, y = data()
  s = create_train_state(MLP(), optax.sgd(0.1), jax.random.key(0), x[:1])
  step = make_train_step()
  s_int, m_int = step(s, (x, y))
  s_hot, m_hot = step(s, (x, np.eye(3, dtype=np.float32)[y]))
  np.testing.assert_allclose(m_hot["loss"], m_int["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_hot["accuracy"], m_int["accuracy"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s_hot.params, s_int.params)
  soft = np.random.default_rng(1).dirichlet(np.ones(3), size=len(y)).astype(np.float32)
  logits, _ = s.apply_fn(s.variables, x, mutable=["quant_stats"])  # the step's forward pass
  logits = np.asarray(logits, np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  _, m_soft = step(s, (x, soft))
  np.testing.assert_allclose(m_soft["loss"], np.mean(-(soft * log_p).sum(-1)), rtol=1e-5)


@pytest.mark.parametrize(
  "labels,given",
  [
    (np.zeros((16, 1), np.int32), r"\(16, 1\)"),  # class ids with a trailing axis
    (np.zeros((16, 4), np.float32), r"\(16, 4\)"),  # targets for 4 classes, 3 logits
    (np.zeros(16, np.float32), r"\(16,\) and dtype float32"),  # float class ids
  ],
)
def test_labels_of_another_shape_are_a_clear_error(labels, given):
  x, _ = data()
  s = create_train_state(MLP(), optax.sgd(0.1), jax.random.key(0), x[:1])
  allowed = r"logits of shape \(16, 3\).*class ids of shape \(16,\).*targets of shape \(16, 3\)"
  with pytest.raises(ValueError, match=f"labels of shape {given}.*{allowed}"):
    make_train_step()(s, (x, labels))
