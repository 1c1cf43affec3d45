"""The weight's straight-through estimator skips its in-range mask only where the mask is all true.

A min/max observer with a symmetric narrow range (``[-127, 127]`` at 8 bits) quantizes with
``max |w| / qmax`` per channel: no weight is clipped, and the backward pass passes the gradient
through without recomputing the mask. An unnarrowed range (``max |w| / 127.5``: the largest
positive weight rounds to 128 and is clipped) and MSE scales (which clip outliers) keep the
mask. Expected values: the gradient of ``x @ qatjax.fake_quant(w, s)`` (the public function,
masked STE) with the layer's scales.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax import QDense, QuantConfig

X = jax.random.normal(jax.random.key(0), (16, 24))
CONFIGS = {
  "minmax_narrow": QuantConfig(8, None),
  "minmax_full_range": QuantConfig(8, None, weight_narrow_range=False),
  "mse": QuantConfig(2, None, weight_calibration="mse"),
  "minmax_4bit_groups": QuantConfig(4, None, weight_granularity="per_group", weight_group_size=8),
}


def _kernel_grads(config):
  layer = QDense(6, config=config)
  v = layer.init(jax.random.key(1), X)
  kernel = v["params"]["kernel"].at[3, 2].set(127.5 / 32)  # its column's max: 127.5 steps of 1/32
  v = {**v, "params": {**v["params"], "kernel": kernel}}
  c = jax.random.normal(jax.random.key(2), (16, 6))

  def loss(k):
    return jnp.sum(c * layer.apply({**v, "params": {**v["params"], "kernel": k}}, X))

  got = jax.jit(jax.grad(loss))(kernel)
  qa = qatjax.convert(layer, v, X)["params"]["kernel"]
  spec = config.weight_quant
  if spec.group_size is None:  # one scale per column
    kw = dict(axis=1)
    scale = jnp.asarray(qa.scale).reshape(-1)
  else:  # groups of 8 rows: (3, 6) scales
    kw = dict(axis=0, group_size=spec.group_size)
    scale = jnp.asarray(qa.scale).reshape(-1, 6)

  def reference(k):
    w = qatjax.fake_quant(k, scale, None, spec.qmin, spec.qmax, **kw)
    return jnp.sum(c * (X @ w + v["params"]["bias"]))

  return got, jax.grad(reference)(kernel)


@pytest.mark.parametrize("name", CONFIGS)
def test_kernel_gradient_is_the_masked_ste(name):
  got, want = _kernel_grads(CONFIGS[name])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  clipped = int(np.sum(np.asarray(want) == 0))
  if name in ("minmax_full_range", "mse"):
    assert clipped > 0  # these scales clip: the mask matters (and is kept)
  else:
    assert clipped == 0  # nothing clipped: the mask is all true (and is skipped)


def test_observer_weight_scales_ignore_nan():
  layer = QDense(6, config=QuantConfig(8, None))
  v = layer.init(jax.random.key(1), X)
  kernel = np.asarray(v["params"]["kernel"]).copy()
  kernel[5, 1] = np.nan
  v = {**v, "params": {**v["params"], "kernel": jnp.asarray(kernel)}}
  scale = np.asarray(qatjax.convert(layer, v, X)["params"]["kernel"].scale).reshape(-1)
  np.testing.assert_allclose(scale, np.nanmax(np.abs(kernel), axis=0) / 127, rtol=1e-6)
