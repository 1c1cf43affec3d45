"""quantize_model folds a BatchNorm into the conv that feeds it (issue 14 item 2): a ResNet-style
block written with plain Flax (functools.partial conv / norm factories, a 1x1 projection
shortcut) trains on fq(W * f) and converts to integer convs with the BatchNorms gone.

Expected values are computed here by hand in numpy from the float weights and statistics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qatjax
from qatjax import QuantConfig
from qatjax.export import export_onnx

EPS = 1e-5


class ResBlock(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(conv(6, (3, 3))(x)))  # Conv_0 -> BatchNorm_0
    y = norm()(conv(6, (3, 3))(y))  # Conv_1 -> BatchNorm_1
    shortcut = norm()(conv(6, (1, 1))(x))  # Conv_2 -> BatchNorm_2: the projection
    return nn.relu(y + shortcut)


X = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
# Weight-only, one scale per tensor: per-channel scales are invariant to the per-channel factor
# f > 0 (fq(W f) / f == fq(W)), so per tensor is where folding changes what training sees.
W8 = QuantConfig(8, None, weight_granularity="per_tensor")


def _variables(qmodel):
  """The quantized model's variables with non-trivial BatchNorm parameters and statistics."""
  v = qmodel.init(jax.random.key(1), X)
  rng = np.random.default_rng(0)
  params, stats = jax.tree.map(np.asarray, (v["params"], v["batch_stats"]))
  for i in range(3):
    params[f"BatchNorm_{i}"] = {
      "scale": rng.uniform(0.5, 2.0, 6).astype(np.float32),
      "bias": rng.normal(size=6).astype(np.float32),
    }
    stats[f"BatchNorm_{i}"] = {
      "mean": rng.normal(size=6).astype(np.float32),
      "var": rng.uniform(0.5, 2.0, 6).astype(np.float32),
    }
  return {**v, "params": params, "batch_stats": stats}


def _np_conv(x, w):
  return np.asarray(
    jax.lax.conv_general_dilated(
      jnp.asarray(x),
      jnp.asarray(w),
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
    )
  )


def _fq(w):
  """8-bit symmetric narrow-range fake quant, one scale for the tensor."""
  s = np.abs(w).max() / np.float32(127)
  return (np.clip(np.round(w * (np.float32(1) / s)), -127, 127) * s).astype(np.float32)


def _hand_forward(v, x, fold: bool, train: bool = False):
  """The block by hand: each conv on fq(W * f) / f (or fq(W)), then the BatchNorm."""
  p, st = v["params"], v["batch_stats"]

  def conv_bn(i, h):
    w, bnp, s = p[f"Conv_{i}"]["kernel"], p[f"BatchNorm_{i}"], st[f"BatchNorm_{i}"]
    f = bnp["scale"] / np.sqrt(s["var"] + np.float32(EPS))
    y = _np_conv(h, _fq(w * f)) / f if fold else _np_conv(h, _fq(w))
    if train:
      mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
    else:
      mean, var = s["mean"], s["var"]
    return (y - mean) / np.sqrt(var + np.float32(EPS)) * bnp["scale"] + bnp["bias"]

  y = np.maximum(conv_bn(0, x), 0)
  return np.maximum(conv_bn(1, y) + conv_bn(2, x), 0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_qat_folds_each_conv_into_its_batch_norm(train):
  qm = qatjax.quantize_model(ResBlock(), W8)
  v = _variables(qm)
  x = np.asarray(X)
  if train:
    y, _ = qm.apply(v, X, train=True, mutable=["batch_stats"])
  else:
    y = qm.apply(v, X)
  np.testing.assert_allclose(y, _hand_forward(v, x, fold=True, train=train), rtol=1e-4, atol=1e-4)
  unfolded = _hand_forward(v, x, fold=False, train=train)
  assert np.abs(np.asarray(y) - unfolded).max() > 1e-3  # the fold changes the quantization


def test_fold_batch_norm_false_keeps_the_batch_norm_float():
  cfg = QuantConfig(8, None, weight_granularity="per_tensor", fold_batch_norm=False)
  qm = qatjax.quantize_model(ResBlock(), cfg)
  v = _variables(qm)
  y = qm.apply(v, X)
  np.testing.assert_allclose(y, _hand_forward(v, np.asarray(X), fold=False), rtol=1e-4, atol=1e-4)


def test_convert_removes_the_batch_norms_and_serves_integer_convs():
  qm = qatjax.quantize_model(ResBlock(), W8)
  v = _variables(qm)
  qv = qatjax.convert(qm, v, X)
  assert "batch_stats" not in qv  # every BatchNorm was folded
  for i in range(3):
    assert set(qv["params"][f"BatchNorm_{i}"]) == {"batch_norm_folded"}
    conv = qv["params"][f"Conv_{i}"]
    w = v["params"][f"Conv_{i}"]["kernel"]
    bnp, s = v["params"][f"BatchNorm_{i}"], v["batch_stats"][f"BatchNorm_{i}"]
    f = bnp["scale"] / np.sqrt(s["var"] + np.float32(EPS))
    assert isinstance(conv["kernel"], qatjax.QArray)
    np.testing.assert_allclose(conv["kernel"].dequantize(), _fq(w * f), rtol=1e-6)
    np.testing.assert_allclose(conv["bias"], bnp["bias"] - s["mean"] * f, rtol=1e-5, atol=1e-6)
  y_int = jax.jit(qm.apply)(qv, X)
  y_qat = qm.apply(v, X)
  np.testing.assert_allclose(y_int, y_qat, rtol=1e-4, atol=1e-4)
  # The integer model is an ONNX graph without the BatchNorms' arithmetic.
  proto = export_onnx(qm, qv, X)
  ops = {n.op_type for n in proto.graph.node}
  assert "BatchNormalization" not in ops and "Sqrt" not in ops
  onnx.checker.check_model(proto)
  so = ort.SessionOptions()
  so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
  y_onnx = sess.run(None, {sess.get_inputs()[0].name: np.asarray(X)})[0]
  np.testing.assert_allclose(y_onnx, y_int, rtol=1e-4, atol=1e-4)


def test_a_conv_not_feeding_a_batch_norm_directly_is_not_folded():
  class ReluBetween(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.relu(nn.Conv(4, (3, 3))(x)))

  from qatjax.linen.bn_folding import find_conv_bn_pairs

  assert find_conv_bn_pairs(ReluBetween(), (X,), {}) == {}
  pairs = find_conv_bn_pairs(ResBlock(), (X,), {"train": True})
  assert {c: n.path for c, n in pairs.items()} == {
    "Conv_0": "BatchNorm_0",
    "Conv_1": "BatchNorm_1",
    "Conv_2": "BatchNorm_2",
  }


def test_pairs_are_found_once_per_call_signature(monkeypatch):
  """An un-jitted apply does not trace the model's init again for inputs of a seen signature."""
  from qatjax.linen import bn_folding

  calls = []
  real = bn_folding.find_conv_bn_pairs
  monkeypatch.setattr(
    bn_folding, "find_conv_bn_pairs", lambda *a, **k: calls.append(1) or real(*a, **k)
  )
  qm = qatjax.quantize_model(ResBlock(), W8)
  v = _variables(qm)
  assert len(calls) == 1  # init found them
  y1 = qm.apply(v, X)
  y2 = qm.apply(v, X + 1.0)  # same shapes and dtypes: remembered
  assert len(calls) == 1 and not np.allclose(y1, y2)
  qm.apply(v, X[:2])  # another shape: found again
  assert len(calls) == 2
