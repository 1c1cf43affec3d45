"""StableHLO (jax.export) and ONNX exports of converted models.

Tolerances. ``model.apply(qvars, x)`` computes int8 x int8 -> int32 products and rescales them in
float32. onnxruntime with graph optimisations disabled runs the QDQ graph literally
(``DequantizeLinear`` then float ``Conv`` / ``Gemm`` on the same integer values): it must agree to
float rounding (1e-5 of the output range). With its default optimisations onnxruntime fuses
``DQ -> Conv -> Q`` into ``QLinearConv`` / ``QGemm``, which quantizes the bias to int32 and
requantizes the accumulator straight to the next layer's uint8: a few intermediate activations that
sit on a rounding boundary move by one step, so a few percent of the outputs differ by about one
output step (measured: max 0.6% of the output range here); we check argmax agreement and 3% of the
range.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qatjax import (
  QAct,
  QConv,
  QConvBN,
  QDense,
  QDenseGeneral,
  QEmbed,
  QuantConfig,
  convert,
  from_float,
  quantize_model,
)
from qatjax.export import export_onnx, export_stablehlo, load_stablehlo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class CNN(nn.Module):
  cfg: QuantConfig

  @nn.compact
  def __call__(self, x):
    x = QConvBN(6, (3, 3), config=self.cfg)(x, use_running_average=True)
    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = nn.relu(QConv(8, (3, 3), strides=2, padding="VALID", config=self.cfg)(x))
    x = nn.avg_pool(x, (2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(16, config=self.cfg)(x))
    return QDense(5, config=self.cfg)(x)


class Residual(nn.Module):
  """Non-sequential glue: residual add, QAct, a float layer, a weight-only layer, log_softmax."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(QDense(12, config=QuantConfig())(x))
    h = QAct(QuantConfig(weight_bits=None, act_bits=8))(h + QDense(12, config=QuantConfig())(h))
    h = jnp.tanh(nn.Dense(10)(h))
    h = QDense(6, config=QuantConfig(weight_bits=4, act_bits=None))(h)
    return jax.nn.log_softmax(2.0 * h - 1.0)


def calibrated_conversion(model, x):
  v = model.init(jax.random.key(1), x)
  _, stats = model.apply(v, x, mutable=["quant_stats"])
  return convert(model, {**v, **stats}, x)


def run_ort(proto, x, level="all"):
  so = ort.SessionOptions()
  so.log_severity_level = 3
  so.graph_optimization_level = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
  }[level]
  sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
  return sess.run(None, {"input": np.asarray(x, np.float32)})[0]


CNN_CONFIGS = {
  "int8": QuantConfig(),
  "int4_group": QuantConfig(weight_bits=4, weight_granularity="per_group", weight_group_size=4),
  "pact4": QuantConfig(act_bits=4, pact=True, pact_init=2.0, weight_bits=4),
  "sym_act": QuantConfig(act_symmetric=True),
}


@pytest.fixture(scope="module", params=sorted(CNN_CONFIGS))
def cnn(request):
  cfg = CNN_CONFIGS[request.param]
  model = CNN(cfg)
  x = jax.random.normal(jax.random.key(0), (32, 12, 12, 1))
  qv = calibrated_conversion(model, x)
  # Fresh inputs: on the calibration batch itself, the extreme value maps to exactly -127.5 with a
  # symmetric scale (max|x| / 127.5), where ONNX's x / s and qatjax's x * (1 / s) round apart.
  x = jax.random.normal(jax.random.key(5), x.shape)
  return request.param, model, qv, x, np.asarray(jax.jit(model.apply)(qv, x))


def test_onnx_cnn_matches_integer_path(cnn):
  _, model, qv, x, ref = cnn
  proto = export_onnx(model, qv, x)
  onnx.checker.check_model(proto, full_check=True)
  exact = run_ort(proto, x, "none")
  np.testing.assert_allclose(exact, ref, atol=1e-5 * np.abs(ref).max() + 1e-6)
  fused = run_ort(proto, x, "all")
  assert (fused.argmax(1) == ref.argmax(1)).mean() >= 0.95
  assert np.abs(fused - ref).max() <= 0.03 * np.abs(ref).max()
  small = run_ort(proto, x[:3], "none")  # dynamic batch
  np.testing.assert_allclose(small, ref[:3], atol=1e-5 * np.abs(ref).max() + 1e-6)


