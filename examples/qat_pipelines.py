"""The steps of ``mnist_qat.py`` in the two Flax APIs, side by side.

* :class:`LinenPipeline`: a Linen module plus its variables dict; ``qatjax.from_float`` makes the
  QAT variables, a ``TrainState`` trains them, ``qatjax.convert`` returns integer variables.
* :class:`NNXPipeline`: one ``nnx.Module`` holding its state; ``qatjax.nnx.quantize_model``
  turns (a clone of) the float model into the QAT model in place, an ``nnx.ModelAndOptimizer``
  trains it with the same ``qatjax.training`` steps, ``qatjax.nnx.convert`` returns the integer
  model.

Both run the same CNN (conv-BN-relu, conv-BN-relu, dense) with the same quantized ops, from the
same initial weights (the NNX model is given the Linen model's initial variables), so the two
give the same table.
"""

from __future__ import annotations

import math
import time

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

import qatjax
import qatjax.nnx as qnnx
from qatjax import QConvBN, QDense, QuantConfig
from qatjax.training import create_train_state, fit, make_eval_step, make_train_step

TRAIN, EVAL = {"train": True}, {"train": False}


class CNN(nn.Module):
  """conv(32, 3x3)-BN-relu, conv(64, 3x3, stride 2)-BN-relu, flatten, dense(10)."""

  config: QuantConfig | qatjax.QuantRules | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(QConvBN(32, (3, 3), config=self.config, name="conv0")(x, not train))
    x = nn.relu(QConvBN(64, (3, 3), strides=2, config=self.config, name="conv1")(x, not train))
    return QDense(10, config=self.config, name="dense")(x.reshape(x.shape[0], -1))


class NNXCNN(nnx.Module):
  """The same CNN in NNX: float ``QConvBN`` layers (``config=None``) and an ``nnx.Linear``;
  ``qatjax.nnx.quantize_model`` gives them their configs."""

  def __init__(self, image_shape, *, rngs: nnx.Rngs):
    h, w, c = image_shape
    self.conv0 = qnnx.QConvBN(c, 32, (3, 3), rngs=rngs)
    self.conv1 = qnnx.QConvBN(32, 64, (3, 3), strides=2, rngs=rngs)
    self.dense = nnx.Linear(math.ceil(h / 2) * math.ceil(w / 2) * 64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(nnx.relu(self.conv0(x))))
    return self.dense(x.reshape(x.shape[0], -1))


def _padded_batches(x, batch_size):
  """``(batch, real rows)`` with the last batch padded to the compiled shape."""
  for i in range(0, len(x), batch_size):
    xb = x[i : i + batch_size]
    pad = batch_size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
    yield xb, batch_size - pad


def _fit(state, data, train_kwargs, eval_kwargs, *, epochs, batch_size, schedule, seed, progress):
  step = make_train_step(schedule=schedule, apply_kwargs=train_kwargs)
  t0 = time.perf_counter()
  state, _ = fit(
    state,
    (data.x_train, data.y_train),
    epochs=epochs,
    batch_size=batch_size,
    train_step=step,
    eval_step=make_eval_step(apply_kwargs=eval_kwargs),
    eval_data=(data.x_test, data.y_test),
    rng=seed,
    progress=progress,
  )
  return state, time.perf_counter() - t0  # (the evaluation waited for the last step)


class LinenPipeline:
  """Models are ``(module, variables)`` pairs; every step returns a new pair."""

  name = "linen"

  def __init__(self, data, seed: int):
    self.data, self.seed = data, seed

  def float_model(self):
    return CNN(None), None  # variables: initialised by create_train_state

  def train(self, m, *, epochs, batch_size, tx, schedule, progress):
    model, variables = m
    state = create_train_state(
      model, tx, jax.random.key(self.seed), self.data.x_train[:1], variables=variables, **EVAL
    )
    kw = dict(epochs=epochs, batch_size=batch_size, schedule=schedule, progress=progress)
    state, seconds = _fit(state, self.data, TRAIN, EVAL, seed=self.seed, **kw)
    return (model, state.variables), seconds

  def quantize(self, m, config, calib_x):
    qmodel = CNN(config)
    return qmodel, qatjax.from_float(qmodel, m[1], calib_x, **EVAL)

  def calibrate(self, m, batches):
    return m[0], qatjax.training.calibrate(m[0], batches, variables=m[1], apply_kwargs=EVAL)

  def convert(self, m, calib_x):
    return m[0], qatjax.convert(m[0], m[1], calib_x, **EVAL)

  def predict(self, m, x, batch_size):
    """Logits in evaluation mode, batched with one compiled (padded) batch shape."""
    model, variables = m
    apply = jax.jit(lambda v, xb: model.apply(v, xb, **EVAL))
    return np.concatenate(
      [np.asarray(apply(variables, xb))[:n] for xb, n in _padded_batches(x, batch_size)]
    )

  def float_bytes(self, m):
    return qatjax.model_size(m[1], collections=("params", "batch_stats")).total

  def int_bytes(self, m):
    return qatjax.model_size(m[1]).total


class NNXPipeline:
  """Models are ``nnx.Module`` objects; every step works on a clone (``nnx.clone`` shares the
  arrays, nothing is copied), so the float model stays available for every precision."""

  name = "nnx"

  def __init__(self, data, seed: int):
    self.data, self.seed = data, seed

  def float_model(self):
    model = nnx.eval_shape(lambda: NNXCNN(self.data.x_train.shape[1:], rngs=nnx.Rngs(0)))
    # The Linen pipeline's initial weights (create_train_state's init), for the same table.
    x0 = self.data.x_train[:1]
    init = jax.jit(lambda key, x: CNN(None).init(key, x, **EVAL))
    qnnx.load_variables(model, init(jax.random.key(self.seed), x0))
    return model

  def train(self, m, *, epochs, batch_size, tx, schedule, progress):
    state = nnx.ModelAndOptimizer(nnx.clone(m), tx, wrt=nnx.Param)
    kw = dict(epochs=epochs, batch_size=batch_size, schedule=schedule, progress=progress)
    state, seconds = _fit(state, self.data, None, None, seed=self.seed, **kw)
    return state.model, seconds

  def quantize(self, m, config, calib_x):
    return qnnx.quantize_model(nnx.clone(m), config, calib_x)

  def calibrate(self, m, batches):
    m = nnx.clone(m)
    qnnx.calibrate(m, batches)
    return m

  def convert(self, m, calib_x):
    return qnnx.convert(m, calib_x)

  def predict(self, m, x, batch_size):
    """Logits in evaluation mode, batched with one compiled (padded) batch shape."""
    model = nnx.view(m, use_running_average=True, raise_if_not_found=False)
    apply = nnx.jit(lambda model, xb: model(xb))
    return np.concatenate(
      [np.asarray(apply(model, xb))[:n] for xb, n in _padded_batches(x, batch_size)]
    )

  def float_bytes(self, m):
    return qatjax.model_size(m, collections=("params", "batch_stats")).total

  def int_bytes(self, m):
    return qatjax.model_size(m).total


PIPELINES = {p.name: p for p in (LinenPipeline, NNXPipeline)}
