"""A new user's paths (issue 14): a Flax MLP with BatchNorm and Dropout, float -> QAT -> integer.

* a standard Flax loop (``mutable=["batch_stats"]``) never updates the observers: ``convert`` and
  ``qatjax.training.evaluate`` warn, naming the layers; the README's idiom does not warn;
* a model with no quantized layer is an error in ``from_float`` and ``convert``.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qatjax
from qatjax import QuantConfig
from qatjax.training import create_train_state, evaluate, make_eval_step, make_train_step


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(32)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


X = jax.random.normal(jax.random.key(0), (16, 8))
Y = jnp.arange(16) % 3
LAYERS = ["Dense_0", "Dense_1"]


@pytest.fixture(scope="module")
def start():
  """The float model, its variables, the QAT model and ``from_float``'s variables."""
  float_vars = MLP().init(jax.random.key(1), X)
  qmodel = qatjax.quantize_model(MLP(), QuantConfig())
  return qmodel, qatjax.from_float(qmodel, float_vars, X)


def train(qmodel, variables, mutable, steps=3):
  """A standard Flax training loop (optax), the user's choice of mutable collections."""
  tx = optax.adam(1e-2)
  params, opt = variables["params"], tx.init(variables["params"])
  rest = {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def step(params, opt, rest, x, key):
    def loss(p):
      logits, upd = qmodel.apply(
        {"params": p, **rest}, x, train=True, mutable=mutable, rngs={"dropout": key}
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), upd

    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, {**rest, **upd}

  for i in range(steps):
    params, opt, rest = step(params, opt, rest, 3.0 * X, jax.random.key(i))  # 3x wider inputs
  return {"params": params, **rest}


def test_convert_warns_about_observers_a_flax_loop_never_updated(start):
  qmodel, qvars = start
  trained = train(qmodel, qvars, ["batch_stats"])
  assert int(trained["quant_stats"]["Dense_0"]["input_count"]) == 1  # from_float's batch only
  with pytest.warns(UserWarning, match="seen no batch since from_float") as record:
    qatjax.convert(qmodel, trained, X)
  message = str(record[0].message)
  assert all(layer in message for layer in LAYERS) and "mutable=['quant_stats']" in message


def test_the_readme_idiom_does_not_warn(start):
  qmodel, qvars = start
  trained = train(qmodel, qvars, ["batch_stats", "quant_stats"])
  assert int(trained["quant_stats"]["Dense_0"]["input_count"]) == 4
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    qvars_int = qatjax.convert(qmodel, trained, X)
  assert isinstance(qvars_int["params"]["Dense_0"]["kernel"], qatjax.QArray)


def test_frozen_or_never_from_float_observers_are_not_reported(start):
  qmodel, qvars = start
  frozen = qatjax.set_quant_flags(qvars, observe=False)  # frozen on purpose
  # From init: the observers record 0, one calibration batch is enough.
  v = qmodel.init(jax.random.key(0), X)
  _, stats = qmodel.apply(v, X, mutable=["quant_stats"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    qatjax.convert(qmodel, frozen, X)
    qatjax.convert(qmodel, {**v, **stats}, X)
  assert int(stats["quant_stats"]["Dense_0"]["input_count_from_float"]) == 0


def test_from_float_records_the_count_without_changing_the_numerics(start):
  qmodel, qvars = start
  stats = qvars["quant_stats"]
  for layer in LAYERS:
    assert int(stats[layer]["input_count_from_float"]) == int(stats[layer]["input_count"]) == 1
  reset = jax.tree_util.tree_map_with_path(
    lambda p, a: jnp.zeros_like(a) if "count_from_float" in jax.tree_util.keystr(p) else a, qvars
  )
  for mutable in (False, ["quant_stats"]):
    a, b = (qmodel.apply(v, 2.0 * X, mutable=mutable) for v in (qvars, reset))
    np.testing.assert_array_equal(a[0] if mutable else a, b[0] if mutable else b)


def test_evaluate_warns_until_a_train_step_updates_the_observers(start):
  qmodel, qvars = start
  state = create_train_state(qmodel, optax.sgd(0.1), jax.random.key(0), X, variables=qvars)
  eval_step = make_eval_step()
  with pytest.warns(UserWarning, match=r"evaluate: .*Dense_0.*Dense_1"):
    evaluate(state, (np.asarray(X), np.asarray(Y)), batch_size=8, eval_step=eval_step)
  state, _ = make_train_step(apply_kwargs={"train": True}, rng=jax.random.key(0))(state, (X, Y))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    evaluate(state, (np.asarray(X), np.asarray(Y)), batch_size=8, eval_step=eval_step)


def test_convert_still_raises_for_an_observer_that_never_saw_data():
  qmodel = qatjax.quantize_model(MLP(), QuantConfig())
  v = qmodel.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="Dense_0 has no activation statistics"):
    qatjax.convert(qmodel, v, X)


@pytest.mark.parametrize(
  "model",
  [MLP(), qatjax.quantize_model(MLP(), {".*": None})],
  ids=["float_model", "rules_keep_all_float"],
)
def test_quantizing_nothing_is_an_error(model):
  float_vars = MLP().init(jax.random.key(1), X)
  with pytest.raises(ValueError, match=r"from_float: no layer of \w+ is quantized.*quantize_model"):
    qatjax.from_float(model, float_vars, X)
  with pytest.raises(ValueError, match=r"convert: no layer of \w+ is quantized.*quantize_model"):
    qatjax.convert(model, float_vars, X)


def test_converting_twice_is_an_error(start):
  qmodel, qvars = start
  _, stats = qmodel.apply(qvars, X, mutable=["quant_stats"])
  qv = qatjax.convert(qmodel, {**qvars, **stats}, X)
  with pytest.raises(ValueError, match="already converted"):
    qatjax.convert(qmodel, qv, X)
