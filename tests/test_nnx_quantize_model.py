"""``qatjax.nnx.quantize_model``: in place, no weight copied, rules on NNX paths, bad input.

* The quantized layers are the float model's own objects holding its own ``Param`` objects and
  arrays; the live array bytes while quantizing a model of 100 MB of weights stay under 1.1x the
  weights (sampled from a second thread all through the call).
* Rules full-match NNX paths (attribute names and list indices joined by ``/``); float
  ``QConvBN`` modules take their rule's config; unmatched rules warn; ``rules_report`` lists.
* Bad input (a matched layer with no quantized counterpart, quantizing twice, a custom
  ``dot_general``, an example that does not fit, a float state of other shapes) raises a
  ``ValueError`` naming the layer path, and leaves the model as it was.
"""

import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_layers_helpers import cheap_init, rand

import qatjax.nnx as qnnx
from qatjax import QuantConfig, rules

W8A8, LSQ4 = QuantConfig(8, 8), QuantConfig(4, 4, method="lsq")


class Block(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(8, 8, kernel_init=cheap_init, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.fc(x))


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = qnnx.QConvBN(3, 4, (3, 3), kernel_init=cheap_init, rngs=rngs)  # float
    self.proj = nnx.Linear(4, 8, kernel_init=cheap_init, rngs=rngs)
    self.blocks = nnx.List([Block(rngs), Block(rngs)])
    self.head = nnx.Linear(8, 3, kernel_init=cheap_init, rngs=rngs)

  def __call__(self, x):
    h = self.proj(nnx.relu(self.conv(x)).mean(axis=(1, 2)))
    for block in self.blocks:
      h = block(h)
    return self.head(h)


def _state_snapshot(model):
  """Every variable of the model: ``{path: (type, value)}``."""
  return {p: (type(v), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_in_place_rules_on_paths_and_float_qconvbn():
  model, x = Net(nnx.Rngs(0)), rand((2, 5, 5, 3), 1)
  model.eval()
  y_float = model(x)
  before = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  arrays = {p: v.get_value() for p, v in before.items()}
  block1 = model.blocks[1]
  r = rules({"conv": W8A8, "blocks/0/fc": LSQ4, "blocks/1/fc": W8A8, "head": None, "proj": None})
  assert qnnx.rules_report(model, r) == {
    "conv": ["conv"],
    "blocks/0/fc": ["blocks/0/fc"],
    "blocks/1/fc": ["blocks/1/fc"],
    "head": ["head"],
    "proj": ["proj"],
  }
  assert qnnx.quantize_model(model, r, x) is model

  assert [type(b.fc).__name__ for b in model.blocks] == ["QLinear", "QLinear"]
  assert type(model.head) is nnx.Linear and type(model.proj) is nnx.Linear
  assert model.conv.config == W8A8 and model.blocks[0].fc.config == LSQ4
  assert model.blocks[1] is block1  # the same objects, now quantized
  after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in before.items():
    assert after[path] is var and var.get_value() is arrays[path], path  # no copy
  assert set(after) - set(before) == {
    ("blocks", 0, "fc", name) for name in ("kernel_scale", "input_scale", "input_zero_point")
  }
  stats = nnx.to_pure_dict(nnx.state(model, qnnx.QuantStat))
  assert sorted(stats["blocks"][1]["fc"]) == sorted(
    ["enabled", "observe", "input_min", "input_max", "input_count", "input_count_from_float"]
  )
  assert int(stats["conv"]["input_count"]) == 1  # the observer saw the example once
  assert model.blocks[1].fc.quant_path == "blocks/1/fc"
  qnnx.set_quant_flags(model, enabled=False)
  np.testing.assert_allclose(model(x), y_float, rtol=1e-6, atol=1e-6)  # still the float model


def test_unmatched_rule_warns_and_single_config():
  model = nnx.Sequential(nnx.Linear(3, 4, kernel_init=cheap_init, rngs=nnx.Rngs(0)))
  with pytest.warns(UserWarning, match=r"\['attn'\] matched no quantizable layer"):
    qnnx.quantize_model(model, {"layers/0": W8A8, "attn": W8A8}, jnp.ones((1, 3)))
  other = nnx.Sequential(nnx.Linear(3, 4, kernel_init=cheap_init, rngs=nnx.Rngs(0)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    qnnx.quantize_model(other, LSQ4, jnp.ones((1, 3)))
  assert type(other.layers[0]) is qnnx.QLinear


def _live_bytes():
  return sum(a.nbytes for a in jax.live_arrays())


def test_quantizing_100mb_peaks_under_1_1x_the_weights():
  n, d = 25, 1024  # 25 kernels of 4 MiB: 100 MiB of weights
  others = _live_bytes()  # arrays other tests of this process keep alive

  def const_init(key, shape, dtype):
    return jnp.full(shape, 1e-2, dtype) + jax.random.uniform(key, shape[-1:], dtype) * 1e-3

  model = nnx.Sequential(
    *[nnx.Linear(d, d, kernel_init=const_init, use_bias=False, rngs=nnx.Rngs(i)) for i in range(n)]
  )
  x = jnp.ones((2, d))
  weights = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert weights == n * d * d * 4
  base = _live_bytes() - others
  assert weights <= base < 1.01 * weights
  peak, done = [base], threading.Event()

  def sample():
    while not done.is_set():
      peak.append(_live_bytes() - others)
      time.sleep(0.002)

  sampler = threading.Thread(target=sample)
  sampler.start()
  try:
    qnnx.quantize_model(model, W8A8, x)
  finally:
    done.set()
    sampler.join()
  peak.append(_live_bytes() - others)
  assert len(peak) > 3
  assert max(peak) <= 1.1 * weights, (max(peak) / weights, base / weights)
  assert all(type(m) is qnnx.QLinear for m in model.layers)


def _variables_of(model):
  """Types, paths and values of every variable, and the class of every module."""
  return _state_snapshot(model), [type(m) for _, m in nnx.iter_modules(model)]


def _unchanged(model, snapshot):
  state, types = _variables_of(model)
  assert types == snapshot[1]
  assert state.keys() == snapshot[0].keys()
  for path, (kind, value) in snapshot[0].items():
    assert state[path][0] is kind and state[path][1] is value, path


@pytest.mark.parametrize(
  "case", ["no_counterpart", "twice", "custom_dot_general", "example_does_not_fit"]
)
def test_bad_input_names_the_layer_and_changes_nothing(case):
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
    nnx.Linear(4, 6, kernel_init=cheap_init, rngs=rngs),
    nnx.ConvTranspose(6, 2, (1,), kernel_init=cheap_init, rngs=rngs),
  )
  x, rule = jnp.ones((2, 1, 4)), {"layers/0": W8A8}
  if case == "no_counterpart":
    rule, match = {".*": W8A8}, r"layer layers/1: ConvTranspose has no quantized counterpart"
  elif case == "twice":
    qnnx.quantize_model(model, rule, x)
    match = r"layer layers/0: already quantized"
  elif case == "custom_dot_general":
    model.layers[0].dot_general = lambda *a, **k: jax.lax.dot_general(*a, **k)
    match = r"layer layers/0: Linear with a custom dot_general cannot be quantized"
  else:
    x, match = jnp.ones((2, 1, 5)), r"layer layers/0: input feature size 5 does not match"
  snapshot = _variables_of(model)
  with pytest.raises(ValueError, match=match):
    qnnx.quantize_model(model, rule, x)
  _unchanged(model, snapshot)


def test_float_state_loads_and_mismatched_shapes_name_the_layer():
  float_model = nnx.Sequential(
    nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1))
  )
  q = nnx.Sequential(
    qnnx.QLinear(3, 4, config=W8A8, rngs=nnx.Rngs(5)),
    qnnx.QLinear(4, 2, config=W8A8, rngs=nnx.Rngs(6)),
  )
  qnnx.load_variables(q, nnx.state(float_model))  # same names: a float state loads
  for a, b in zip(q.layers, float_model.layers):
    np.testing.assert_array_equal(a.kernel[...], b.kernel[...])
  wide = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(2)), nnx.Linear(4, 3, rngs=nnx.Rngs(3)))
  snapshot = _variables_of(q)
  with pytest.raises(ValueError, match=r"layer layers/1: params/bias has shape \(3,\)"):
    qnnx.load_variables(q, nnx.state(wide))
  _unchanged(q, snapshot)  # layers/0 was checked, not written


def test_direct_modules_need_their_example_pass():
  layer = qnnx.QLinear(3, 2, config=LSQ4, rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError, match=r"layer <QLinear>: .*'enabled' does not exist yet.*init_quantizers"
  ):
    nnx.jit(lambda m, x: m(x))(layer, jnp.ones((1, 3)))
  ruled = nnx.Sequential(qnnx.QLinear(3, 2, config=rules({"layers/0": W8A8}), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="QuantRules but no path yet"):
    ruled(jnp.ones((1, 3)))
  qnnx.init_quantizers(ruled, jnp.ones((1, 3)))
  assert ruled.layers[0].quant_config == W8A8 and ruled.layers[0].quant_path == "layers/0"
  with pytest.raises(ValueError, match="cannot be quantized"):
    qnnx.QConv(3, 2, (3,), mask=jnp.ones((3, 3, 2)), config=W8A8, rngs=nnx.Rngs(0))
