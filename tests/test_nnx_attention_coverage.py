"""NNX attention (``QMultiHeadAttention``: q.k and p.v quantized) and the NNX ``coverage`` report.

Expected figures are derived by hand: the number of matmuls / lookups a block runs, the scales a
per-tensor observer sees, the causal mask written out.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qatjax
import qatjax.nnx as qnnx
from qatjax import QuantConfig

VOCAB, D, HEADS, T = 16, 8, 2, 5


class Decoder(nnx.Module):
  """A decoder block written with Flax NNX's own modules, tied output head."""

  def __init__(self, rngs, num_kv_heads=None):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D, num_kv_heads=num_kv_heads, decode=False, rngs=rngs)
    self.mlp_in = nnx.Linear(D, 16, rngs=rngs)
    self.mlp_out = nnx.Linear(16, D, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    h = h + self.attn(h, mask=nnx.make_causal_mask(ids))
    h = h + self.mlp_out(nnx.relu(self.mlp_in(h)))
    return self.embed.attend(h)


IDS = jnp.arange(2 * T).reshape(2, T) % VOCAB
# Embedding lookup, q / k / v projections, q.k, p.v, out projection, two MLP layers, attend.
SITES = [
  ("embed", "gather"),
  ("attn/query", "dot_general"),
  ("attn/key", "dot_general"),
  ("attn/value", "dot_general"),
  ("attn", "dot_general"),
  ("attn", "dot_general"),
  ("attn/out", "dot_general"),
  ("mlp_in", "dot_general"),
  ("mlp_out", "dot_general"),
  ("embed", "dot_general"),
]
W4A8 = QuantConfig(
  4,
  8,
  weight_granularity="per_group",
  weight_group_size=4,
  act_calibration="dynamic",
  act_granularity="per_token",
)


@pytest.mark.parametrize("config", [QuantConfig(8, 8), W4A8], ids=["w8a8", "w4a8_dynamic"])
def test_catch_all_rule_covers_every_matmul_of_a_transformer(config):
  model = Decoder(nnx.Rngs(0))
  before = qnnx.coverage(model, IDS)
  assert [(s.path, s.op) for s in before.sites] == SITES
  assert before.fraction == 0.0 and "a float nnx.Linear" in before.sites[7].reason

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing stays float in a matched layer
    qnnx.quantize_model(model, config, IDS)
  report = qnnx.coverage(model, IDS)
  assert [(s.path, s.op) for s in report.sites] == SITES
  assert report.fraction == 1.0, str(report)
  assert report.sites[4].config.endswith("act x act")
  assert "10 of 10 quantized (100%)" in str(report)

  model.eval()
  int_report = qnnx.coverage(qnnx.convert(model, IDS), IDS)
  assert int_report.fraction == 1.0
  assert all(s.config.startswith("int ") for s in int_report.sites), str(int_report)


def test_weight_only_attention_and_unmatched_layers_say_why():
  model = Decoder(nnx.Rngs(0))
  qnnx.quantize_model(model, {"mlp_out": None, ".*": QuantConfig(4, None)}, IDS)
  report = qnnx.coverage(model, IDS)
  floats = {(s.path, s.reason) for s in report.float_sites}
  weight_only = "the config has no act_bits (weight-only): activation x activation stays float"
  assert floats == {("attn", weight_only), ("mlp_out", "a float nnx.Linear (no rule quantized it)")}
  assert not any(s.requested for s in report.float_sites)
  assert len(report.quantized) == 7


class RawMatmul(nnx.Module):
  def __init__(self):
    self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    self.w = nnx.Param(jnp.ones((4, 2)))

  def __call__(self, x):
    return self.dense(x) @ self.w[...]


def test_quantize_model_warns_about_float_matmuls_in_matched_modules():
  x = jnp.ones((1, 3))
  with pytest.warns(UserWarning, match=r"stay float in matched layers: <root> dot_general"):
    qnnx.quantize_model(RawMatmul(), QuantConfig(8, 8), x)
  with warnings.catch_warnings():  # the root is not matched: reported by coverage, no warning
    warnings.simplefilter("error")
    model = qnnx.quantize_model(RawMatmul(), {"dense": QuantConfig(8, 8)}, x)
  (raw,) = qnnx.coverage(model, x).float_sites
  assert raw.path == "<root>" and raw.reason == "op in the model's own code (no layer around it)"


def test_coverage_leaves_the_model_as_it_was_and_checks_its_argument():
  model = Decoder(nnx.Rngs(0))
  qnnx.quantize_model(model, QuantConfig(8, 8), IDS)
  classes = [type(m) for _, m in nnx.iter_modules(model)]
  stats = nnx.to_pure_dict(nnx.state(model, qnnx.QuantStat))
  qnnx.coverage(model, IDS)
  assert [type(m) for _, m in nnx.iter_modules(model)] == classes
  jax.tree.map(
    np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, qnnx.QuantStat)), stats
  )
  assert not hasattr(model.attn, "_qatjax_coverage_id")
  with pytest.raises(ValueError, match=r"use qatjax.nnx.coverage"):
    qatjax.coverage(model, IDS)
  with pytest.raises(ValueError, match=r"expects an nnx.Module, got Dense"):
    qnnx.coverage(nn.Dense(3), IDS)


