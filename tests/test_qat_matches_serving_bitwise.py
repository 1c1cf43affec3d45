"""Evaluated QAT models give the converted integer model's logits bit for bit (greedy
generation cannot differ): an integer kernel's last multiply and a quantized embedding lookup's
rows are computed by the same expressions in both programs, so that XLA:CPU forms the same fused
multiply-adds with what follows them (biases, token + position embeddings); the gradients stay
the straight-through estimators'."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_on_cpu_devices

import qatjax
from qatjax import QuantConfig

VOCAB, D, T = 64, 96, 24
EMBED = QuantConfig(8, None)  # int8 rows, one scale per row
W8A8 = QuantConfig(8, 8, act_calibration="dynamic", act_granularity="per_token")
W4A8 = QuantConfig(
  4,
  8,
  act_calibration="dynamic",
  act_granularity="per_token",
  weight_granularity="per_group",
  weight_group_size=32,
  weight_scale_dtype="float16",
)


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    pos = nn.Embed(T, D)(jnp.arange(ids.shape[-1]))
    x = nn.Embed(VOCAB, D)(ids) + pos  # a multiply-add in the converted model
    x = nn.LayerNorm()(x)
    return nn.Dense(VOCAB)(nn.gelu(nn.Dense(2 * D)(x)))


def _setup(rules):
  model = TinyLM()
  ids = jax.random.randint(jax.random.key(0), (8, T), 0, VOCAB)
  fv = model.init(jax.random.key(1), ids)
  # trained-like: non-zero biases (a multiply-add after each quantized matmul when serving)
  keys = iter(jax.random.split(jax.random.key(3), 8))
  fv = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.1 * jax.random.normal(next(keys), x.shape) if "bias" in str(p) else x, fv
  )
  qm = qatjax.quantize_model(model, rules)
  v = qatjax.from_float(qm, fv, ids)
  return qm, v, qatjax.convert(qm, v, ids), ids


# XLA compiles the tests' programs at -O0 (conftest.py), where fused multiply-adds are formed
# differently; the claim is about the compiler's defaults, so it is checked in a fresh process.
_BITWISE = """
import pathlib, sys
sys.path.insert(0, str(pathlib.Path({here!r})))
import jax, numpy as np, qatjax
from test_qat_matches_serving_bitwise import _setup, EMBED, W4A8, W8A8
for cfg in (None, W8A8, W4A8):
  rules = {{r"Embed_\\d": EMBED, ".*": cfg}}
  qm, v, qv, ids = _setup(rules)
  with qatjax.qat_forward("integer"):  # "auto" does so only where bfloat16 products are fast
    apply = jax.jit(qm.apply)
    diff = np.abs(np.asarray(apply(v, ids)) - np.asarray(apply(qv, ids)))
  print("max |qat - int|:", float(diff.max()))
print("done")
"""


@pytest.mark.slow
def test_qat_logits_are_the_integer_models_bit_for_bit():
  out = run_on_cpu_devices(_BITWISE.format(here=str(pathlib.Path(__file__).parent)), 1, "done")
  diffs = [float(line.split(":")[1]) for line in out.splitlines() if line.startswith("max")]
  assert diffs == [0.0, 0.0, 0.0], out


def test_rows_are_the_fake_quantized_tables_rows():
  qm, v, _, ids = _setup({r"Embed_\d": EMBED, ".*": None})
  table = v["params"]["Embed_1"]["embedding"]
  s = jnp.abs(table).max(axis=1, keepdims=True) / 127
  rows = qm.apply(v, ids, capture_intermediates=True, mutable=["intermediates"])[1]
  got = rows["intermediates"]["Embed_1"]["__call__"][0]
  np.testing.assert_allclose(got, (jnp.round(table / s) * s)[ids], rtol=1e-6, atol=1e-7)


def test_gradients_are_the_straight_through_estimators():
  _, v, _, ids = _setup({r"Embed_\d": EMBED, ".*": None})
  c = jax.random.normal(jax.random.key(2), (8, T, D))

  class Rows(nn.Module):  # the token lookup alone
    @nn.compact
    def __call__(self, ids):
      return nn.Embed(VOCAB, D)(ids)

  rm = qatjax.quantize_model(Rows(), {".*": EMBED})
  table = v["params"]["Embed_1"]["embedding"]
  rv = {"params": {"Embed_0": {"embedding": table}}}
  rv = qatjax.from_float(rm, rv, ids)

  def loss(t):
    return jnp.sum(c * rm.apply({**rv, "params": {"Embed_0": {"embedding": t}}}, ids))

  for f in (jax.grad(loss), jax.jit(jax.grad(loss))):
    # per-row min/max scales cover every weight: dL/dtable is the scatter-add of c (STE)
    expected = np.zeros((VOCAB, D), np.float32)
    np.add.at(expected, np.asarray(ids), np.asarray(c))
    np.testing.assert_allclose(f(table), expected, rtol=1e-6, atol=1e-6)


def test_disabled_lookup_is_the_float_lookup():
  qm, v, _, ids = _setup({r"Embed_\d": EMBED, ".*": None})
  off = qatjax.set_quant_flags(v, enabled=False)
  table = v["params"]["Embed_1"]["embedding"]

  class Rows(nn.Module):
    @nn.compact
    def __call__(self, ids):
      return nn.Embed(VOCAB, D)(ids)

  rm = qatjax.quantize_model(Rows(), {".*": EMBED})
  rv = qatjax.from_float(rm, {"params": {"Embed_0": {"embedding": table}}}, ids)
  got = jax.jit(rm.apply)(qatjax.set_quant_flags(rv, enabled=False), ids)
  assert np.array_equal(np.asarray(got), np.asarray(table)[np.asarray(ids)])
  # the whole model with quantization off is the float model
  float_out = TinyLM().apply({"params": v["params"]}, ids)
  np.testing.assert_allclose(jax.jit(qm.apply)(off, ids), float_out, rtol=1e-6, atol=1e-6)