def test_onnx_graph_layout(cnn, tmp_path):
  name, model, qv, x, _ = cnn
  path = tmp_path / "m.onnx"
  proto = export_onnx(model, qv, x, path=path)
  assert onnx.load(str(path)).graph.node[0].op_type == "Transpose"
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("Transpose") == 2  # NHWC -> NCHW once, back before the flatten
  assert ops.count("QuantizeLinear") == 4 and ops.count("Conv") == 2 and ops.count("Gemm") == 2
  assert {"MaxPool", "AveragePool", "Reshape", "Relu"} <= set(ops)
  inits = {t.name: t for t in proto.graph.initializer}
  weights = [
    inits[n.input[0]]
    for n in proto.graph.node
    if n.op_type == "DequantizeLinear" and n.input[0] in inits
  ]
  assert len(weights) == 4
  want = onnx.TensorProto.INT4 if CNN_CONFIGS[name].weight_bits == 4 else onnx.TensorProto.INT8
  assert {w.data_type for w in weights} == {want}
  deq = {
    n.input[0]: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    for n in proto.graph.node
    if n.op_type == "DequantizeLinear"
  }
  conv_w = next(w for w in weights if len(w.dims) == 4)
  if CNN_CONFIGS[name].weight_granularity == "per_group":
    assert deq[conv_w.name]["block_size"] == 4
  else:
    assert deq[conv_w.name]["axis"] == 0  # OIHW, per output channel
  act_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
  zp = inits[act_q[1].input[2]]
  assert zp.data_type == (onnx.TensorProto.INT8 if name == "sym_act" else onnx.TensorProto.UINT8)
  assert ("Clip" in ops) == (name == "pact4")
  if CNN_CONFIGS[name].weight_bits == 4:  # packed: half a byte per weight
    assert len(conv_w.raw_data) == (3 * 3 * 6 + 1) // 2


def test_onnx_residual_qact_float_and_weight_only_layers():
  model = Residual()
  x = jax.random.normal(jax.random.key(0), (16, 7))
  qv = calibrated_conversion(model, x)
  ref = np.asarray(model.apply(qv, x))
  proto = export_onnx(model, qv, x, int4=False)
  np.testing.assert_allclose(run_ort(proto, x, "none"), ref, atol=1e-5)
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("QuantizeLinear") == 3  # two layers' inputs + the QAct
  assert "Tanh" in ops and "ReduceMax" in ops and "Transpose" not in ops


def test_onnx_quantize_model_wrapper():
  float_model = nn.Sequential(
    [nn.Conv(4, (3, 3)), nn.relu, lambda x: x.reshape(x.shape[0], -1), nn.Dense(3)]
  )
  qm = quantize_model(float_model, QuantConfig())
  x = jax.random.normal(jax.random.key(0), (8, 5, 5, 2))
  fv = float_model.init(jax.random.key(1), x)
  v = from_float(qm, fv, x)
  _, stats = qm.apply(v, x, mutable=["quant_stats"])
  qv = convert(qm, {**v, **stats}, x)
  proto = export_onnx(qm, qv, x)
  np.testing.assert_allclose(run_ort(proto, x, "none"), qm.apply(qv, x), atol=1e-5)


