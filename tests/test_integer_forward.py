"""Quantized dots train with the integer kernel's forward value (issue 12 item 1).

``qatjax.qat_forward`` chooses the training forward of a ``dot_general`` whose weight and
activation are quantized: the converted model's integer arithmetic (int8 products, or the same
int32 sums computed exactly on bfloat16 units) or the fake-quantized float product. int4 groups
with quantized activations take the integer one where no derivative is taken (the grouped
kernel rescales group by group, so only this keeps the converted model's outputs, and greedy
decoding, identical); under ``"auto"`` the per-channel ones do where bfloat16 products are fast
(x86 CPUs whose ``avx512_bf16`` products time faster than float32 ones), also in training; int4
groups and attention's products train on the fake-quant value there (faster).
Expected values: the converted model's outputs (bitwise), the gradients of the pure fake-quant
path (``qat_forward("fake_quant")``) and int64 products computed by numpy.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax import QDense, QDenseGeneral, QuantConfig
from qatjax.core import exact_dot
from qatjax.ops import product

GROUPED = dict(weight_granularity="per_group", weight_group_size=32)
DYNAMIC = dict(act_calibration="dynamic", act_granularity="per_token")
CONFIGS = {
  "w4a8_dynamic_per_token": QuantConfig(4, 8, **GROUPED, **DYNAMIC),
  "w4a8_observer": QuantConfig(4, 8, **GROUPED),
  "w4a8_lsq": QuantConfig(4, 8, **GROUPED, method="lsq"),
  "w8a8_observer": QuantConfig(8, 8),
  "w8a8_lsq": QuantConfig(8, 8, method="lsq"),
  "w8a8_dynamic_per_token": QuantConfig(8, 8, **DYNAMIC),
  "w4a4_pact": QuantConfig(4, 4, pact=True),
  "w8a8_pact": QuantConfig(8, 8, pact=True),  # unsigned, zero point 0: int8 zero point -128
  "w8a8_symmetric": QuantConfig(8, 8, act_symmetric=True),  # signed: no zero-point correction
}
X = jax.random.normal(jax.random.key(1), (2, 8, 100))  # 100 inputs: groups of 32, 32, 32, 4


@pytest.fixture(params=["bf16", "int8"])
def unit(request, monkeypatch):
  """Runs a test with bfloat16 products reported fast (exact bf16 sums) and slow (int8)."""
  monkeypatch.setattr(product, "bf16_matmul_fast", lambda: request.param == "bf16")
  return request.param


def _layers(config):
  return {
    "dense": QDense(48, config=config),
    "dense_general": QDenseGeneral((3, 16), config=config),
  }


def _state(layer):
  v = jax.jit(layer.init)(jax.random.key(0), X)
  if "quant_stats" in v:  # observers see the batch first
    _, stats = jax.jit(functools.partial(layer.apply, mutable=["quant_stats"]))(v, X)
    v = {**v, **stats}
  return v


def _linear_loss_grads(model, v, x, c, mode):
  """Gradients of ``sum(c * model(x))`` to the parameters and ``x``, traced under ``mode``."""

  def loss(params, x):
    return jnp.sum(c * model.apply({**v, "params": params}, x))

  with qatjax.qat_forward(mode):
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)


def _apply(layer, v, mode):
  with qatjax.qat_forward(mode):
    return jax.jit(layer.apply)(v, X)  # a new jit per call: traced under this mode


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize(  # the int8 unit on Dense only: the layouts are DenseGeneral's too
  "kind,unit",
  [("dense", "bf16"), ("dense_general", "bf16"), ("dense", "int8")],
  indirect=["unit"],
)
def test_training_forward_is_the_integer_models_output(kind, config, unit):
  layer = _layers(config)[kind]
  v = _state(layer)
  y_int = jax.jit(layer.apply)(qatjax.convert(layer, v, X), X)
  if config.pact or config.act_symmetric:
    # Scales alpha / qmax and max|x| / 127.5: XLA may multiply by the reciprocal in one program
    # and divide in the other (1 ulp apart).
    np.testing.assert_allclose(_apply(layer, v, "integer"), y_int, rtol=3e-7, atol=0)
  else:
    np.testing.assert_array_equal(_apply(layer, v, "integer"), y_int)
  y_fake = _apply(layer, v, "fake_quant")
  np.testing.assert_allclose(y_fake, y_int, rtol=1e-5, atol=1e-5)  # float rounding only


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_gradients_are_the_fake_quant_estimators(config):
  layer = QDense(48, config=config)
  v = _state(layer)

  # A loss linear in the output: its cotangent does not depend on the forward value, which the
  # two paths round differently.
  c = jax.random.normal(jax.random.key(3), (2, 8, 48))

  got, want = (_linear_loss_grads(layer, v, X, c, mode) for mode in ("integer", "fake_quant"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  assert float(jnp.abs(got[1]).sum()) > 0  # the input gradient flows (STE)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_takes_the_integer_forward_where_bf16_products_are_fast(fast, monkeypatch):
  monkeypatch.setattr(product, "bf16_matmul_fast", lambda: fast)
  for name in ("w8a8_observer", "w4a8_observer"):
    layer = QDense(48, config=CONFIGS[name])
    v = _state(layer)
    y_auto = _apply(layer, v, "auto")
    integer = fast or name.startswith("w4a8")  # groups: always integer
    np.testing.assert_array_equal(y_auto, _apply(layer, v, "integer" if integer else "fake_quant"))
  # per-channel outputs of the two paths differ somewhere (else this test could not tell)
  assert not np.array_equal(_apply(layer, v, "integer"), _apply(layer, v, "fake_quant"))


def _vjp_value(model, v, mode, x=X):
  """The forward value a train step sees (``jax.vjp``'s primal output), traced under ``mode``."""
  with qatjax.qat_forward(mode):
    return jax.jit(lambda x: jax.vjp(lambda x: model.apply(v, x), x)[0])(x)


def test_auto_trains_groups_on_the_fake_quant_value_and_evaluates_on_the_integer_one(monkeypatch):
  monkeypatch.setattr(product, "bf16_matmul_fast", lambda: True)
  for name in ("w4a8_dynamic_per_token", "w4a8_observer", "w8a8_observer"):
    layer = QDense(48, config=CONFIGS[name])
    v = _state(layer)
    y_int, y_fake = _apply(layer, v, "integer"), _apply(layer, v, "fake_quant")
    assert not np.array_equal(y_int, y_fake)  # else this test could not tell them apart
    np.testing.assert_array_equal(_apply(layer, v, "auto"), y_int)  # evaluation: integer
    grouped = name.startswith("w4a8")  # per channel: the integer value in training too
    np.testing.assert_array_equal(_vjp_value(layer, v, "auto"), y_fake if grouped else y_int)
    np.testing.assert_array_equal(_vjp_value(layer, v, "integer"), y_int)
    np.testing.assert_array_equal(_vjp_value(layer, v, "fake_quant"), y_fake)


def test_bad_integer_kernel_name_raises():
  with pytest.raises(ValueError, match="kernel must be one of"):
    product.integer_when_differentiated("grouped_int4")


def test_unit_choice_follows_the_exactness_bound(monkeypatch):
  monkeypatch.setattr(product, "bf16_matmul_fast", lambda: True)
  with qatjax.qat_forward("auto"):
    assert product.integer_unit(1032, 128, 127, "per_channel") == "bf16"
    assert product.integer_unit(1033, 128, 127, "per_channel") is None  # not exact: fake quant
  with qatjax.qat_forward("integer"):
    assert product.integer_unit(1033, 128, 127, "per_channel") == "int8"
  with qatjax.qat_forward("fake_quant"):
    assert product.integer_unit(16, 128, 127, "grouped") is None
  monkeypatch.setattr(product, "bf16_matmul_fast", lambda: False)
  with qatjax.qat_forward("auto"):
    assert product.integer_unit(16, 128, 127, "per_channel") is None
    assert product.integer_unit(16, 128, 7, "grouped") == "int8"


@pytest.mark.parametrize("k", [1032, 300])
def test_bf16_products_are_the_int32_ones_up_to_the_bound(k):
  rng = np.random.default_rng(k)
  qx = rng.integers(-128, 128, (6, k)).astype(np.int8)
  qw = rng.integers(-127, 128, (k, 5)).astype(np.int8)
  qx[0], qw[:, 0] = -128, -127  # the largest sums: 1032 * 128 * 127 = 16,777,216 - 4,096
  qx[1], qw[:, 1] = 127, 127
  assert exact_dot.exact_in_bf16(k, 128, 127)
  want = qx.astype(np.int64) @ qw.astype(np.int64)
  dims = (((1,), (0,)), ((), ()))
  for bf16 in (True, False):
    got = jax.jit(exact_dot.int_dot_general, static_argnames=("dimension_numbers", "bf16"))(
      jnp.asarray(qx), jnp.asarray(qw), dimension_numbers=dims, bf16=bf16
    )
    np.testing.assert_array_equal(np.asarray(got), want)


def test_exactness_bound():
  assert exact_dot.exact_in_bf16(2**24 // (128 * 127), 128, 127)
  assert not exact_dot.exact_in_bf16(2**24 // (128 * 127) + 1, 128, 127)
  assert exact_dot.exact_in_bf16(16384, 128, 8)
  assert not exact_dot.exact_in_bf16(1, 300, 1)  # bfloat16 holds integers up to 256 only


def test_bad_mode_raises():
  with pytest.raises(ValueError, match="mode must be one of"), qatjax.qat_forward("int8"):
    pass


def test_a_disabled_layer_is_the_float_layer():
  for name in ("w4a8_dynamic_per_token", "w8a8_observer"):
    layer = QDense(48, config=CONFIGS[name])
    v = _state(layer)
    off = qatjax.set_quant_flags(v, enabled=False)
    y_float = nn.Dense(48).apply({"params": v["params"]}, X)
    np.testing.assert_allclose(_apply(layer, off, "integer"), y_float, rtol=1e-6, atol=1e-6)


def test_bfloat16_layers_keep_the_fake_quant_product():
  """The integer kernels return float32: a layer computing in bfloat16 (its ``dtype``) trains
  with the fake-quant product in bfloat16, whatever the mode."""
  layer = QDense(48, dtype=jnp.bfloat16, config=CONFIGS["w8a8_observer"])
  v = _state(layer)
  y = _apply(layer, v, "integer")
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, _apply(layer, v, "fake_quant"))


@pytest.mark.parametrize("bits", [8, 4])
def test_serving_on_bf16_units_gives_the_int8_kernels_outputs(bits, monkeypatch):
  """Converted dense layers with many rows compute their int32 sums on bfloat16 units where
  those are fast: the outputs are bitwise those of the int8 products."""
  from qatjax.core import int_kernels

  x = jax.random.normal(jax.random.key(4), (96, 200))  # more rows than int_kernels.SWAP_ROWS
  layer = QDense(40, config=QuantConfig(bits, 8))
  v = layer.init(jax.random.key(0), x)
  _, stats = layer.apply(v, x, mutable=["quant_stats"])
  qv = qatjax.convert(layer, {**v, **stats}, x)
  outs = {}
  for fast in (True, False):
    monkeypatch.setattr(int_kernels, "bf16_matmul_fast", lambda fast=fast: fast)
    outs[fast] = jax.jit(layer.apply)(qv, x)
  np.testing.assert_array_equal(outs[True], outs[False])
  assert float(jnp.abs(outs[True]).max()) > 0


ATTENTION = {
  "dynamic_per_token": QuantConfig(None, 8, **DYNAMIC),
  "observer": QuantConfig(None, 8),
  "lsq": QuantConfig(None, 8, method="lsq"),
}


@pytest.mark.parametrize(  # int8 products once: the kernel is _int_product's on both units
  "name,unit",
  [(name, "bf16") for name in ATTENTION] + [("observer", "int8")],
  indirect=["unit"],
)
def test_attention_products_train_with_the_integer_models_output(name, unit):
  """Attention's q.k and p.v (activation x activation) take the same integer forward."""
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)
  x = jax.random.normal(jax.random.key(5), (2, 6, 16))
  qm = qatjax.quantize_model(attn, {"query|key|value|out": None, ".*": ATTENTION[name]})
  v = jax.jit(qm.init)(jax.random.key(6), x)
  if "quant_stats" in v and name == "observer":
    _, stats = jax.jit(functools.partial(qm.apply, mutable=["quant_stats"]))(v, x)
    v = {**v, **stats}
  y_int = jax.jit(qm.apply)(qatjax.convert(qm, v, x), x)
  with qatjax.qat_forward("integer"):
    y_train = jax.jit(qm.apply)(v, x)
  if name == "dynamic_per_token":
    # The same integers; the two compiled programs round the per-row rescaling and the softmax
    # after it differently (observed: up to 1e-5 relative; the cause is not isolated).
    np.testing.assert_allclose(y_train, y_int, rtol=3e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(y_train, y_int)

  c = jax.random.normal(jax.random.key(7), y_int.shape)

  # q.k's value feeds the softmax, whose cotangent then differs by the forward's float rounding.
  got, want = (_linear_loss_grads(qm, v, x, c, mode) for mode in ("integer", "fake_quant"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), got, want)

  # "auto" evaluates with the integer value where the products are fast (here: bf16 said fast)
  # and trains on the fake-quant one.
  if unit == "bf16":
    with qatjax.qat_forward("auto"):
      y_auto = jax.jit(qm.apply)(v, x)
    with qatjax.qat_forward("integer"):
      np.testing.assert_array_equal(y_auto, jax.jit(qm.apply)(v, x))
    with qatjax.qat_forward("fake_quant"):
      y_fake = jax.jit(qm.apply)(v, x)
    assert not np.array_equal(y_auto, y_fake)
    np.testing.assert_array_equal(_vjp_value(qm, v, "auto", x), y_fake)
