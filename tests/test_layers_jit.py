"""A jitted QAT train step traces exactly once, also while a schedule flips the quantization flags.

The step is ``value_and_grad`` + an ``optax.adam`` update with ``quant_stats`` and ``batch_stats``
mutable, over a small model made of every layer (QConv, QConvBN, QEmbed, QDenseGeneral, QDense),
with observer and LSQ layers mixed by rules. ``set_quant_flags`` is called *inside* the step with
booleans computed from the traced step counter (calibrate -> quantize -> freeze BN -> freeze
observers), and the effect of each phase is checked on the returned state.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_layers_helpers import QUANTIZER_LEAVES, cheap_init

import qatjax
from qatjax import QConv, QConvBN, QDense, QDenseGeneral, QEmbed, QuantConfig

RULES = qatjax.rules(
  {
    "QConv_0|QDense_0": QuantConfig(8, 8),
    "QEmbed": QuantConfig(4, None, method="lsq"),
    ".*": QuantConfig(4, 4, method="lsq"),
  }
)


class Net(nn.Module):
  config: object = RULES

  @nn.compact
  def __call__(self, x, tokens, train: bool):
    init = dict(config=self.config, kernel_init=cheap_init)
    x = nn.relu(QConv(4, (3, 3), **init)(x))
    x = QConvBN(6, (3, 3), strides=2, **init)(x, use_running_average=not train)
    x = nn.relu(x).reshape(x.shape[0], -1)
    e = QEmbed(12, 5, config=self.config, embedding_init=cheap_init)(tokens).mean(axis=1)
    h = QDenseGeneral((2, 8), **init)(jnp.concatenate([x, e], axis=-1))
    return QDense(10, **init)(nn.relu(h).reshape(h.shape[0], -1))


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.normal(size=(8, 6, 6, 2)), jnp.float32),
    jnp.asarray(rng.integers(0, 12, (8, 3)), jnp.int32),
    jnp.asarray(rng.integers(0, 10, (8,)), jnp.int32),
  )


def _make_step(model, tx, schedule):
  traces = []

  @jax.jit
  def train_step(params, rest, opt_state, step, x, tokens, y):
    traces.append(1)  # Python side effect: runs once per trace
    rest = schedule(rest, step)

    def loss_fn(p):
      logits, upd = model.apply(
        {**rest, "params": p}, x, tokens, train=True, mutable=["quant_stats", "batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**rest, **upd}, opt_state, step + 1, loss

  return train_step, traces


def _schedule(rest, step):
  """Calibrate in float (step 0), quantize (1+), freeze BN (2+), freeze observers (3+), and keep
  the last dense layer float until step 2 (a per-path flag)."""
  rest = qatjax.set_quant_flags(rest, enabled=step >= 1, observe=step < 3, bn_frozen=step >= 2)
  return qatjax.set_quant_flags(rest, enabled=step >= 2, path="^QDense_0$")


def test_train_step_traces_once_with_traced_flag_schedule():
  model = Net()
  x, tokens, _ = _data()
  v = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, tokens, train=True)
  assert {"params", "quant_stats", "batch_stats"} <= set(v)
  tx = optax.adam(1e-2)
  train_step, traces = _make_step(model, tx, _schedule)
  params, rest = v["params"], {k: c for k, c in v.items() if k != "params"}
  opt_state, step = tx.init(params), jnp.zeros((), jnp.int32)
  history, losses = [], []
  for i in range(6):
    xb, tb, yb = _data(i)
    params, rest, opt_state, step, loss = train_step(params, rest, opt_state, step, xb, tb, yb)
    history.append(jax.tree.map(np.asarray, rest))
    losses.append(float(loss))
  assert len(traces) == 1, f"train_step traced {len(traces)} times"
  assert int(step) == 6 and all(np.isfinite(losses))

  stats = [h["quant_stats"] for h in history]
  # Flags as the schedule set them, per step (the step's own flags are returned).
  assert [bool(s["QConv_0"]["enabled"]) for s in stats] == [False] + [True] * 5
  assert [bool(s["QDense_0"]["enabled"]) for s in stats] == [False, False] + [True] * 4
  assert [bool(s["QConvBN_0"]["bn_frozen"]) for s in stats] == [False, False] + [True] * 4
  # Observers counted steps 0, 1, 2 (also while disabled), then froze.
  assert [int(s["QConv_0"]["input_count"]) for s in stats] == [1, 2, 3, 3, 3, 3]
  np.testing.assert_array_equal(
    stats[2]["QDense_0"]["input_max"], stats[5]["QDense_0"]["input_max"]
  )
  # BN running statistics moved in steps 0 and 1, then froze.
  bn = [h["batch_stats"]["QConvBN_0"]["mean"] for h in history]
  assert not np.array_equal(bn[0], bn[1])
  np.testing.assert_array_equal(bn[1], bn[5])
  # LSQ parameters are trained (they get gradients once quantization is on).
  assert not np.allclose(
    params["QConvBN_0"]["kernel_scale"], v["params"]["QConvBN_0"]["kernel_scale"]
  )


def test_disabled_step_equals_float_model():
  """Step 0 of the schedule (everything disabled) computes the float model's loss and grads."""
  qmodel, fmodel = Net(), Net(config=None)
  x, tokens, y = _data()
  init = jax.jit(
    lambda: (
      qmodel.init(jax.random.key(0), x, tokens, train=True),
      fmodel.init(jax.random.key(0), x, tokens, train=True),
    )
  )
  v, fvars = init()
  # The float model has the same tree minus the quantizer parameters (and quant_stats holds
  # only QConvBN's bn_frozen switch).
  fparams = {
    k: {n: p for n, p in layer.items() if n not in QUANTIZER_LEAVES}
    for k, layer in v["params"].items()
  }
  assert jax.tree.structure(fparams) == jax.tree.structure(fvars["params"])
  assert set(fvars["quant_stats"]) == {"QConvBN_0"}

  @jax.jit
  def both(v, fvars):
    def q_loss(p):
      rest = qatjax.set_quant_flags({k: c for k, c in v.items() if k != "params"}, enabled=False)
      logits, _ = qmodel.apply(
        {**rest, "params": p}, x, tokens, train=True, mutable=["quant_stats", "batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def f_loss(p):
      logits, _ = fmodel.apply(
        {**fvars, "params": p}, x, tokens, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return (jax.value_and_grad(q_loss)(v["params"]), jax.value_and_grad(f_loss)(fvars["params"]))

  (ql, qg), (fl, fg) = both(v, {**fvars, "params": fparams, "batch_stats": v["batch_stats"]})
  np.testing.assert_allclose(ql, fl, rtol=1e-6)
  for layer, grads in fg.items():
    for name, g in grads.items():
      np.testing.assert_allclose(
        qg[layer][name], g, rtol=1e-5, atol=1e-7, err_msg=f"{layer}/{name}"
      )
  # Disabled quantizers get no gradient (LSQ scales are unused while disabled).
  for layer in ("QConvBN_0", "QDenseGeneral_0"):
    np.testing.assert_array_equal(qg[layer]["kernel_scale"], 0.0)
