"""Integer inference on real data: QAT-train small image models briefly, convert, compare.

Runs on scikit-learn's digits (shipped with the package: every checkout runs it) and on the
first 2,000 MNIST test images when the IDX files are in ../shared (skipped otherwise). What is
measured: the integer model (``model.apply(qvars, x)``) against the fake-quant QAT model it was
converted from, and the ONNX export in onnxruntime against the integer model. Both pairs compute
the same integers except where an activation lies on a rounding boundary (float summation order
differs: XLA's float conv vs int32 accumulation; onnxruntime's fused ``QLinearConv``
requantization), which moves that activation by one step. The logits' "output step" is
``s_in * max|W|`` of the last layer: the largest change of a logit when one of its inputs moves by
one quantization step. Checked: argmax agreement >= 99.9% (on digits' 449 test images: at most
one image apart) and max |difference| <= 4 output steps (MNIST measured 0.9-2.2), except
onnxruntime with its default graph optimisations, whose fused ``QLinearConv`` requantizes with an
int32 bias and moves more activations by one step (MNIST measured about 10 output steps; bound
16).
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from image_data import load_digits, load_mnist
from test_layers_helpers import JitApply

from qatjax import QConv, QDense, QuantConfig, convert

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

# dataset -> images per architecture and passes over them: one short epoch of MNIST; digits is
# small (1,348 training images), so a few passes.
TRAINING = {"digits": ({"mlp": 1348, "cnn": 1348}, 8), "mnist": ({"mlp": 6000, "cnn": 3000}, 1)}
TEST_IMAGES = {"digits": 449, "mnist": 2000}  # all of digits' test split; MNIST's first 2,000


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


@pytest.fixture(scope="module", params=sorted(TRAINING))
def dataset(request):
  if request.param == "digits":
    return load_digits()
  if not (DATA / "t10k-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"MNIST IDX files not in {DATA}")
  return load_mnist(str(DATA))


def train(model, data, n_train, passes, batch=50):
  """QAT from scratch: ``passes`` over the first ``n_train`` training images, one ``lax.scan``."""
  n = n_train // batch * batch
  xs = jnp.asarray(data.x_train[:n]).reshape((-1, batch) + data.x_train.shape[1:])
  ys = jnp.asarray(data.y_train[:n]).reshape(-1, batch)
  v = model.init(jax.random.key(0), xs[0])
  opt = optax.adam(2e-3)

  def step(carry, xy):
    params, rest, opt_state = carry

    def loss_fn(p):
      logits, upd = model.apply({"params": p, **rest}, xy[0], mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, xy[1]).mean(), upd

    (_, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return (optax.apply_updates(params, updates), {**rest, **upd}, opt_state), None

  @jax.jit
  def run(v, xs, ys):
    params, rest = v["params"], {k: c for k, c in v.items() if k != "params"}
    (params, rest, _), _ = jax.lax.scan(step, (params, rest, opt.init(params)), (xs, ys))
    return {"params": params, **rest}

  return run(v, jnp.tile(xs, (passes,) + (1,) * (xs.ndim - 1)), jnp.tile(ys, (passes, 1)))


def output_step(qv, last):
  p = qv["params"][last]
  return float(p["input_scale"]) * float(jnp.abs(p["kernel"].dequantize()).max())


@pytest.mark.slow
@pytest.mark.parametrize(
  "arch,cfg", [("mlp", QuantConfig()), ("cnn", QuantConfig(weight_bits=4))], ids=["mlp", "cnn"]
)
def test_integer_model_matches_fake_quant(dataset, arch, cfg):
  model = {"mlp": MLP, "cnn": CNN}[arch](cfg)
  n_train, passes = TRAINING[dataset.name]
  v = train(model, dataset, n_train[arch], passes)
  x_test = jnp.asarray(dataset.x_test[: TEST_IMAGES[dataset.name]])
  y_test = dataset.y_test[: TEST_IMAGES[dataset.name]]
  qv = convert(JitApply(model), v, x_test[:8])
  y_fq = np.asarray(jax.jit(model.apply)(v, x_test))
  y_int = np.asarray(jax.jit(model.apply)(qv, x_test))
  acc_fq = (y_fq.argmax(1) == y_test).mean()
  acc_int = (y_int.argmax(1) == y_test).mean()
  apart = (y_fq.argmax(1) != y_int.argmax(1)).sum()
  steps = np.abs(y_fq - y_int).max() / output_step(qv, "QDense_1" if arch == "mlp" else "QDense_0")
  print(
    f"{dataset.name} {arch}: accuracy fake-quant {acc_fq:.4f} integer {acc_int:.4f}, argmax "
    f"apart on {apart} of {len(x_test)}, max |diff| {np.abs(y_fq - y_int).max():.2e} = "
    f"{steps:.2f} output steps"
  )
  assert acc_int > 0.8  # it learned something in a short training
  assert apart <= max(1, int(0.001 * len(x_test)))
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
    apart = (y_onnx.argmax(1) != y_int.argmax(1)).sum()
    print(
      f"onnxruntime ({level}) vs integer: argmax apart on {apart} of {len(x_test)}, max |diff| "
      f"{steps:.2f} output steps"
    )
    assert apart <= max(1, int(0.001 * len(x_test)))
    assert steps <= max_steps
