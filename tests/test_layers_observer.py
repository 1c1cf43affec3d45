"""Observer (min/max) activation quantizers inside layers: when statistics move, and what eval uses.

* ``quant_stats`` moves only when the caller makes it mutable and is not initializing;
* ``observe=False`` freezes it (count included), ``enabled=False`` does not;
* in eval (immutable) the layer uses the stored range, never the current batch's;
* uncalibrated (``input_count == 0``) the input passes through un-quantized.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax import QAct, QConv, QDense, QuantConfig

VARIANTS = {"with_jit": jax.jit, "without_jit": lambda f: f}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
  return VARIANTS[request.param]


def _rand(shape, seed, scale=1.0, shift=0.0):
  return jnp.asarray(shift + scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _zeros_init(key, shape, dtype=jnp.float32):
  return jnp.linspace(-0.5, 0.5, int(np.prod(shape)), dtype=dtype).reshape(shape)


LAYERS = {
  "dense": (lambda cfg: QDense(3, config=cfg, kernel_init=_zeros_init), (4, 5)),
  "conv": (lambda cfg: QConv(3, (3,), config=cfg, kernel_init=_zeros_init), (4, 6, 2)),
}


def _weight_only(make, v, x):
  """The same layer (same params) with weight-only quantization, applied to ``x``."""
  q = make(QuantConfig(8, None))
  return q.apply({**q.init(jax.random.key(0), x), "params": v["params"]}, x)


def _stats(v):
  s = v["quant_stats"]
  return float(s["input_min"]), float(s["input_max"]), int(s["input_count"])


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_stats_move_only_when_mutable_and_not_initializing(layer, variant):
  make, shape = LAYERS[layer]
  q = make(QuantConfig(act_momentum=0.25))
  x1, x2 = _rand(shape, 1), _rand(shape, 2, 3.0, 1.0)

  def run(v, x1, x2):
    # Initializing never calibrates, even though init makes every collection mutable.
    v0 = q.init(jax.random.key(0), x1)
    _, s1 = q.apply(v, x1, mutable=["quant_stats"])
    _, s2 = q.apply({**v, **s1}, x2, mutable=["quant_stats"])
    _, s_all = q.apply(v, x1, mutable=True)
    _, s_params_only = q.apply(v, x1, mutable=["params"])
    return v0, {**v, **s1}, {**v, **s2}, {**v, **s_all}, s_params_only

  v = q.init(jax.random.key(0), x1)
  v0, v1, v2, v_all, s_params_only = variant(run)(v, x1, x2)
  assert _stats(v0) == (0.0, 0.0, 0)
  lo1, hi1 = float(x1.min()), float(x1.max())
  np.testing.assert_allclose(_stats(v1)[:2], (lo1, hi1), rtol=1e-6)  # the first batch sets it
  assert _stats(v1)[2] == 1
  # then an EMA with momentum 0.25
  want = (lo1 + 0.25 * (float(x2.min()) - lo1), hi1 + 0.25 * (float(x2.max()) - hi1))
  np.testing.assert_allclose(_stats(v2)[:2], want, rtol=1e-6)
  assert _stats(v2)[2] == 2
  assert _stats(v_all) == _stats(v1)
  assert "quant_stats" not in s_params_only
  # Immutable: apply returns only the output, stats cannot move.
  y = variant(q.apply)(v, x1)
  assert isinstance(y, jax.Array)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_observe_false_freezes_and_enabled_false_does_not(layer, variant):
  make, shape = LAYERS[layer]
  q = make(QuantConfig())
  x1, x2 = _rand(shape, 1), _rand(shape, 2, 3.0)
  v = q.init(jax.random.key(0), x1)
  _, s = q.apply(v, x1, mutable=["quant_stats"])
  v1 = {**v, **s}

  def step(v, x):
    return q.apply(v, x, mutable=["quant_stats"])[1]

  frozen = variant(step)(qatjax.set_quant_flags(v1, observe=False), x2)
  assert _stats(frozen) == _stats(v1)
  assert not bool(frozen["quant_stats"]["observe"])
  # Fake quantization off: the observer still calibrates (the usual first phase of QAT).
  moved = variant(step)(qatjax.set_quant_flags(v1, enabled=False), x2)
  assert _stats(moved)[2] == 2 and _stats(moved) != _stats(v1)
  # Flags flipped per layer path.
  both = qatjax.set_quant_flags(v1, observe=False, path="^Nothing$")
  assert bool(both["quant_stats"]["observe"])


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_eval_uses_stored_stats_never_the_batch(layer, variant):
  make, shape = LAYERS[layer]
  q = make(QuantConfig(act_calibration="minmax"))
  x_cal = _rand(shape, 0)
  v = q.init(jax.random.key(0), x_cal)
  _, s = q.apply(v, x_cal, mutable=["quant_stats"])
  v = {**v, **s}
  # Two batches sharing example 0; the rest of batch b has a 50x wider range.
  b1 = _rand(shape, 1)
  b2 = b1.at[1:].multiply(50.0)

  def run(v, b1, b2):
    eval1, eval2 = q.apply(v, b1), q.apply(v, b2)
    train1, _ = q.apply(v, b1, mutable=["quant_stats"])
    train2, _ = q.apply(v, b2, mutable=["quant_stats"])
    return eval1, eval2, train1, train2

  eval1, eval2, train1, train2 = variant(run)(v, b1, b2)
  np.testing.assert_array_equal(eval1[0], eval2[0])
  # Training (mutable) updates the range with the batch first, so there it does differ: the
  # equality above is not vacuous.
  assert not np.allclose(train1[0], train2[0], rtol=1e-3)
  # The stored range clips the wide batch.
  lo, hi = float(v["quant_stats"]["input_min"]), float(v["quant_stats"]["input_max"])
  w_only = np.asarray(_weight_only(make, v, jnp.clip(b2, lo, hi)))
  assert np.abs(np.asarray(eval2) - w_only).max() < 0.05 * np.abs(w_only).max()


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_uncalibrated_passes_input_through(layer, variant):
  make, shape = LAYERS[layer]
  x = _rand(shape, 3)
  q = make(QuantConfig(8, 8))
  v = q.init(jax.random.key(0), x)
  assert int(v["quant_stats"]["input_count"]) == 0
  y = variant(q.apply)(v, x)
  # Only the kernel is quantized: exactly the weight-only layer.
  np.testing.assert_array_equal(y, _weight_only(make, v, x))
  # Once calibrated the input is quantized too.
  _, s = q.apply(v, x, mutable=["quant_stats"])
  assert not np.array_equal(variant(q.apply)({**v, **s}, x), y)


def test_qact_uncalibrated_identity_then_on_grid(variant):
  q = QAct(QuantConfig(weight_bits=None, act_bits=4))
  x = _rand((16,), 0)
  v = q.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variant(q.apply)(v, x), x)
  y, s = variant(lambda v, x: q.apply(v, x, mutable=["quant_stats"]))(v, x)
  lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
  scale = (hi - lo) / 15
  k = np.asarray(y) / scale + np.round(-lo / scale)  # y = (k - zero_point) * scale
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)
  assert np.round(k).min() >= 0 and np.round(k).max() <= 15
  assert len(np.unique(np.asarray(y))) <= 16
  assert int(s["quant_stats"]["input_count"]) == 1


def test_calibration_kinds_track_different_ranges():
  x = _rand((64, 5), 0, shift=0.5)
  x2 = _rand((64, 5), 1, 0.5)
  kinds = ("ema", "minmax", "percentile", "mse")

  @jax.jit
  def run(x, x2):
    out = {}
    for kind in kinds:
      q = QDense(
        3, config=QuantConfig(act_calibration=kind, act_momentum=0.5), kernel_init=_zeros_init
      )
      v = q.init(jax.random.key(0), x)
      for b in (x, x2):
        _, s = q.apply(v, b, mutable=["quant_stats"])
        v = {**v, **s}
      out[kind] = v
    return out

  out = {kind: _stats(v) for kind, v in run(x, x2).items()}
  lo, hi = min(float(x.min()), float(x2.min())), max(float(x.max()), float(x2.max()))
  np.testing.assert_allclose(out["minmax"][:2], (lo, hi), rtol=1e-6)
  assert out["ema"][1] < out["minmax"][1]  # the EMA moved half way back from the wide batch
  assert out["percentile"][1] < out["ema"][1] + 1e-6
  assert out["mse"][1] < out["minmax"][1]
  assert all(c[2] == 2 for c in out.values())


@pytest.mark.parametrize("p", [90.0, 99.99])
def test_act_percentile_sets_the_observed_range(p):
  """One batch: the observer's range is numpy's (100 - p)-th and p-th percentiles of the input."""
  x = _rand((64, 5), 2, 0.5)
  q = QDense(3, config=QuantConfig(act_calibration="percentile", act_percentile=p))
  v = q.init(jax.random.key(0), x)
  _, s = q.apply(v, x, mutable=["quant_stats"])
  lo, hi, _ = _stats(s)
  want = np.percentile(np.asarray(x, np.float64), [100.0 - p, p])
  np.testing.assert_allclose((lo, hi), want, rtol=1e-5)
