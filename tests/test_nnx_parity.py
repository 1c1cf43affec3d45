"""Linen and NNX give the same numbers: one MLP, one CNN (conv-BN folded) and one small transformer
block, written once with Linen and once with NNX, with identical weights.

Every model mixes observer (W8A8) and LSQ (W4A4) layers through rules, so each case covers both
methods (the attention case adds dynamic per-token activations, W8A8 and W4A8 with int4 groups,
in its projections):
  * the quantizer state the NNX example pass creates equals Linen's ``from_float`` (LSQ steps from
    the same weights and batch, observers that saw the batch);
  * from the same state, one training forward (observers, BatchNorm statistics updating) gives
    the same outputs, the same updated statistics and the same gradients;
  * from the same state, the converted models hold the same integers and their integer outputs
    agree.
The fourth case is Flax's own attention module (``nn.MultiHeadDotProductAttention`` /
``nnx.MultiHeadAttention``): projections and both activation x activation matmuls quantized.
The NNX models are built abstractly (``nnx.eval_shape``) and get the Linen model's float
variables with ``load_variables``: both sides start from the same arrays. The NNX side is
quantized by ``quantize_model``: plain ``nnx`` layers (MLP, transformer block) and float
``QConvBN`` modules (CNN).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_layers_helpers import cheap_init, rand

import qatjax
import qatjax.nnx as qnnx
from qatjax import QConvBN, QDense, QDenseGeneral, QEmbed, QuantConfig

OBSERVER, LSQ = QuantConfig(8, 8), QuantConfig(4, 4, method="lsq")
DYNAMIC = QuantConfig(8, 8, act_calibration="dynamic", act_granularity="per_token")
W4A8_DYNAMIC = QuantConfig(
  4,
  8,
  weight_granularity="per_group",
  weight_group_size=4,
  act_calibration="dynamic",
  act_granularity="per_token",
)


def close(a, b):
  """Equal trees (structure, QArray metadata) with values within 1e-6 relative."""
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6),
    a,
    b,
  )


# --- MLP: Linen quantize_model on nn.Dense, NNX quantize_model on nnx.Linear ------------------


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, kernel_init=cheap_init, name="fc1")(x))
    return nn.Dense(4, kernel_init=cheap_init, name="fc2")(x)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


# --- CNN: Linen QConvBN / QDense with a config, NNX float QConvBN / nnx.Linear quantized ------


class LinenCNN(nn.Module):
  config: qatjax.QuantRules | None

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.config
    x = nn.relu(QConvBN(4, (3, 3), config=cfg, kernel_init=cheap_init, name="conv0")(x, not train))
    x = QConvBN(6, (3, 3), strides=2, config=cfg, kernel_init=cheap_init, name="conv1")(
      x, not train
    )
    return QDense(5, config=cfg, kernel_init=cheap_init, name="dense")(x.reshape(x.shape[0], -1))


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv0 = qnnx.QConvBN(3, 4, (3, 3), rngs=rngs)
    self.conv1 = qnnx.QConvBN(4, 6, (3, 3), strides=2, rngs=rngs)
    self.dense = nnx.Linear(3 * 3 * 6, 5, rngs=rngs)

  def __call__(self, x):
    x = self.conv1(nnx.relu(self.conv0(x)))
    return self.dense(x.reshape(x.shape[0], -1))


# --- transformer block: embeddings (lookup and tied head), attention projections, MLP ---------

VOCAB, D, HEADS, HD = 11, 8, 2, 4


def _attention(x, q, k, v):
  att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / 2.0, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", att, v)


class LinenBlock(nn.Module):
  config: qatjax.QuantRules | None

  @nn.compact
  def __call__(self, ids):
    cfg, init = self.config, cheap_init
    embed = QEmbed(VOCAB, D, config=cfg, name="embed")
    x = embed(ids)
    q = QDenseGeneral((HEADS, HD), config=cfg, kernel_init=init, name="query")(x)
    k = QDenseGeneral((HEADS, HD), config=cfg, kernel_init=init, name="key")(x)
    v = QDenseGeneral((HEADS, HD), config=cfg, kernel_init=init, name="value")(x)
    out = QDenseGeneral(D, axis=(-2, -1), config=cfg, kernel_init=init, name="out")
    h = x + out(_attention(x, q, k, v))
    mlp = nn.relu(QDense(16, config=cfg, kernel_init=init, name="mlp_in")(h))
    h = h + QDense(D, config=cfg, kernel_init=init, name="mlp_out")(mlp)
    return embed.attend(h)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.query = nnx.LinearGeneral(D, (HEADS, HD), rngs=rngs)
    self.key = nnx.LinearGeneral(D, (HEADS, HD), rngs=rngs)
    self.value = nnx.Einsum("btd,dnh->btnh", (D, HEADS, HD), (HEADS, HD), rngs=rngs)
    self.out = nnx.LinearGeneral((HEADS, HD), D, axis=(-2, -1), rngs=rngs)
    self.mlp_in = nnx.Linear(D, 16, rngs=rngs)
    self.mlp_out = nnx.Linear(16, D, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    h = x + self.out(_attention(x, self.query(x), self.key(x), self.value(x)))
    h = h + self.mlp_out(nnx.relu(self.mlp_in(h)))
    return self.embed.attend(h)


class LinenAttention(nn.Module):
  """Flax's own attention module: its projections and both activation x activation matmuls."""

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(x[..., 0])
    h = nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, name="attn")(x, mask=mask)
    return nn.Dense(D, name="head")(h)


