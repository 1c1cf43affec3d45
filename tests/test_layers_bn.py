"""QConvBN (conv + BatchNorm folded for QAT) against nn.Conv(use_bias=False) -> nn.BatchNorm.

* quantization disabled: eval (running stats) and training (batch stats, running-stat update)
  equal the Flax pair within 1e-5;
* running stats update only with ``batch_stats`` mutable, in training mode, and ``bn_frozen``
  False; frozen, training mode uses the running statistics;
* ``gamma == 0`` gives no NaN (outputs, gradients);
* trained on sklearn's digits, the folded W8A8 layer reaches the float conv + BN accuracy.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from test_layers_helpers import JitApply, cheap_init, np_fake_quant, rand

import qatjax
from qatjax import QConvBN, QDense, QuantConfig


class ConvThenBN(nn.Module):
  """The float reference: nn.Conv then nn.BatchNorm (same defaults as QConvBN)."""

  use_bias: bool = False
  strides: int = 1

  @nn.compact
  def __call__(self, x, use_running_average):
    x = nn.Conv(6, (3, 3), strides=self.strides, use_bias=self.use_bias, name="conv")(x)
    return nn.BatchNorm(use_running_average=use_running_average, name="bn")(x)


def _variables(use_bias, seed=0):
  """Random (non-init) parameters and running statistics, in both layouts."""
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  kernel = f32(rng.normal(size=(3, 3, 4, 6)) * 0.3)
  bias = f32(rng.normal(size=6))
  gamma, beta = f32(rng.uniform(0.5, 2.0, 6)), f32(rng.normal(size=6))
  mean, var = f32(rng.normal(size=6)), f32(rng.uniform(0.3, 3.0, 6))
  conv = {"kernel": kernel, **({"bias": bias} if use_bias else {})}
  ref = {
    "params": {"conv": conv, "bn": {"scale": gamma, "bias": beta}},
    "batch_stats": {"bn": {"mean": mean, "var": var}},
  }
  q = {
    "params": {**conv, "bn_scale": gamma, "bn_bias": beta},
    "batch_stats": {"mean": mean, "var": var},
  }
  return ref, q


def _q_layer(config, use_bias=False, strides=1):
  return QConvBN(6, (3, 3), strides=strides, use_bias=use_bias, config=config)


def _q_vars(layer, qvars, x):
  stats = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, use_running_average=True))
  flags = {k: jnp.ones((), jnp.bool_) for k in ("enabled", "observe")}
  qs = {
    k: (flags[k] if k in flags else jnp.zeros(s.shape, s.dtype))
    for k, s in stats.get("quant_stats", {}).items()
  }
  return {**qvars, "quant_stats": qs}


CONFIGS = {
  "float": None,
  "observer_w8a8": QuantConfig(),
  "lsq_w4a4": QuantConfig(4, 4, method="lsq"),
}
# (name, config, use_bias, strides): every config and geometry.
DISABLED_CASES = [
  (f"{config}_{geometry}", config, use_bias, strides)
  for config in sorted(CONFIGS)
  for geometry, use_bias, strides in (("no_bias_stride1", False, 1), ("bias_stride2", True, 2))
]


class DisabledEqualsConvThenBNTest(chex.TestCase):
  """Quantization disabled, QConvBN is nn.Conv then nn.BatchNorm: jitted for every config and
  geometry, un-jitted for one (op-by-op runs compile every op)."""

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(DISABLED_CASES)
  def test_disabled_equals_conv_then_bn(self, config, use_bias, strides):
    self._check_disabled_equals_conv_then_bn(config, use_bias, strides)

  @chex.variants(without_jit=True)
  @parameterized.named_parameters(("observer_w8a8_no_bias_stride1", "observer_w8a8", False, 1))
  def test_disabled_equals_conv_then_bn_eager(self, config, use_bias, strides):
    self._check_disabled_equals_conv_then_bn(config, use_bias, strides)

  def _check_disabled_equals_conv_then_bn(self, config, use_bias, strides):
    x = rand((3, 7, 7, 4), 1)
    ref_vars, qv = _variables(use_bias)
    ref, layer = ConvThenBN(use_bias, strides), _q_layer(CONFIGS[config], use_bias, strides)

    def run(ref_vars, qv, x):
      init = layer.init(jax.random.key(0), x, use_running_average=True)
      assert set(init) == {"params", "batch_stats", "quant_stats"}, sorted(init)
      v = {**init, "params": {**init["params"], **qv["params"]}, "batch_stats": qv["batch_stats"]}
      v = qatjax.set_quant_flags(v, enabled=False)
      r_eval = ref.apply(ref_vars, x, use_running_average=True)
      r_train, r_upd = ref.apply(ref_vars, x, use_running_average=False, mutable=["batch_stats"])
      q_eval = layer.apply(v, x, use_running_average=True)
      q_train, q_upd = layer.apply(
        v, x, use_running_average=False, mutable=["batch_stats", "quant_stats"]
      )
      return r_eval, r_train, r_upd, q_eval, q_train, q_upd

    r_eval, r_train, r_upd, q_eval, q_train, q_upd = self.variant(run)(ref_vars, qv, x)
    np.testing.assert_allclose(q_eval, r_eval, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q_train, r_train, rtol=1e-5, atol=1e-5)
    for stat in ("mean", "var"):
      np.testing.assert_allclose(
        q_upd["batch_stats"][stat], r_upd["batch_stats"]["bn"][stat], rtol=1e-5, atol=1e-6
      )
      assert not np.allclose(q_upd["batch_stats"][stat], qv["batch_stats"][stat])
    # Training normalises with the batch: per-channel mean ~beta.
    np.testing.assert_allclose(
      np.asarray(q_train).mean(axis=(0, 1, 2)), qv["params"]["bn_bias"], atol=1e-4
    )


def test_running_stats_update_rules():
  x = rand((3, 7, 7, 4), 2)
  _, qv = _variables(False)
  layer = _q_layer(QuantConfig())
  v = _q_vars(layer, qv, x)

  def run(v, x):
    train = lambda v, mut: layer.apply(v, x, use_running_average=False, mutable=mut)
    out = {}
    out["mutable"] = train(v, ["batch_stats", "quant_stats"])
    out["immutable_bs"] = train(v, ["quant_stats"])
    frozen = qatjax.set_quant_flags(v, bn_frozen=True)
    out["frozen"] = train(frozen, ["batch_stats", "quant_stats"])
    out["eval_mutable"] = layer.apply(
      v, x, use_running_average=True, mutable=["batch_stats", "quant_stats"]
    )
    out["frozen_eval"] = layer.apply(frozen, x, use_running_average=True)
    out["eval_plain"] = layer.apply(v, x, use_running_average=True)
    return out

  out = jax.jit(run)(v, x)
  y, upd = out["mutable"]
  assert not np.allclose(upd["batch_stats"]["mean"], qv["batch_stats"]["mean"])
  y_imm, upd_imm = out["immutable_bs"]
  assert "batch_stats" not in upd_imm
  np.testing.assert_allclose(y_imm, y, rtol=1e-6, atol=1e-6)  # still batch-normalised
  y_fr, upd_fr = out["frozen"]
  jax.tree.map(np.testing.assert_array_equal, upd_fr["batch_stats"], qv["batch_stats"])
  # Frozen BN in training mode uses the running statistics: the eval output (same quant stats:
  # both observers saw this one batch from the same state).
  np.testing.assert_allclose(y_fr, out["eval_mutable"][0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(y_fr, y, atol=1e-2)
  _, upd_ev = out["eval_mutable"]
  jax.tree.map(np.testing.assert_array_equal, upd_ev["batch_stats"], qv["batch_stats"])
  np.testing.assert_array_equal(out["frozen_eval"], out["eval_plain"])


@pytest.mark.parametrize(
  "config", [QuantConfig(), QuantConfig(4, 4, method="lsq")], ids=["observer", "lsq"]
)
def test_gamma_zero_no_nan(config):
  x = rand((3, 7, 7, 4), 3)
  _, qv = _variables(False)
  gamma = qv["params"]["bn_scale"].at[jnp.array([0, 3])].set(0.0)
  qv["params"]["bn_scale"] = gamma
  layer = _q_layer(config)

  @jax.jit
  def run(qv, x):
    init = layer.init(jax.random.key(0), x, use_running_average=False)
    v = {**init, "params": {**init["params"], **qv["params"]}, "batch_stats": qv["batch_stats"]}

    def loss(p, use_ra):
      y, _ = layer.apply(
        {**v, "params": p}, x, use_running_average=use_ra, mutable=["batch_stats", "quant_stats"]
      )
      return jnp.sum(y**2), y

    (_, y_train), g_train = jax.value_and_grad(loss, has_aux=True)(v["params"], False)
    (_, y_eval), g_eval = jax.value_and_grad(loss, has_aux=True)(v["params"], True)
    _, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats", "quant_stats"])
    return y_train, g_train, y_eval, g_eval, upd

  y_train, g_train, y_eval, g_eval, upd = run(qv, x)
  for tree in (y_train, g_train, y_eval, g_eval, upd):
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(tree))
  beta = np.asarray(qv["params"]["bn_bias"])
  for y in (y_train, y_eval):  # gamma = 0: the channel is beta
    np.testing.assert_allclose(
      np.asarray(y)[..., [0, 3]], np.broadcast_to(beta[[0, 3]], y.shape[:-1] + (2,)), atol=1e-6
    )
  assert np.any(np.asarray(g_train["kernel"]) != 0)


def test_conv_bias_through_folding_and_convert():
  """QConvBN(use_bias=True): the conv bias b enters the folded bias ``beta + (b - mean) * f``
  that convert stores, and the integer model computes ``conv(x_q, fq(W f)) + that bias``; all
  recomputed by hand (numpy quantization, Flax's float conv)."""
  x = rand((3, 7, 7, 4), 4)
  _, qv = _variables(True)
  layer = _q_layer(QuantConfig(), use_bias=True)

  @jax.jit
  def calibrated(x):
    init = layer.init(jax.random.key(0), x, use_running_average=True)
    v = {**init, "params": qv["params"], "batch_stats": qv["batch_stats"]}
    _, stats = layer.apply(v, x, use_running_average=True, mutable=["quant_stats"])
    return {**v, **stats}

  v = calibrated(x)
  converted = qatjax.convert(JitApply(layer), v, x, use_running_average=True)
  p = {k: np.asarray(a, np.float32) for k, a in qv["params"].items()}
  bs = {k: np.asarray(a, np.float32) for k, a in qv["batch_stats"].items()}
  f = p["bn_scale"] / np.sqrt(bs["var"] + np.float32(1e-5))
  folded_bias = p["bn_bias"] + (p["bias"] - bs["mean"]) * f
  np.testing.assert_allclose(converted["params"]["bias"], folded_bias, rtol=1e-6, atol=1e-6)
  assert np.abs(p["bias"] * f).max() > 0.5  # the conv bias moves the output
  # By hand: per-channel narrow int8 folded kernel, the input on its calibrated affine grid.
  w = p["kernel"] * f
  w_q = np_fake_quant(w, np.abs(w).max((0, 1, 2)) / np.float32(127), 0.0, -127, 127)
  xn = np.asarray(x)
  s = np.float32((max(xn.max(), 0) - min(xn.min(), 0)) / 255)
  z = np.clip(-np.round(min(xn.min(), 0) / s), 0, 255)
  x_q = np_fake_quant(xn, s, z, 0, 255)
  conv = nn.Conv(6, (3, 3), use_bias=False).apply({"params": {"kernel": w_q}}, x_q)
  want = np.asarray(conv) + folded_bias
  tol = dict(rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(layer.apply(converted, x, use_running_average=True), want, **tol)
  np.testing.assert_allclose(layer.apply(v, x, use_running_average=True), want, **tol)


# --- digits: folded W8A8 vs float conv + BN -------------------------------------------------------


class FloatNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    for feats, stride in ((16, 1), (32, 2)):
      x = nn.Conv(feats, (3, 3), strides=stride, use_bias=False, kernel_init=cheap_init)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(10, kernel_init=cheap_init)(x.reshape(x.shape[0], -1))


class FoldedNet(nn.Module):
  config: object = QuantConfig()

  @nn.compact
  def __call__(self, x, train: bool):
    for feats, stride in ((16, 1), (32, 2)):
      x = QConvBN(
        feats, (3, 3), strides=stride, momentum=0.9, config=self.config, kernel_init=cheap_init
      )(x, use_running_average=not train)
      x = nn.relu(x)
    return QDense(10, config=self.config, kernel_init=cheap_init)(x.reshape(x.shape[0], -1))


def _train_digits(model, x_tr, y_tr, x_te, y_te, epochs=5, batch=64):
  v = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x_tr[:batch], train=True)
  params, rest = v["params"], {k: c for k, c in v.items() if k != "params"}
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  mutable = list(rest)

  @jax.jit
  def step(params, rest, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({**rest, "params": p}, x, train=True, mutable=mutable)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), {**rest, **upd}, opt_state, loss

  rng = np.random.default_rng(0)
  n = (len(x_tr) // batch) * batch
  for _ in range(epochs):
    order = rng.permutation(len(x_tr))[:n].reshape(-1, batch)
    for idx in order:
      params, rest, opt_state, _ = step(params, rest, opt_state, x_tr[idx], y_tr[idx])
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))({**rest, "params": params}, x_te)
  return float(np.mean(np.argmax(logits, -1) == y_te))


def test_folded_w8a8_trains_like_float_conv_bn_on_digits():
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
  acc_float = _train_digits(FloatNet(), x_tr, y_tr, x_te, y_te)
  acc_q = _train_digits(FoldedNet(), x_tr, y_tr, x_te, y_te)
  assert acc_float > 0.9 and acc_q > 0.9, (acc_float, acc_q)
  assert abs(acc_float - acc_q) < 0.03, (acc_float, acc_q)
