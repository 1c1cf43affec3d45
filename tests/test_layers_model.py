"""Whole-model helpers: ``quantize_model``, ``rules_report``, ``from_float``, mixed precision.

* ``quantize_model`` on an unmodified float CNN (nn.Conv, nn.relu, nn.Dense) has the same variable
  tree and outputs as the same CNN written with QConv / QDense under matching names, and warns for
  rules that match no layer; ``rules_report`` lists the matches.
* ``from_float`` copies float kernels exactly, initialises LSQ scales from the float kernels and
  observer statistics from the example batch, and names the path of a mismatched tree.
* Mixed precision by rules: the bits each layer really uses, read back from ``convert``.
"""

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_layers_helpers import QUANTIZER_LEAVES, JitApply, cheap_init, rand

import qatjax
from qatjax import EPS, QConv, QDense, QuantConfig


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(8, (3, 3), strides=2, kernel_init=cheap_init)(x))


class FloatCNN(nn.Module):
  """An unmodified float model: nn.Conv, nn.relu, nn.Dense (one conv nested in a block)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), kernel_init=cheap_init)(x))
    x = Block()(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16, kernel_init=cheap_init)(x))
    return nn.Dense(10, kernel_init=cheap_init)(x)


class QBlock(nn.Module):
  config: object

  @nn.compact
  def __call__(self, x):
    return nn.relu(
      QConv(8, (3, 3), strides=2, config=self.config, kernel_init=cheap_init, name="Conv_0")(x)
    )


class QCNN(nn.Module):
  """The same CNN written with QConv / QDense and explicit matching names."""

  config: object

  @nn.compact
  def __call__(self, x):
    x = nn.relu(QConv(4, (3, 3), config=self.config, kernel_init=cheap_init, name="Conv_0")(x))
    x = QBlock(self.config, name="Block_0")(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(16, config=self.config, kernel_init=cheap_init, name="Dense_0")(x))
    return QDense(10, config=self.config, kernel_init=cheap_init, name="Dense_1")(x)


PATHS = ["Conv_0", "Block_0/Conv_0", "Dense_0", "Dense_1"]

RULES = qatjax.rules(
  {
    "^Conv_0$": QuantConfig(8, 8),
    "Block_0/Conv_0": QuantConfig(4, 4, method="lsq"),
    "Dense_0": QuantConfig(
      8, 4, method="lsq", weight_granularity="per_group", weight_group_size=16
    ),
    "Dense_1": None,  # stays float
    "Attention": QuantConfig(),  # matches nothing
  }
)

X = rand((4, 8, 8, 3), 0)


def _sig(tree):
  return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree)


def _flat(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree, sep="/")


def test_quantize_model_matches_explicit_q_layers():
  qm = qatjax.quantize_model(FloatCNN(), RULES)
  explicit = QCNN(RULES)
  init = jax.jit(lambda k, x: (qm.init(k, x), explicit.init(k, x), FloatCNN().init(k, x)))
  with pytest.warns(UserWarning, match="Attention"):  # warned while tracing init
    vq, ve, fv = init(jax.random.key(0), X)
  # Same collections, paths, shapes, dtypes and (same key) initial values.
  assert jax.tree.structure(vq) == jax.tree.structure(ve)
  assert _sig(vq) == _sig(ve)
  jax.tree.map(np.testing.assert_array_equal, vq, ve)
  # The float model's params are a subset (quantizer leaves aside) with the same values.
  flat_q = _flat(vq["params"])
  assert {k for k in flat_q if k.rsplit("/", 1)[1] not in QUANTIZER_LEAVES} == set(
    _flat(fv["params"])
  )
  for k, p in _flat(fv["params"]).items():
    np.testing.assert_array_equal(flat_q[k], p)
  # Dense_1 maps to None: no quantizer state at all.
  assert "Dense_1" not in vq["quant_stats"]
  assert set(vq["quant_stats"]) == {"Conv_0", "Block_0", "Dense_0"}
  assert {"input_min", "input_count"} <= set(vq["quant_stats"]["Conv_0"])  # observer
  assert {"kernel_scale", "input_scale"} <= set(vq["params"]["Block_0"]["Conv_0"])  # LSQ

  @jax.jit
  def run(vq, ve, fv, x):
    outs = []
    for model, v in ((qm, vq), (explicit, ve)):
      y_train, upd = model.apply(v, x, mutable=["quant_stats"])
      y_eval = model.apply({**v, **upd}, 2.0 * x)
      outs.append((y_train, upd, y_eval))
    return outs, FloatCNN().apply(fv, 2.0 * x)

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # apply does not warn; only init does
    ((qt, qs, qe), (et, es, ee)), y_float = run(vq, ve, fv, X)
  np.testing.assert_allclose(qt, et, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(qe, ee, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), qs, es)
  # And quantization is really on (the float model gives something else).
  assert not np.allclose(qe, y_float, rtol=1e-3)


def test_quantize_model_single_config_and_report():
  qm = qatjax.quantize_model(FloatCNN(), QuantConfig())
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # ".*" matches: no warning
    v = jax.eval_shape(qm.init, jax.random.key(0), X)
  assert set(v["quant_stats"]) == {"Conv_0", "Block_0", "Dense_0", "Dense_1"}
  assert qatjax.rules_report(qm, X) == {".*": [(p, "W8A8") for p in PATHS]}
  report = qatjax.rules_report(qatjax.quantize_model(FloatCNN(), RULES), X)
  labels = {
    p: "float" if c is None else f"W{c.weight_bits}A{c.act_bits}" for p, c in RULES.patterns
  }
  assert report == {
    "^Conv_0$": [("Conv_0", labels["^Conv_0$"])],
    "Block_0/Conv_0": [("Block_0/Conv_0", labels["Block_0/Conv_0"])],
    "Dense_0": [("Dense_0", labels["Dense_0"])],
    "Dense_1": [("Dense_1", labels["Dense_1"])],
    "Attention": [],
  }
  # First match wins: ".*Conv_\d+" takes both convs before ".*" sees them.
  first = qatjax.rules_report(
    qatjax.quantize_model(FloatCNN(), {r".*Conv_\d+": QuantConfig(4, 2), ".*": QuantConfig()}), X
  )
  assert first == {
    r".*Conv_\d+": [("Conv_0", "W4A2"), ("Block_0/Conv_0", "W4A2")],
    ".*": [("Dense_0", "W8A8"), ("Dense_1", "W8A8")],
  }


def test_rules_repr_is_one_readable_line_per_rule():
  text = repr(RULES)
  lines = text.splitlines()
  assert len(lines) == len(RULES.patterns) + 2 and len(text) < 400, text
  assert lines[1] == "  '^Conv_0$': QuantConfig(),  # W8A8"
  assert (
    lines[2] == "  'Block_0/Conv_0': QuantConfig(weight_bits=4, act_bits=4, method='lsq'),  # W4A4"
  )
  assert lines[4] == "  'Dense_1': None,  # float"
  assert eval(text, {"rules": qatjax.rules, "QuantConfig": QuantConfig}) == RULES
  assert repr(qatjax.rules({})) == "rules({})"


def test_rules_match_whole_paths():
  """A rule for Dense_1 does not catch Dense_10 or block/Dense_1 (re.fullmatch, not search)."""
  assert "whole" in qatjax.rules.__doc__ and "fullmatch" in qatjax.rules.__doc__  # help(rules)
  r = qatjax.rules({"Dense_1": QuantConfig(4, 4), "Conv": QuantConfig(2, 2)})
  assert r.lookup("Dense_1").weight_bits == 4
  for path in ("Dense_10", "block/Dense_1", "Dense_1/inner", "Conv_0"):
    assert r.match(path) == (None, None), path
  # The same rule through quantize_model: Dense_10 of a wide model stays float.

  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(11):
        x = nn.Dense(3)(x)
      return x

  x = jnp.ones((2, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    v = qatjax.quantize_model(Wide(), {"Dense_1": QuantConfig(4, 4)}).init(jax.random.key(0), x)
  assert set(v["quant_stats"]) == {"Dense_1"}


# --- from_float -----------------------------------------------------------------------------------


def _float_checkpoint():
  """A 'trained' float checkpoint (not the Q model's init: another key, biases moved)."""
  fv = jax.jit(FloatCNN().init)(jax.random.key(42), X)
  return jax.tree.map(
    lambda p: jnp.asarray(
      np.asarray(p) + np.linspace(0, 0.01, p.size, dtype=np.float32).reshape(p.shape)
    ),
    fv,
  )


def _from_float(qmodel, fv, *args, **kwargs):
  """``from_float`` jitted: the same code (it is traceable), one compile instead of an
  op-by-op run (test_from_float_copies_batch_stats_unchanged runs it un-jitted)."""
  return jax.jit(lambda fv, *a: qatjax.from_float(qmodel, fv, *a, **kwargs))(fv, *args)


def _np_lsq_kernel_init(w, qmax):
  a = np.abs(np.asarray(w, np.float64))
  return np.maximum(2 * a.mean(axis=tuple(range(a.ndim - 1))) / math.sqrt(qmax), EPS)


@pytest.mark.parametrize("kind", ["quantize_model", "explicit"])
def test_from_float_lsq(kind):
  cfg = QuantConfig(4, 8, method="lsq", lsq_init="lsq")  # the paper's rule, checked by hand
  qmodel = qatjax.quantize_model(FloatCNN(), cfg) if kind == "quantize_model" else QCNN(cfg)
  fv = _float_checkpoint()
  qv = _from_float(qmodel, fv, X)
  assert set(qv) == {"params", "quant_stats"}
  flat_q, flat_f = _flat(qv["params"]), _flat(fv["params"])
  for k, p in flat_f.items():  # float leaves copied exactly
    np.testing.assert_array_equal(flat_q[k], p, err_msg=k)
  random_init = _flat(jax.eval_shape(qmodel.init, jax.random.key(0), X)["params"])
  assert set(flat_q) == set(random_init)
  for path in PATHS:
    # LSQ's rule on the *float* kernel (another key than the Q model's random init, so the
    # init's kernel would give other values).
    want = _np_lsq_kernel_init(flat_f[f"{path}/kernel"], 7)
    np.testing.assert_allclose(flat_q[f"{path}/kernel_scale"], want, rtol=1e-5, err_msg=path)
    init_kernel = cheap_init(jax.random.key(0), flat_f[f"{path}/kernel"].shape)
    assert not np.allclose(_np_lsq_kernel_init(init_kernel, 7), want, rtol=1e-3)
  # The first layer's input step: the example batch's affine range.
  s = (float(X.max()) - float(X.min())) / 255
  np.testing.assert_allclose(flat_q["Conv_0/input_scale"], s, rtol=1e-5)
  np.testing.assert_allclose(flat_q["Conv_0/input_zero_point"], np.round(-float(X.min()) / s))
  # The result trains/evaluates as is.
  assert np.all(np.isfinite(jax.jit(qmodel.apply)(qv, X)))


def test_from_float_observer_stats_from_example_batch():
  qmodel = qatjax.quantize_model(FloatCNN(), QuantConfig())
  fv = _float_checkpoint()
  qv = _from_float(qmodel, fv, X)
  jax.tree.map(np.testing.assert_array_equal, qv["params"], fv["params"])  # same tree exactly
  stats = _flat(qv["quant_stats"])
  for path in PATHS:
    assert int(stats[f"{path}/input_count"]) == 1, path
    assert bool(stats[f"{path}/enabled"]) and bool(stats[f"{path}/observe"])
  np.testing.assert_allclose(stats["Conv_0/input_min"], float(X.min()), rtol=1e-6)
  np.testing.assert_allclose(stats["Conv_0/input_max"], float(X.max()), rtol=1e-6)
  # Deeper layers see post-ReLU activations of the float weights: non-negative ranges.
  assert float(stats["Dense_0/input_min"]) >= 0.0 < float(stats["Dense_0/input_max"])


class FloatBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False, kernel_init=cheap_init)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(3, kernel_init=cheap_init)(x.reshape(x.shape[0], -1))


