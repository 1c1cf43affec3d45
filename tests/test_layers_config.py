"""Bad input gives a ValueError naming the argument or layer path and the offending value.

Construction time: ``QuantConfig`` fields, ``rules``. Call time (jitted or not): an input whose
feature size does not match an initialised QDense / QDenseGeneral / QConv, a QConv input of the
wrong rank, a non-integer QEmbed input, a config of the wrong type.
"""

import functools
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from test_layers_helpers import cheap_init

import qatjax
from qatjax import QConv, QDense, QDenseGeneral, QEmbed, QuantConfig


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(weight_bits=1), r"weight_bits.*2\.\.8.*got 1"),
    (dict(weight_bits=9), r"weight_bits.*got 9"),
    (dict(weight_bits=8.0), r"weight_bits.*got 8\.0"),
    (dict(weight_bits=True), r"weight_bits.*got True"),
    (dict(act_bits=9), r"act_bits.*2\.\.8.*got 9"),
    (dict(act_bits=0), r"act_bits.*got 0"),
    (dict(method="lsq+"), r"method.*\('observer', 'lsq'\).*'lsq\+'"),
    (dict(weight_granularity="per_row"), r"weight_granularity.*'per_row'"),
    (dict(weight_granularity="per_group"), r"weight_group_size.*per_group.*None"),
    (dict(weight_group_size=32), r"weight_group_size.*'per_channel'.*32"),
    (dict(weight_granularity="per_group", weight_group_size=0), r"weight_group_size.*got 0"),
    (dict(weight_granularity="per_group", weight_group_size=2.5), r"weight_group_size.*2\.5"),
    (dict(weight_calibration="kl"), r"weight_calibration.*'kl'"),
    (dict(act_calibration="histogram"), r"act_calibration.*'histogram'"),
    (dict(act_momentum=0.0), r"act_momentum.*\(0, 1\].*0\.0"),
    (dict(act_momentum=1.5), r"act_momentum.*1\.5"),
    (dict(pact=True, act_bits=None), r"pact.*act_bits=None"),
    (dict(pact=True, act_symmetric=True), r"pact.*act_symmetric"),
    (dict(pact=True, pact_init=0.0), r"pact_init.*0\.0"),
    (dict(method="lsq", weight_calibration="mse"), r"weight_calibration.*'mse'.*lsq"),
    (dict(weight_bits=None, act_bits=None), r"quantizes nothing"),
    (dict(act_calibration="percentile", act_percentile=50.0), r"act_percentile.*\(50, 100\].*50"),
    (dict(act_calibration="percentile", act_percentile=101), r"act_percentile.*101"),
    (dict(act_calibration="percentile", act_percentile="99"), r"act_percentile.*'99'"),
    (dict(act_percentile=99.0), r"act_percentile.*'percentile' only.*99\.0.*'ema'"),
  ],
)
def test_quant_config_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantConfig(**kwargs)


def test_rules_reject():
  with pytest.raises(ValueError, match=r"rule regex 'Conv_\(0' does not compile"):
    qatjax.rules({"Dense_0": QuantConfig(), "Conv_(0": QuantConfig()})
  with pytest.raises(ValueError, match=r"rule 'Dense_0' must map to a QuantConfig or None.*int8"):
    qatjax.rules({"Dense_0": "int8"})
  with pytest.raises(ValueError, match=r"rules expects a mapping.*\['Dense_0'\]"):
    qatjax.rules(["Dense_0"])
  with pytest.raises(ValueError, match=r"rules must be a QuantRules.*'int8'"):
    qatjax.quantize_model(nn.Dense(3), "int8")
  with pytest.raises(ValueError, match="quant_stats"):
    qatjax.set_quant_flags({"params": {}}, enabled=False)


class Net(nn.Module):
  """``make(name="head")`` nested in a block: error messages must carry the full path."""

  make: Callable

  @nn.compact
  def __call__(self, x):
    return Block(self.make, name="block")(x)


class Block(nn.Module):
  make: Callable

  @nn.compact
  def __call__(self, x):
    return self.make(name="head")(x)


CFG = QuantConfig()


def _zero_variables(net, x):
  """Variables of the right tree and shapes, as numpy zeros: the errors under test are raised
  before any computation, so nothing needs compiling (jitted, they are raised while tracing)."""
  shapes = jax.eval_shape(net.init, jax.random.key(0), x)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# (name, layer, good input shape, bad input shape, error pattern)
