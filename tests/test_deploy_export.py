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

import functools
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
from qatjax.export.onnx._layers import EMITTERS
from qatjax.export.onnx._primitives import HANDLERS, handler_for
from qatjax.ops.registry import KINDS

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
  v = jax.jit(model.init)(jax.random.key(1), x)
  _, stats = jax.jit(functools.partial(model.apply, mutable=["quant_stats"]))(v, x)
  return convert(model, {**v, **stats}, x)


def run_ort(proto, x, level="all"):
  so = ort.SessionOptions()
  so.log_severity_level = 3
  so.graph_optimization_level = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
  }[level]
  sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
  x = np.asarray(x)
  return sess.run(None, {"input": x if x.dtype.kind in "iu" else x.astype(np.float32)})[0]


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


class Padded(nn.Module):
  """1-D convolutions with the op's special paddings (a Pad node, or the conv's own pads)."""

  @nn.compact
  def __call__(self, x):  # (B, 9, 2)
    x = nn.relu(QConv(4, (3,), padding="CIRCULAR", config=QuantConfig())(x))
    x = nn.relu(QConv(4, (3,), padding="REFLECT", kernel_dilation=2, config=QuantConfig())(x))
    return QConv(3, (3,), padding="CAUSAL", kernel_dilation=2, config=QuantConfig())(x)


def test_onnx_special_conv_padding():
  model = Padded()
  x = jax.random.normal(jax.random.key(0), (8, 9, 2))
  qv = calibrated_conversion(model, x)
  x = jax.random.normal(jax.random.key(5), x.shape)
  ref = np.asarray(jax.jit(model.apply)(qv, x))
  proto = export_onnx(model, qv, x)
  np.testing.assert_allclose(run_ort(proto, x, "none"), ref, atol=1e-5 * np.abs(ref).max() + 1e-6)
  pads = {
    n.op_type + ":" + onnx.helper.get_attribute_value(n.attribute[0]).decode()
    for n in proto.graph.node
    if n.op_type == "Pad"
  }
  assert pads == {"Pad:wrap", "Pad:reflect"}
  convs = [n for n in proto.graph.node if n.op_type == "Conv"]
  attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in convs]
  assert [a["pads"] for a in attrs] == [[0, 0], [0, 0], [4, 0]]  # causal: (k - 1) * d before


class General(nn.Module):
  """QDenseGeneral with one contracted axis into two output axes, with two contracted axes, and
  with a contracted axis that is not the last."""

  cfg: QuantConfig

  @nn.compact
  def __call__(self, x):  # (B, 5, 8)
    h = nn.relu(QDenseGeneral((2, 4), config=self.cfg)(x))  # kernel (8, 2, 4) -> (B, 5, 2, 4)
    h = nn.relu(QDenseGeneral(6, axis=(-2, -1), config=QuantConfig())(h))  # (2, 4, 6) -> (B, 5, 6)
    return QDenseGeneral(3, axis=1, config=self.cfg)(h)  # kernel (5, 3) -> (B, 6, 3)


GENERAL_CONFIGS = {
  "int8": QuantConfig(),
  "int4_group": QuantConfig(weight_bits=4, weight_granularity="per_group", weight_group_size=4),
}


def initializer_of(proto, node):
  """The initializer a node's first input reads (a DequantizeLinear's integers)."""
  return next(t for t in proto.graph.initializer if t.name == node.input[0])


