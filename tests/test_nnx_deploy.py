"""Converting and serving NNX models: ``qatjax.nnx.convert``, ``model_size``, the single-file
format and ``jax.export``.

* ``convert`` returns a copy whose quantized layers hold ``QArray`` kernels (packed at 4 bits)
  and only what serving needs, leaves the QAT model as it was, and runs integer kernels (int8
  operands, int32 accumulation in the compiled program) whose outputs match the fake-quant model.
* An observer that never saw data is refused, naming the layer.
* ``model_size``, ``save_quantized`` / ``load_quantized`` (back into a freshly built model) and
  ``export_stablehlo`` take the converted NNX model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_layers_helpers import cheap_init, rand

import qatjax
import qatjax.nnx as qnnx
from qatjax import QArray, QuantConfig

RULES = {
  "conv": QuantConfig(8, 8),
  "proj": QuantConfig(4, 8, weight_granularity="per_group", weight_group_size=2),
  "head": QuantConfig(4, 4, method="lsq"),
}


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = qnnx.QConvBN(3, 4, (3, 3), kernel_init=cheap_init, rngs=rngs)
    self.proj = nnx.LinearGeneral(4, (2, 3), kernel_init=cheap_init, rngs=rngs)
    self.head = nnx.Linear(6, 5, kernel_init=cheap_init, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv(x)).mean(axis=(1, 2))
    return self.head(self.proj(h).reshape(x.shape[0], -1))


def _trained(x):
  model = Net(nnx.Rngs(0))
  model.conv.mean[...] = jnp.full((4,), 0.1)
  qnnx.quantize_model(model, RULES, x)
  model.train()
  nnx.jit(lambda m, x: m(x))(model, x * 1.5)  # the observers see one more batch
  model.eval()
  return model


@pytest.fixture(scope="module")
def converted():
  x = rand((4, 6, 6, 3), 0)
  model = _trained(x)
  return model, qnnx.convert(model, x), x


def test_convert_serves_integer_kernels(converted):
  model, int_model, x = converted
  kernels = {name: getattr(int_model, name).kernel.get_value() for name in ("conv", "proj", "head")}
  assert all(isinstance(k, QArray) for k in kernels.values())
  assert kernels["conv"].values.dtype == jnp.int8 and kernels["head"].values.dtype == jnp.uint8
  assert kernels["proj"].shape == (4, 2, 3) and kernels["proj"].group_size == 2
  conv_vars = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(int_model.conv))}
  assert conv_vars == {
    "kernel",
    "kernel_sum",
    "bias",
    "input_scale",
    "input_zero_point",
    "input_bits",
  }
  assert not nnx.to_flat_state(nnx.state(int_model, qnnx.QuantStat))
  # The QAT model is untouched.
  assert not isinstance(model.conv.kernel.get_value(), QArray)
  assert int(model.conv.input_count[...]) == 2

  jaxpr = str(jax.make_jaxpr(lambda x: int_model(x))(x))
  assert "preferred_element_type=int32" in jaxpr and "i8[" in jaxpr
  y_int, y_fq = nnx.jit(lambda m, x: m(x))(int_model, x), model(x)
  np.testing.assert_allclose(y_int, y_fq, rtol=1e-3, atol=1e-3)


def test_convert_refuses_an_uncalibrated_observer():
  model, x = Net(nnx.Rngs(0)), rand((2, 6, 6, 3), 1)
  qnnx.quantize_model(model, RULES, x)
  model.conv.input_count[...] = 0  # as if the observer never saw data
  with pytest.raises(ValueError, match="layer conv has no activation statistics"):
    qnnx.convert(model, x)


def test_size_file_and_export_take_the_nnx_model(converted, tmp_path):
  _, int_model, x = converted
  size, float_size = qatjax.model_size(int_model), qatjax.model_size(Net(nnx.Rngs(0)))
  assert size.total == qatjax.model_size(qnnx.to_variables(int_model)).total
  assert size["head"].weight_bytes == 6 * 5 // 2 and size.total < float_size.total

  path = tmp_path / "net.qjx"
  qatjax.save_quantized(path, int_model)
  served = Net(nnx.Rngs(7))  # rebuilt: same architecture and rules, other random weights
  qnnx.quantize_model(served, RULES, x)
  qnnx.load_variables(served, qatjax.load_quantized(path))
  served.eval()
  y = int_model(x)
  np.testing.assert_array_equal(served(x), y)

  blob = qatjax.export.export_stablehlo(int_model, None, x, dynamic_batch=True)
  np.testing.assert_allclose(jax.export.deserialize(blob).call(x), y, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="qvars is required"):
    qatjax.export.export_stablehlo(qatjax.QDense(2), None, x)
