"""The integer inference path (``convert`` then ``apply``) agrees with the fake-quant eval model.

One model holds every quantized layer kind (QConv, QConvBN, QDenseGeneral, QDense, QEmbed), each
on its own input so that the comparison is per layer. The cases cover every pair of {observer,
LSQ} x {8, 4 bits} x {per-tensor, per-channel, per-group} (a pairwise design: 6 cases instead of
12), plus symmetric and weight-only activations. Deployment details are tested elsewhere; this is
the layers' agreement check.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_layers_helpers import JitApply, cheap_init, rand

import qatjax
from qatjax import QConv, QConvBN, QDense, QDenseGeneral, QEmbed, QuantConfig


class Zoo(nn.Module):
  config: QuantConfig

  @nn.compact
  def __call__(self, x4, x3, x2, tokens, train: bool = False):
    c = dict(config=self.config, kernel_init=cheap_init)
    return {
      "conv": QConv(6, (3, 3), strides=(1, 2), padding=((1, 0), (2, 1)), **c)(x4),
      "conv_bn": QConvBN(6, (3, 3), **c)(x4, use_running_average=not train),
      "dense_general": QDenseGeneral((2, 3), **c)(x3),
      "dense": QDense(5, **c)(x2),
      "embed": QEmbed(10, 7, config=self.config, embedding_init=cheap_init)(tokens),
    }


def _config(method, bits, granularity, **kw):
  group = dict(weight_group_size=3) if granularity == "per_group" else {}
  return QuantConfig(
    bits, kw.pop("act_bits", bits), method=method, weight_granularity=granularity, **group, **kw
  )


PAIRWISE = [
  ("observer", 8, "per_tensor"),
  ("lsq", 4, "per_tensor"),
  ("observer", 4, "per_channel"),
  ("lsq", 8, "per_channel"),
  ("observer", 8, "per_group"),
  ("lsq", 4, "per_group"),
]
CASES = {f"{m}-w{b}a{b}-{g}": _config(m, b, g) for m, b, g in PAIRWISE}
CASES["observer-w8a8-per_channel-symmetric_act"] = _config(
  "observer", 8, "per_channel", act_symmetric=True
)
CASES["lsq-w4-per_channel-weight_only"] = _config("lsq", 4, "per_channel", act_bits=None)
# convert() runs the model once op by op (seconds of per-op compiles on CPU); the other cases
# hand it a jitted apply (same code, one compile).
EAGER_CASE = "observer-w8a8-per_tensor"


INPUTS = (
  rand((2, 5, 6, 7), 0, 1.5, 0.3),
  rand((3, 2, 7), 1),
  rand((4, 8), 2, 2.0),
  jnp.asarray(np.random.default_rng(3).integers(0, 10, (2, 5)), jnp.int32),
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_path_agrees_with_fake_quant(case):
  model = Zoo(CASES[case])
  # Eval inputs wider than the calibration batch (some clip); BN with non-trivial statistics.
  eval_inputs = tuple(x * 1.3 if x.dtype == jnp.float32 else x for x in INPUTS)

  @jax.jit
  def calibrate_and_eval(xs, eval_xs):
    v = model.init(jax.random.key(0), *xs, train=True)
    bs = jax.tree.map(
      lambda s: s + jnp.linspace(0.1, 0.9, s.size).reshape(s.shape), v["batch_stats"]
    )
    _, upd = model.apply({**v, "batch_stats": bs}, *xs, train=True, mutable=["quant_stats"])
    v = {**v, **upd, "batch_stats": bs}
    return v, model.apply(v, *eval_xs)

  v, fake = calibrate_and_eval(INPUTS, eval_inputs)
  qv = qatjax.convert(model if case == EAGER_CASE else JitApply(model), v, *INPUTS)
  integer = jax.jit(functools.partial(model.apply, train=False))(qv, *eval_inputs)
  for name, want in fake.items():
    got = integer[name]
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale, err_msg=name)

  # It really is the integer path: QArray kernels, quantizer state gone.
  for layer in ("QConv_0", "QConvBN_0", "QDenseGeneral_0", "QDense_0"):
    p = qv["params"][layer]
    assert isinstance(p["kernel"], qatjax.QArray), layer
    assert not set(p) & {"kernel_scale", "bn_scale", "bn_bias"}, layer
    assert ("input_scale" in p) == (CASES[case].act_bits is not None), layer
  assert isinstance(qv["params"]["QEmbed_0"]["embedding"], qatjax.QArray)
  assert "batch_stats" not in qv and "quant_stats" not in qv


class TiedEmbedding(nn.Module):
  """A tied output head: rows looked up from the table, then logits against the same table."""

  config: QuantConfig

  @nn.compact
  def __call__(self, ids):
    table = QEmbed(11, 6, config=self.config, embedding_init=cheap_init)
    rows = table(ids)
    return rows, table.attend(2.0 * rows)


@pytest.mark.parametrize(
  "config",
  [QuantConfig(8, None), QuantConfig(4, None, weight_granularity="per_group", weight_group_size=4)],
  ids=["w8_per_row", "w4_per_group"],
)
def test_converted_tied_embedding_matches_hand_computation(config):
  """After convert, lookup and ``attend`` read the same integer table: rows and logits equal the
  hand-quantized table's (per row / per group of 4 features, narrow symmetric range)."""
  model = TiedEmbedding(config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 4)), jnp.int32)
  v = jax.jit(model.init)(jax.random.key(0), ids)
  qv = qatjax.convert(JitApply(model), v, ids)
  assert isinstance(qv["params"]["QEmbed_0"]["embedding"], qatjax.QArray)
  rows, logits = jax.jit(model.apply)(qv, ids)
  w = np.asarray(v["params"]["QEmbed_0"]["embedding"], np.float32)
  qmin, qmax = config.weight_range
  blocks = [w] if config.weight_group_size is None else [w[:, :4], w[:, 4:]]
  deq = []
  for b in blocks:  # one scale per row of each block
    s = np.abs(b).max(axis=1, keepdims=True) / np.float32((qmax - qmin) / 2)
    deq.append(np.clip(np.round(b * (np.float32(1) / s)), qmin, qmax) * s)
  deq = np.concatenate(deq, axis=1).astype(np.float32)
  want_rows = deq[np.asarray(ids)]
  np.testing.assert_allclose(rows, want_rows, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(logits, (2.0 * want_rows) @ deq.T, rtol=1e-5, atol=1e-6)