def test_attention_matmuls_quantize_both_operands_on_the_observed_grid():
  """Per-tensor observers: q.k is computed from q and k rounded to their own 8-bit grids."""
  attn = qnnx.QMultiHeadAttention(
    HEADS, D, config=QuantConfig(8, 8), decode=False, use_bias=False, rngs=nnx.Rngs(1)
  )
  x = jax.random.normal(jax.random.key(2), (2, T, D))
  qnnx.init_quantizers(attn, x)
  attn.eval()
  got = nnx.capture(lambda m, x: m(x, sow_weights=True), nnx.Intermediate)(attn, x)[1]
  weights = got["attention_weights"][0]

  def fq(v, name):  # the observer's affine 8-bit grid from its stored range
    lo = jnp.minimum(getattr(attn, f"{name}_min")[...], 0.0)
    hi = jnp.maximum(getattr(attn, f"{name}_max")[...], 0.0)
    scale = (hi - lo) / 255.0
    zp = jnp.clip(jnp.round(-128 - lo / scale), -128, 127)
    return (jnp.clip(jnp.round(v / scale) + zp, -128, 127) - zp) * scale

  q = attn.query(x) / jnp.sqrt(D // HEADS)
  k = attn.key(x)
  logits = jnp.einsum("bqhd,bkhd->bhqk", fq(q, "attn_q"), fq(k, "attn_k"))
  np.testing.assert_allclose(weights, jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_grouped_query_attention_and_is_causal():
  float_model = Decoder(nnx.Rngs(0), num_kv_heads=1)
  y_float = float_model(IDS)
  model = Decoder(nnx.Rngs(0), num_kv_heads=1)
  qnnx.quantize_model(model, QuantConfig(8, 8), IDS)
  model.eval()
  assert qnnx.coverage(model, IDS).fraction == 1.0
  y = model(IDS)
  assert float(jnp.abs(y - y_float).max()) < 0.05 * float(jnp.abs(y_float).max())
  int_model = qnnx.convert(model, IDS)
  np.testing.assert_allclose(int_model(IDS), y, rtol=1e-4, atol=1e-4)

  attn = model.attn
  h = model.embed(IDS)
  by_mask = attn(h, mask=nnx.make_causal_mask(IDS))
  np.testing.assert_allclose(attn(h, is_causal=True), by_mask, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(attn(h) - by_mask).max()) > 1e-3  # the mask matters


def test_lsq_attention_steps_learn():
  model = Decoder(nnx.Rngs(0))
  qnnx.quantize_model(model, QuantConfig(8, 8, method="lsq"), IDS)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  start = {s: float(getattr(model.attn, f"attn_{s}_scale")[...]) for s in "qkpv"}

  @nnx.jit
  def step(model, opt):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(IDS), IDS).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  for _ in range(3):
    step(model, opt)
  moved = {s: float(getattr(model.attn, f"attn_{s}_scale")[...]) != v for s, v in start.items()}
  assert moved == dict.fromkeys("qkpv", True)


def test_bad_attention_input_is_refused_by_path():
  def custom(*args, **kwargs):
    return nnx.dot_product_attention(*args, **kwargs)

  model = Decoder(nnx.Rngs(0))
  model.attn.attention_fn = custom
  with pytest.raises(
    ValueError, match=r"layer attn: MultiHeadAttention with a custom attention_fn"
  ):
    qnnx.quantize_model(model, QuantConfig(8, 8), IDS)
  assert type(model.mlp_in) is nnx.Linear  # nothing converted

  attention_only = QuantConfig(8, 8, attention_matmuls=True)
  with pytest.raises(ValueError, match=r"layer mlp_in \(Linear\) .*attention_matmuls=True"):
    qnnx.quantize_model(
      Decoder(nnx.Rngs(0)), {"attn": attention_only, "mlp_in": attention_only}, IDS
    )


def test_view_sets_the_observers_and_the_attention_mode():
  attn = qnnx.QMultiHeadAttention(HEADS, D, config=QuantConfig(), decode=False, rngs=nnx.Rngs(0))
  view = nnx.view(attn, use_running_average=True, deterministic=True)
  assert view.use_running_average and view.deterministic
  assert not attn.use_running_average