def dequantize_attrs(proto):
  return [
    (initializer_of(proto, n), {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
    for n in proto.graph.node
    if n.op_type == "DequantizeLinear"
    and any(t.name == n.input[0] for t in proto.graph.initializer)
  ]


@pytest.mark.parametrize("name", sorted(GENERAL_CONFIGS))
def test_onnx_dense_general_matches_integer_path(name):
  model = General(GENERAL_CONFIGS[name])
  x = jax.random.normal(jax.random.key(0), (16, 5, 8))
  qv = calibrated_conversion(model, x)
  assert qv["params"]["QDenseGeneral_0"]["kernel"].shape == (8, 2, 4)  # N-D after convert
  x = jax.random.normal(jax.random.key(5), x.shape)
  ref = np.asarray(jax.jit(model.apply)(qv, x))
  proto = export_onnx(model, qv, x)
  onnx.checker.check_model(proto, full_check=True)
  np.testing.assert_allclose(run_ort(proto, x, "none"), ref, atol=1e-5 * np.abs(ref).max() + 1e-6)
  fused = run_ort(proto, x, "all")
  assert (fused.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
  assert np.abs(fused - ref).max() <= 0.03 * np.abs(ref).max()
  np.testing.assert_allclose(run_ort(proto, x[:3], "none"), ref[:3], atol=1e-5 * np.abs(ref).max())
  # Kernels as (K, N) integer matrices: per output column, or blocks of 4 along K.
  (w0, a0), (w1, a1), (w2, a2) = dequantize_attrs(proto)
  assert [list(w.dims) for w in (w0, w1, w2)] == [[8, 8], [8, 6], [5, 3]]
  assert a1 == {"axis": 1}
  want = {"axis": 0, "block_size": 4} if name == "int4_group" else {"axis": 1}
  assert a0 == want and a2 == want
  int4 = onnx.TensorProto.INT4
  assert (w0.data_type == int4) == (w2.data_type == int4) == (name == "int4_group")


class TokenModel(nn.Module):
  """Token ids in: a quantized table (lookup and tied ``attend`` head), float position
  embeddings, a quantized and a float DenseGeneral."""

  cfg: QuantConfig

  @nn.compact
  def __call__(self, ids):  # (B, T) int32
    tokens = QEmbed(20, 8, config=self.cfg)
    h = tokens(ids) + nn.Embed(ids.shape[1], 8)(jnp.arange(ids.shape[1]))
    h = nn.relu(QDenseGeneral((2, 4), config=QuantConfig())(h))
    h = nn.DenseGeneral(8, axis=(-2, -1))(h)
    return tokens.attend(h)


EMBED_CONFIGS = {
  "int8": QuantConfig(),
  "int4_group": QuantConfig(weight_bits=4, weight_granularity="per_group", weight_group_size=4),
}


@pytest.mark.parametrize("name", sorted(EMBED_CONFIGS))
def test_onnx_token_ids_embedding_matches_integer_path(name):
  model = TokenModel(EMBED_CONFIGS[name])
  ids = jax.random.randint(jax.random.key(0), (12, 7), 0, 20)
  qv = calibrated_conversion(model, ids)
  ref = np.asarray(jax.jit(model.apply)(qv, ids))
  proto = export_onnx(model, qv, ids)
  onnx.checker.check_model(proto, full_check=True)
  (graph_input,) = proto.graph.input
  assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT32
  lookups = [n for n in proto.graph.node if n.op_type == "Gather"]
  assert [n.input[1] for n in lookups][:1] == ["input"]  # the token lookup reads the ids
  # One integer table serves the lookup and the tied head: one scale per row, or per 4 features.
  tables = [(w, a) for w, a in dequantize_attrs(proto) if list(w.dims) == [20, 8]]
  assert len(tables) == 1
  want = {"axis": 1, "block_size": 4} if name == "int4_group" else {"axis": 0}
  assert tables[0][1] == want
  np.testing.assert_allclose(run_ort(proto, ids, "none"), ref, atol=1e-5 * np.abs(ref).max() + 1e-6)
  fused = run_ort(proto, ids, "all")
  assert (fused.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
  assert np.abs(fused - ref).max() <= 0.03 * np.abs(ref).max()
  small = run_ort(proto, ids[:2], "none")  # dynamic batch
  np.testing.assert_allclose(small, ref[:2], atol=1e-5 * np.abs(ref).max())


class WithEinsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((4, 3), "bi,ij->bj")(x)


class WithCumsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    return QDense(3, config=QuantConfig())(jnp.cumsum(x, axis=-1))


class WithEmbed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return QDense(3, config=QuantConfig())(QEmbed(10, 4, config=QuantConfig())(x))


def test_onnx_unsupported_layers_and_ops_are_named():
  x = jnp.ones((2, 4))
  for model, match in [
    (WithEinsum(), "Einsum_0.*Einsum.*not supported"),
    (WithCumsum(), "unsupported operation 'cumsum'"),
  ]:
    v = model.init(jax.random.key(0), x)
    qv = calibrated_conversion(model, x) if "quant_stats" in v else v
    with pytest.raises(ValueError, match=match):
      export_onnx(model, qv, x)
  attention = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)
  qm = quantize_model(attention, QuantConfig(8, 8))
  x3 = jnp.ones((2, 3, 4))
  qv = calibrated_conversion(qm, x3)
  with pytest.raises(ValueError, match=r"<root> \(MultiHeadDotProductAttention\).*not supported"):
    export_onnx(qm, qv, x3)
  model = WithEmbed()
  ids = jnp.array([[1, 2]])
  v = model.init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"QEmbed_0.*not converted"):
    export_onnx(model, v, ids)  # QAT variables: the table is float
  with pytest.raises(ValueError, match=r"float array or integer ids, got bool"):
    export_onnx(model, v, ids > 0)
  model = CNN(QuantConfig())
  x = jnp.ones((2, 8, 8, 1))
  v = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"QConvBN_0.*convert"):
    export_onnx(model, v, x)  # QAT variables, not converted


def test_onnx_tables_cover_kinds_and_reject_unknown_primitives():
  # every layer kind has an emitter, except the two the exporter refuses by name
  assert set(EMITTERS) == set(KINDS) - {"einsum", "attention"}
  assert handler_for("tanh") is HANDLERS["tanh"]
  with pytest.raises(ValueError, match="unsupported operation 'not_a_primitive'"):
    handler_for("not_a_primitive")


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
