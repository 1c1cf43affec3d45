"""Training NNX models: ``nnx.jit`` + ``nnx.Optimizer`` steps, ``qatjax.training`` with an
``nnx.ModelAndOptimizer``, PTQ, orbax checkpoints.

* A hand-written ``nnx.jit`` QAT step compiles once across the whole QAT schedule (float
  warm-up, quantization on, observers frozen: flags flipped from the traced step counter);
  observers update inside the step; LSQ steps learn once quantization is on (not during the
  warm-up, where they get no gradient); ``wrt=nnx.Param`` never puts statistics in the optimizer.
* ``make_train_step`` / ``fit`` on an ``nnx.ModelAndOptimizer`` follow the Linen ``TrainState``
  run of the same model step for step (same losses, same parameters).
* ``calibrate`` and ``mode="ptq"`` change only observer statistics; checkpoints of
  ``nnx.state`` restore bit for bit.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx
from test_layers_helpers import cheap_init, rand

import qatjax
import qatjax.nnx as qnnx
from qatjax import QuantConfig
from qatjax.training import (
  QATSchedule,
  create_train_state,
  cross_entropy,
  fit,
  make_eval_step,
  make_optimizer,
  make_train_step,
  restore_checkpoint,
  save_checkpoint,
)

RULES = {"fc1": QuantConfig(4, 4, method="lsq"), "fc2": QuantConfig(8, 8)}


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 16, kernel_init=cheap_init, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, kernel_init=cheap_init, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, kernel_init=cheap_init, name="fc1")(x))
    return nn.Dense(3, kernel_init=cheap_init, name="fc2")(x)


def _data(n=64, seed=0):
  x = np.asarray(rand((n, 6), seed))
  return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)


def _quantized_mlp(x):
  model = MLP(nnx.Rngs(0))
  qnnx.quantize_model(model, RULES, x[:16])
  return model


def test_nnx_jit_step_compiles_once_through_the_schedule():
  x, y = _data()
  model = _quantized_mlp(x)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  opt_paths = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state))}
  assert "kernel_scale" in opt_paths and not opt_paths & {"input_min", "input_count", "enabled"}
  schedule = QATSchedule(float_steps=2, freeze_observers_step=4)
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(1)
    qnnx.set_quant_flags(model, **schedule.flags(optimizer.step[...]))

    def loss_fn(model):
      return cross_entropy(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  model.train()
  scales, counts, losses = [model.fc1.kernel_scale[...]], [], []
  for i in range(6):
    losses.append(float(train_step(model, optimizer, x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])))
    scales.append(model.fc1.kernel_scale[...])
    counts.append(int(model.fc2.input_count[...]))
  assert len(traces) == 1
  # Warm-up (steps 0, 1): quantization off, the LSQ step gets no gradient; then it learns.
  np.testing.assert_array_equal(scales[2], scales[0])
  assert not np.allclose(scales[3], scales[2]) and not np.allclose(scales[6], scales[3])
  # The observer saw the example batch, then steps 0-3; frozen from step 4.
  assert counts == [2, 3, 4, 5, 5, 5]
  assert bool(model.fc1.enabled[...]) and not bool(model.fc2.observe[...])
  assert all(np.isfinite(losses))


def test_training_api_on_nnx_follows_the_linen_train_state():
  x, y = _data()
  tx = make_optimizer(optax.adam(1e-2), optax.adam(1e-3))
  schedule = QATSchedule(float_steps=1, freeze_observers_step=3)
  linen = qatjax.quantize_model(LinenMLP(), RULES)
  float_vars = jax.jit(LinenMLP().init)(jax.random.key(0), x[:1])
  lv = qatjax.from_float(linen, float_vars, x[:16])
  model = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
  qnnx.load_variables(model, float_vars)
  qnnx.quantize_model(model, RULES, x[:16])
  qnnx.load_variables(model, lv)  # the very same arrays on both sides (see test_nnx_parity)
  traces = []

  def loss_fn(out, labels):
    traces.append(1)
    return cross_entropy(out, labels)

  step, eval_step = make_train_step(loss_fn, schedule), make_eval_step()
  linen_state = create_train_state(linen, tx, jax.random.key(0), x[:1], variables=lv)
  run = dict(epochs=2, batch_size=16, train_step=step, eval_step=eval_step, progress=False)
  linen_state, linen_hist = fit(linen_state, (x, y), eval_data=(x, y), rng=1, **run)
  traces.clear()
  state = nnx.ModelAndOptimizer(model, tx, wrt=nnx.Param)
  state, hist = fit(state, (x, y), eval_data=(x, y), rng=1, **run)
  assert len(traces) == 1  # one compilation of the NNX train step for 8 steps
  assert int(state.step[...]) == 8
  for a, b in zip(hist, linen_hist):
    for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    qnnx.to_variables(model),
    linen_state.variables,
  )


def test_ptq_step_and_calibrate_change_only_observer_statistics():
  x, y = _data()
  model = nnx.Sequential(
    qnnx.QConvBN(1, 4, (3,), config=QuantConfig(act_calibration="minmax"), rngs=nnx.Rngs(0)),
  )
  xs = x[..., None]
  qnnx.init_quantizers(model, xs[:8])
  qnnx.set_quant_flags(model, observe=False)
  before = dict(nnx.to_flat_state(nnx.clone(nnx.state(model))))
  qnnx.calibrate(model, [xs[:8] * 3.0, (xs[8:16], y[8:16])])
  conv = model.layers[0]
  assert int(conv.input_count[...]) == 3 and not bool(conv.observe[...])
  seen = np.concatenate([xs[:8], xs[:8] * 3.0, xs[8:16]])
  assert float(conv.input_max[...]) == seen.max() and float(conv.input_min[...]) == seen.min()
  changed = {
    p[-1]
    for p, v in nnx.to_flat_state(nnx.state(model))
    if not np.array_equal(v.get_value(), before[p].get_value())
  }
  assert changed == {"input_min", "input_max", "input_count"}

  state = nnx.ModelAndOptimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  params = nnx.clone(nnx.state(model, nnx.Param))
  qnnx.set_quant_flags(model, observe=True)
  loss = lambda out, labels: (out**2).mean(axis=(1, 2))
  state, _ = make_train_step(loss, mode="ptq")(state, (xs[:8] * 5.0, y[:8]))
  assert int(state.step[...]) == 1 and int(conv.input_count[...]) == 4
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params)
  np.testing.assert_array_equal(conv.mean[...], before[("layers", 0, "mean")].get_value())


def test_checkpoint_of_nnx_state_restores_exactly(tmp_path):
  x, y = _data()
  model = _quantized_mlp(x)
  state = nnx.ModelAndOptimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  state, _ = make_train_step()(state, (x[:16], y[:16]))
  save_checkpoint(tmp_path, nnx.state(state))
  fresh = nnx.ModelAndOptimizer(_quantized_mlp(x + 1.0), optax.adam(1e-2), wrt=nnx.Param)
  restored = restore_checkpoint(tmp_path, nnx.state(fresh))
  nnx.update(fresh, restored)
  saved, back = nnx.to_flat_state(nnx.state(state)), dict(nnx.to_flat_state(nnx.state(fresh)))
  assert len(saved) == len(back) and any(p[-1] == "input_count" for p, _ in saved)
  for path, var in saved:
    assert type(back[path]) is type(var), path
    np.testing.assert_array_equal(back[path].get_value(), var.get_value(), err_msg=str(path))
