"""A quantized layer's backward pass keeps what the float layer's keeps (issue 12, item 7).

Counted with JAX's saved-residuals accounting (the function behind
``jax.ad_checkpoint.print_saved_residuals``) on the same model built float (``config=None``:
exactly the Flax layers) and quantized. Without the rematerialized fake quantization the
quantized MLP kept 1.7x (observers) to 2x (LSQ) the float bytes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals

import qatjax
from qatjax import QConv, QDense, QuantConfig

CONFIGS = {
  "observer": QuantConfig(8, 8),
  "lsq": QuantConfig(8, 8, method="lsq"),
  "w4a8_dynamic_g16": QuantConfig(
    4,
    8,
    weight_granularity="per_group",
    weight_group_size=16,
    act_calibration="dynamic",
    act_granularity="per_token",
  ),
}


class MLP(nn.Module):
  config: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(QDense(64, config=self.config)(x))
    x = nn.relu(QDense(64, config=self.config)(x))
    return QDense(10, config=self.config)(x)


class CNN(nn.Module):
  config: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(QConv(8, (3, 3), config=self.config)(x))
    return QDense(10, config=self.config)(x.reshape(x.shape[0], -1))


def _activation_residuals(model, x):
  """Sorted ``(dtype, shape)`` of the residuals over 1 KiB that are not parameters (the
  parameters exist anyway; up to 1 KiB: the quantizers' scales, a few bytes per channel)."""
  variables = jax.jit(model.init)(jax.random.key(0), x)
  stats = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    y, _ = model.apply({**stats, "params": params}, x, mutable=sorted(stats))
    return jnp.sum(y**2)

  return sorted(
    (a.dtype.name, a.shape)
    for a, why in saved_residuals(loss, variables["params"])
    if not why.startswith("from the argument") and a.size * a.dtype.itemsize > 1024
  )


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_quantized_step_keeps_no_more_than_float(arch, config):
  if arch == "cnn" and config.act_granularity == "per_token":
    pytest.skip("convolutions quantize activations per tensor")
  cls, x = (MLP, jnp.ones((32, 48))) if arch == "mlp" else (CNN, jnp.ones((4, 8, 8, 3)))
  float_residuals = _activation_residuals(cls(None), x)
  assert float_residuals  # the input, the relu outputs and masks
  assert _activation_residuals(cls(config), x) == float_residuals


def test_quantize_model_keeps_no_more_than_float():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))

  x = jnp.ones((64, 8))
  quantized = qatjax.quantize_model(Net(), QuantConfig(8, 8))
  assert _activation_residuals(quantized, x) == _activation_residuals(Net(), x)
