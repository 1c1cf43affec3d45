"""Integer inference on real data: QAT-train small MNIST models briefly, convert, compare.

What is measured, on the 10,000 MNIST test images: the integer model (``model.apply(qvars, x)``)
against the fake-quant QAT model it was converted from, and the ONNX export in onnxruntime
against the integer model. Both pairs compute the same integers except where an activation lies
on a rounding boundary (float summation order differs: XLA's float conv vs int32 accumulation;
onnxruntime's fused ``QLinearConv`` requantization), which moves that activation by one step. The
logits' "output step" is ``s_in * max|W|`` of the last layer: the largest change of a logit when
one of its inputs moves by one quantization step. Checked: argmax agreement >= 99.9% and max
|difference| <= 4 output steps (measured 0.9-2.2), except onnxruntime with its default graph
optimisations, whose fused ``QLinearConv`` requantizes with an int32 bias and moves more
activations by one step (measured about 10 output steps; bound 16). Skipped when the MNIST files
are absent.
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from image_data import load_mnist

from qatjax import QConv, QDense, QuantConfig, convert

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(
  not (DATA / "t10k-images-idx3-ubyte.gz").is_file(), reason=f"MNIST IDX files not in {DATA}"
)


class MLP(nn.Module):
  cfg: QuantConfig

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(128, config=self.cfg)(x))
    return QDense(10, config=self.cfg)(x)


class CNN(nn.Module):
  cfg: QuantConfig

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(QConv(8, (3, 3), config=self.cfg)(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(QConv(16, (3, 3), config=self.cfg)(x)), (2, 2), (2, 2))
    return QDense(10, config=self.cfg)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def mnist():
  return load_mnist(str(DATA))


def train_one_epoch(model, data, n_train, batch=50):
  """QAT from scratch for one pass over the first ``n_train`` training images."""
  x0 = jnp.asarray(data.x_train[:batch])
  v = model.init(jax.random.key(0), x0)
  params, rest = v["params"], {k: c for k, c in v.items() if k != "params"}
  opt = optax.adam(2e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, rest, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, **rest}, x, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (_, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), {**rest, **upd}, opt_state

  for i in range(0, n_train, batch):
    params, rest, opt_state = step(
      params,
      rest,
      opt_state,
      jnp.asarray(data.x_train[i : i + batch]),
      jnp.asarray(data.y_train[i : i + batch]),
    )
  return {"params": params, **rest}


def output_step(qv, last):
  p = qv["params"][last]
  return float(p["input_scale"]) * float(jnp.abs(p["kernel"].dequantize()).max())


@pytest.mark.parametrize(
  "arch,cfg,n_train",
  [
    ("mlp", QuantConfig(), 6000),
    ("cnn", QuantConfig(weight_bits=4), 3000),
  ],
)
def test_integer_model_matches_fake_quant_on_mnist(mnist, arch, cfg, n_train):
  model = {"mlp": MLP, "cnn": CNN}[arch](cfg)
  v = train_one_epoch(model, mnist, n_train)
  x_test = jnp.asarray(mnist.x_test)
  qv = convert(model, v, x_test[:8])
  y_fq = np.asarray(jax.jit(model.apply)(v, x_test))
  y_int = np.asarray(jax.jit(model.apply)(qv, x_test))
  acc_fq = (y_fq.argmax(1) == mnist.y_test).mean()
  acc_int = (y_int.argmax(1) == mnist.y_test).mean()
  agree = (y_fq.argmax(1) == y_int.argmax(1)).mean()
  steps = np.abs(y_fq - y_int).max() / output_step(qv, "QDense_1" if arch == "mlp" else "QDense_0")
  print(
    f"{arch}: accuracy fake-quant {acc_fq:.4f} integer {acc_int:.4f}, argmax agreement "
    f"{agree:.4%}, max |diff| {np.abs(y_fq - y_int).max():.2e} = {steps:.2f} output steps"
  )
  assert acc_int > 0.8  # it learned something in one short epoch
  assert agree >= 0.999
  assert steps <= 4
  if arch == "cnn":
    onnx_agreement(model, qv, x_test, y_int)


def onnx_agreement(model, qv, x_test, y_int):
  ort = pytest.importorskip("onnxruntime")
  from qatjax.export import export_onnx

  proto = export_onnx(model, qv, x_test[:8])
  step = output_step(qv, "QDense_0")
  for level, max_steps in [("ORT_DISABLE_ALL", 4), ("ORT_ENABLE_ALL", 16)]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {"input": np.asarray(x_test)})[0]
    steps = np.abs(y_onnx - y_int).max() / step
    agree = (y_onnx.argmax(1) == y_int.argmax(1)).mean()
    print(
      f"onnxruntime ({level}) vs integer: argmax agreement {agree:.4%}, max |diff| "
      f"{steps:.2f} output steps"
    )
    assert agree >= 0.999
    assert steps <= max_steps