FEATURE_SIZE_CASES = [
  (
    "dense",
    functools.partial(QDense, 4, kernel_init=cheap_init),
    (2, 3),
    (2, 5),
    r"layer block/head: input feature size \(5,\) does not match its kernel.*\(3,\)",
  ),
  (
    "dense_general",
    functools.partial(QDenseGeneral, (2, 3), axis=(-2, -1), kernel_init=cheap_init),
    (2, 3, 4),
    (2, 3, 5),
    r"layer block/head: input shape \(3, 5\) does not match.*\(3, 4\)",
  ),
  (
    "conv2d",
    functools.partial(QConv, 8, (3, 3), kernel_init=cheap_init),
    (1, 6, 6, 3),
    (1, 6, 6, 5),
    r"layer block/head: input of shape \(1, 6, 6, 5\) needs a kernel of shape \(3, 3, 5, 8\)"
    r".*\(3, 3, 3, 8\)",
  ),
  (
    "conv1d_grouped",
    functools.partial(QConv, 6, (3,), feature_group_count=3, kernel_init=cheap_init),
    (1, 6, 6),
    (1, 6, 9),
    r"layer block/head: input of shape \(1, 6, 9\) needs a kernel of shape \(3, 3, 6\)"
    r".*\(3, 2, 6\)",
  ),
]


class CallTimeErrorsTest(chex.TestCase):
  """Errors raised when a layer is called, jitted (while tracing) and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    (f"{name}_{config_name}", layer, good, bad, match, config)
    for name, layer, good, bad, match in FEATURE_SIZE_CASES
    for config_name, config in (("float", None), ("quantized", CFG))
  )
  def test_wrong_feature_size_names_layer_and_shapes(self, layer, good, bad, match, config):
    net = Net(functools.partial(layer, config=config))
    v = _zero_variables(net, jnp.ones(good))
    with pytest.raises(ValueError, match=match):
      self.variant(net.apply)(v, jnp.ones(bad))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("float", None), ("quantized", CFG))
  def test_conv_wrong_rank_names_layer_and_shape(self, config):
    net = Net(functools.partial(QConv, 8, (3, 3), config=config, kernel_init=cheap_init))
    with pytest.raises(
      ValueError,
      match=r"layer block/head: a 2-D convolution needs inputs of "
      r"rank >= 3.*got shape \(6, 3\)",
    ):
      self.variant(net.init)(jax.random.key(0), jnp.ones((6, 3)))
    v = _zero_variables(net, jnp.ones((1, 6, 6, 3)))
    with pytest.raises(ValueError, match=r"block/head.*rank >= 3.*\(6, 3\)"):
      self.variant(net.apply)(v, jnp.ones((6, 3)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("float", None), ("quantized", QuantConfig(4, None)))
  def test_embed_rejects_non_integer_input(self, config):
    net = Net(functools.partial(QEmbed, 10, 4, config=config, embedding_init=cheap_init))
    v = _zero_variables(net, jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"layer block/head: inputs must be integers, got float32"):
      self.variant(net.apply)(v, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"block/head.*integers.*bool"):
      self.variant(net.apply)(v, jnp.array([True, False]))


def test_conv_bad_geometry():
  with pytest.raises(
    ValueError,
    match=r"block/head: input features 5 are not divisible by "
    r"feature_group_count=2",
  ):
    Net(functools.partial(QConv, 4, (3,), feature_group_count=2, config=CFG)).init(
      jax.random.key(0), jnp.ones((1, 6, 5))
    )
  with pytest.raises(
    ValueError,
    match=r"block/head: kernel_size must have 1 to 3 dims.*"
    r"\(1, 1, 1, 1\)",
  ):
    Net(functools.partial(QConv, 4, (1, 1, 1, 1), config=CFG)).init(
      jax.random.key(0), jnp.ones((1, 2, 2, 2, 2, 2))
    )


def test_wrong_config_type_names_layer():
  net = Net(functools.partial(QDense, 3, config="int8"))
  with pytest.raises(
    ValueError,
    match=r"config of layer 'block/head' must be a QuantConfig, "
    r"QuantRules or None, got 'int8'",
  ):
    net.init(jax.random.key(0), jnp.ones((1, 2)))