def test_from_float_copies_batch_stats_unchanged():
  fv = FloatBN().init(jax.random.key(1), X)
  fv = {**fv, "batch_stats": jax.tree.map(lambda s: s + 0.5, fv["batch_stats"])}
  qmodel = qatjax.quantize_model(FloatBN(), QuantConfig(method="lsq"))
  qv = qatjax.from_float(qmodel, fv, X, train=True)  # un-jitted, training-mode example call
  jax.tree.map(np.testing.assert_array_equal, qv["batch_stats"], fv["batch_stats"])
  np.testing.assert_array_equal(
    qv["params"]["BatchNorm_0"]["scale"], fv["params"]["BatchNorm_0"]["scale"]
  )


def test_from_float_names_mismatched_paths():
  qmodel = qatjax.quantize_model(FloatCNN(), QuantConfig(method="lsq"))
  fv = _float_checkpoint()
  missing = {"params": {**fv["params"], "Dense_0": {"kernel": fv["params"]["Dense_0"]["kernel"]}}}
  with pytest.raises(ValueError, match=r"params/Dense_0/bias.*missing"):
    qatjax.from_float(qmodel, missing, X)
  extra = {"params": {**fv["params"], "Extra_0": {"kernel": jnp.ones((3, 3))}}}
  with pytest.raises(ValueError, match=r"params/Extra_0/kernel.*extra"):
    qatjax.from_float(qmodel, extra, X)
  block = dict(fv["params"]["Block_0"])
  block["Conv_0"] = {**block["Conv_0"], "kernel": jnp.ones((3, 3, 4, 9))}
  wrong = {"params": {**fv["params"], "Block_0": block}}
  with pytest.raises(
    ValueError,
    match=r"params/Block_0/Conv_0/kernel.*\(3, 3, 4, 9\).*"
    r"\(3, 3, 4, 8\)",
  ):
    qatjax.from_float(qmodel, wrong, X)
  with pytest.raises(ValueError, match="params"):
    qatjax.from_float(qmodel, {"batch_stats": {}}, X)


