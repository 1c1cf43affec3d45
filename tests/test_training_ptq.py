"""qatjax.training: post-training quantization (calibrate, mode="ptq") versus QAT."""

import functools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from qatjax import QuantConfig, from_float, quantize_model
from qatjax.training import calibrate, create_train_state, iterate_batches, make_train_step

CFG = QuantConfig(act_calibration="minmax")
FLOAT = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
QMODEL = quantize_model(FLOAT, CFG)


@functools.lru_cache(maxsize=None)
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 4)).astype(np.float32)
  y = rng.integers(0, 3, 48).astype(np.int32)
  fvars = jax.jit(FLOAT.init)(jax.random.key(0), x)
  qvars = jax.tree.map(np.asarray, from_float(QMODEL, fvars, x[:4]))
  return x, y, qvars


def same(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
    np.array_equal(u, v) and u.dtype == v.dtype for u, v in zip(la, lb)
  )


def test_calibrate_model_and_state():
  x, y, qvars = setup()
  out = calibrate(QMODEL, iterate_batches((x, y), 8), 3, variables=qvars)
  assert same(out["params"], qvars["params"])  # no gradient step
  st = out["quant_stats"]["layers_0"]
  seen = np.concatenate([x[:4], x[:24]])  # from_float's example batch + 3 calibration batches
  np.testing.assert_allclose(float(st["input_min"]), seen.min(), rtol=1e-6)
  np.testing.assert_allclose(float(st["input_max"]), seen.max(), rtol=1e-6)
  assert int(st["input_count"]) == int(qvars["quant_stats"]["layers_0"]["input_count"]) + 3

  state = create_train_state(QMODEL, optax.adam(1e-2), None, x[:4], variables=qvars)
  cal = calibrate(state, [x[:8], (x[8:16], y[8:16])])  # arrays or (x, y) tuples
  assert same(cal.params, state.params) and same(cal.opt_state, state.opt_state)
  assert int(cal.step) == 0
  assert (
    int(cal.quant_stats["layers_0"]["input_count"])
    == int(state.quant_stats["layers_0"]["input_count"]) + 2
  )


def test_calibrate_keeps_observe_flag():
  from qatjax import set_quant_flags

  x, _, qvars = setup()
  qvars = set_quant_flags(qvars, observe=False)
  out = calibrate(QMODEL, [x[:8]], variables=qvars)
  assert not bool(out["quant_stats"]["layers_0"]["observe"])
  assert (
    int(out["quant_stats"]["layers_0"]["input_count"])
    == int(qvars["quant_stats"]["layers_0"]["input_count"]) + 1
  )


def test_ptq_versus_qat_is_one_switch():
  x, y, qvars = setup()
  state = create_train_state(QMODEL, optax.adam(1e-2), None, x[:4], variables=qvars)
  results = {}
  for mode in ("ptq", "qat"):
    step, s = make_train_step(mode=mode), state
    for batch in iterate_batches((x, y), 16):
      s, metrics = step(s, batch)
    results[mode] = s
    assert int(s.step) == 3 and "loss" in metrics
  ptq, qat = results["ptq"], results["qat"]
  assert same(ptq.params, state.params) and same(ptq.opt_state, state.opt_state)
  assert not same(ptq.quant_stats, state.quant_stats)  # observers calibrated
  assert not same(qat.params, state.params)  # QAT trained the weights


def test_calibrate_errors():
  x, y, qvars = setup()
  with pytest.raises(ValueError, match="yielded 2 batches, expected 5"):
    calibrate(QMODEL, iterate_batches((x[:16], y[:16]), 8), 5, variables=qvars)
  with pytest.raises(ValueError, match="variables="):
    calibrate(QMODEL, [x])
  with pytest.raises(ValueError, match="num_batches"):
    calibrate(QMODEL, [x], 0, variables=qvars)
  fvars = jax.jit(FLOAT.init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match="quant_stats"):
    calibrate(FLOAT, [x], variables=fvars)