class ConvBNBias(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = QConvBN(6, (3, 3), use_bias=True, config=QuantConfig(), name="convbn")(x, True)
    return QDense(3, config=QuantConfig())(nn.relu(x).reshape(x.shape[0], -1))


def test_onnx_conv_bn_with_conv_bias():
  """QConvBN(use_bias=True): the exported conv bias is the folded ``beta + (b - mean) * f``
  (recomputed by hand), and onnxruntime computes what the integer model computes."""
  model = ConvBNBias()
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 5))
  v = model.init(jax.random.key(1), x)
  rng = np.random.default_rng(0)
  bias, gamma, beta, mean = (rng.normal(size=6).astype(np.float32) for _ in range(4))
  var = rng.uniform(0.5, 2.0, 6).astype(np.float32)
  conv = {**v["params"]["convbn"], "bias": bias, "bn_scale": gamma, "bn_bias": beta}
  v = {
    **v,
    "params": {**v["params"], "convbn": conv},
    "batch_stats": {"convbn": {"mean": mean, "var": var}},
  }
  _, stats = model.apply(v, x, mutable=["quant_stats"])
  qv = convert(model, {**v, **stats}, x)
  proto = export_onnx(model, qv, x)
  exported = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
  folded = beta + (bias - mean) * gamma / np.sqrt(var + np.float32(1e-5))
  np.testing.assert_allclose(exported["convbn.bias"], folded, rtol=1e-6, atol=1e-6)
  ref = np.asarray(model.apply(qv, x))
  np.testing.assert_allclose(run_ort(proto, x, "none"), ref, atol=1e-5 * np.abs(ref).max())


class WithEmbed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return QDense(3, config=QuantConfig())(QEmbed(10, 4, config=QuantConfig())(x))


class WithGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):
    return QDenseGeneral((2, 3), config=QuantConfig())(x)


class WithCumsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    return QDense(3, config=QuantConfig())(jnp.cumsum(x, axis=-1))


def test_onnx_unsupported_layers_and_ops_are_named():
  x = jnp.ones((2, 4))
  for model, match in [
    (WithGeneral(), "QDenseGeneral_0.*QDenseGeneral.*not supported"),
    (WithCumsum(), "unsupported operation 'cumsum'"),
  ]:
    qv = calibrated_conversion(model, x)
    with pytest.raises(ValueError, match=match):
      export_onnx(model, qv, x)
  model = WithEmbed()
  ids = jnp.array([[1, 2]])
  v = model.init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"float array|QEmbed_0"):
    export_onnx(model, v, ids)
  model = CNN(QuantConfig())
  x = jnp.ones((2, 8, 8, 1))
  v = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"QConvBN_0.*convert"):
    export_onnx(model, v, x)  # QAT variables, not converted


# --- StableHLO ------------------------------------------------------------------------------------

LOADER = """
import sys
sys.modules["qatjax"] = None  # the artifact must not need the model's code
sys.modules["flax"] = None
import jax, numpy as np
d = sys.argv[1]
exported = jax.export.deserialize(bytearray(open(d + "/model.stablehlo", "rb").read()))
np.save(d + "/y.npy", np.asarray(exported.call(np.load(d + "/x.npy"))))
"""


def test_stablehlo_runs_in_a_fresh_process(tmp_path):
  model = CNN(QuantConfig(weight_bits=4))
  x = jax.random.normal(jax.random.key(0), (8, 12, 12, 1))
  qv = calibrated_conversion(model, x)
  blob = export_stablehlo(model, qv, x)
  assert isinstance(blob, bytes)
  (tmp_path / "model.stablehlo").write_bytes(blob)
  np.save(tmp_path / "x.npy", np.asarray(x))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, "-c", LOADER, str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  y = np.load(tmp_path / "y.npy")
  np.testing.assert_allclose(y, jax.jit(model.apply)(qv, x), rtol=1e-6, atol=1e-6)


def test_stablehlo_dynamic_batch():
  model = nn.Sequential([QDense(8, config=QuantConfig()), nn.relu, QDense(3, config=QuantConfig())])
  x = jax.random.normal(jax.random.key(0), (4, 5))
  qv = calibrated_conversion(model, x)
  exported = load_stablehlo(export_stablehlo(model, qv, x, dynamic_batch=True))
  x7 = jax.random.normal(jax.random.key(2), (7, 5))
  np.testing.assert_allclose(exported.call(x7), model.apply(qv, x7), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="bytes"):
    load_stablehlo("not bytes")