class NNXAttention(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
    self.head = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    return self.head(self.attn(x, mask=nnx.make_causal_mask(x[..., 0])))


def _mlp():
  cfg = qatjax.rules({"fc1": OBSERVER, "fc2": LSQ})
  x = [rand((8, 6), s) for s in (1, 2, 3)]
  float_vars = jax.jit(LinenMLP().init)(jax.random.key(0), x[0])
  linen = qatjax.quantize_model(LinenMLP(), cfg)
  return cfg, linen, float_vars, NNXMLP, x, {}, {}


def _cnn():
  cfg = qatjax.rules({"conv0": OBSERVER, "conv1|dense": LSQ})
  x = [rand((4, 6, 6, 3), s) for s in (1, 2, 3)]
  float_vars = jax.jit(LinenCNN(None).init)(jax.random.key(0), x[0])
  # Non-trivial running statistics, so the fold (and its bias) is exercised.
  float_vars["batch_stats"] = jax.tree.map(
    lambda a: a + jnp.abs(rand(a.shape, 7, 0.3)), float_vars["batch_stats"]
  )
  return cfg, LinenCNN(cfg), float_vars, NNXCNN, x, {"train": True}, {"train": False}


def _block():
  cfg = qatjax.rules({"embed|key|out|mlp_out": LSQ, ".*": OBSERVER})
  x = [jax.random.randint(jax.random.key(s), (2, 5), 0, VOCAB) for s in (1, 2, 3)]
  float_vars = jax.jit(LinenBlock(None).init)(jax.random.key(0), x[0])
  return cfg, LinenBlock(cfg), float_vars, NNXBlock, x, {}, {}


def _attention_module():
  # The attention module's own rule sets its q.k / p.v quantizers (LSQ steps, state per site),
  # the projections theirs: dynamic per-token W8A8, LSQ, int4 groups with dynamic activations
  # (W4A8) and observers.
  cfg = qatjax.rules(
    {
      "attn": LSQ,
      "attn/query": DYNAMIC,
      "attn/key": LSQ,
      "attn/value|head": W4A8_DYNAMIC,
      ".*": OBSERVER,
    }
  )
  x = [rand((2, 5, D), s) for s in (1, 2, 3)]
  float_vars = jax.jit(LinenAttention().init)(jax.random.key(0), x[0])
  linen = qatjax.quantize_model(LinenAttention(), cfg)
  return cfg, linen, float_vars, NNXAttention, x, {}, {}


MODELS = {
  "mlp": _mlp,
  "cnn": _cnn,
  "transformer_block": _block,
  "attention_module": _attention_module,
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:quantize_model. these ops stay float")
@pytest.mark.parametrize("model", MODELS, ids=list(MODELS))
def test_linen_and_nnx_agree(model):
  cfg, linen, float_vars, nnx_cls, (x_init, x_train, x_test), train_kw, eval_kw = MODELS[model]()

  # Quantizer state from the same weights and example batch.
  lv = qatjax.from_float(linen, float_vars, x_init, **eval_kw)
  m = nnx.eval_shape(lambda: nnx_cls(nnx.Rngs(0)))
  qnnx.load_variables(m, float_vars)
  qnnx.quantize_model(m, cfg, x_init)
  close(qnnx.to_variables(m), lv)
  # From here on both sides hold the very same arrays: a state equal to 1e-6 could still round
  # a weight to another integer (a discrete change of the LSQ gradients).
  qnnx.load_variables(m, lv)

  # One training forward: outputs, updated statistics and gradients.
  mutable = [c for c in ("quant_stats", "batch_stats") if c in lv]

  def linen_loss(params):
    out, upd = linen.apply({**lv, "params": params}, x_train, mutable=mutable, **train_kw)
    return jnp.sum(out**2), (out, upd)

  linen_grad = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))
  (_, (l_out, l_upd)), l_grads = linen_grad(lv["params"])
  m.train()

  def nnx_loss(model):
    out = model(x_train)
    return jnp.sum(out**2), out

  n_grads, n_out = nnx.jit(nnx.grad(nnx_loss, has_aux=True))(m)
  close(n_out, l_out)
  close({c: qnnx.to_variables(m)[c] for c in mutable}, l_upd)
  close(qnnx.to_variables(n_grads)["params"], l_grads)

  # Integers: the same QArrays and the same integer outputs.
  lv = {**lv, **l_upd}
  qnnx.load_variables(m, l_upd)
  l_int_vars = qatjax.convert(linen, lv, x_init, **eval_kw)
  m.eval()
  n_int = qnnx.convert(m, x_init)
  close(qnnx.to_variables(n_int), l_int_vars)
  n_y = nnx.jit(lambda model, x: model(x))(n_int, x_test)
  close(n_y, jax.jit(lambda v, x: linen.apply(v, x, **eval_kw))(l_int_vars, x_test))