# --- mixed precision ------------------------------------------------------------------------------


MIXED = qatjax.rules({"^Conv_0$|^Dense_1$": QuantConfig(8, 8), ".*": QuantConfig(4, 4)})
BITS = {"Conv_0": 8, "Block_0/Conv_0": 4, "Dense_0": 4, "Dense_1": 8}


@pytest.mark.parametrize("kind", ["quantize_model", "explicit"])
def test_mixed_precision_bits_used(kind):
  model = qatjax.quantize_model(FloatCNN(), MIXED) if kind == "quantize_model" else QCNN(MIXED)

  @jax.jit
  def calibrated(x):
    v = model.init(jax.random.key(0), x)
    return {**v, **model.apply(v, x, mutable=["quant_stats"])[1]}

  qv = _flat(qatjax.convert(JitApply(model), calibrated(X), X)["params"])
  for path, bits in BITS.items():
    qa = qv[f"{path}/kernel"]
    assert isinstance(qa, qatjax.QArray), path
    assert qa.bits == bits, path
    assert qa.values.dtype == (jnp.uint8 if bits <= 4 else jnp.int8), path
    ints = np.asarray(qa.unpack())
    # Observer min/max per channel, narrow range: every channel's largest |w| maps to 2**(b-1)-1.
    np.testing.assert_array_equal(
      np.abs(ints).max(axis=tuple(range(ints.ndim - 1))), 2 ** (bits - 1) - 1, err_msg=path
    )
    zx = float(qv[f"{path}/input_zero_point"])
    assert 0 <= zx <= 2**bits - 1 and zx == round(zx), path
    # The kernel is stored in bits/8 bytes per weight (plus the padding nibble).
    assert qa.values.size == math.ceil(ints.size * bits / 8), path
