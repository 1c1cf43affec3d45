"""quantize_model on Flax transformers: every matmul quantized (Dense, DenseGeneral, Einsum,
Embed lookups and tied heads, attention's activation x activation products), coverage,
dynamic per-token activations, and the integer model matching fake quantization."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax import QuantConfig

VOCAB, D, HEADS, T = 48, 32, 4, 12
W4A8 = QuantConfig(
  4,
  8,
  act_calibration="dynamic",
  act_granularity="per_token",
  weight_granularity="per_group",
  weight_group_size=16,
)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)(h, mask=mask)
    h = nn.Einsum((D, 2 * D), "btd,df->btf")(nn.LayerNorm()(x))
    return x + nn.Dense(D)(nn.gelu(h))


class LM(nn.Module):
  tied: bool = True

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(VOCAB, D)
    x = emb(ids) + nn.Embed(T, D)(jnp.arange(ids.shape[1]))[None]
    mask = nn.make_causal_mask(ids)
    x = Block()(x, mask)
    x = nn.LayerNorm()(x)
    return emb.attend(x) if self.tied else nn.Dense(VOCAB)(x)


IDS = jax.random.randint(jax.random.key(0), (2, T), 0, VOCAB)


@pytest.fixture(scope="module")
def lm():
  model = LM()
  return model, jax.jit(model.init)(jax.random.key(1), IDS)


def _quiet(fn, *args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn(*args, **kwargs)


# Sites counted by hand: token + position lookups; q, k, v projections; q.k and p.v; the
# attention output projection; the Einsum and the Dense of the MLP; the tied head (attend).
EXPECTED = [
  ("Embed_0", "gather"),
  ("Embed_1", "gather"),
  ("Block_0/MultiHeadDotProductAttention_0/query", "dot_general"),
  ("Block_0/MultiHeadDotProductAttention_0/key", "dot_general"),
  ("Block_0/MultiHeadDotProductAttention_0/value", "dot_general"),
  ("Block_0/MultiHeadDotProductAttention_0", "dot_general"),
  ("Block_0/MultiHeadDotProductAttention_0", "dot_general"),
  ("Block_0/MultiHeadDotProductAttention_0/out", "dot_general"),
  ("Block_0/Einsum_0", "dot_general"),
  ("Block_0/Dense_0", "dot_general"),
  ("Embed_0", "dot_general"),
]


@pytest.mark.slow
def test_catch_all_rule_quantizes_every_matmul_and_the_integer_model_matches(lm):
  model, fv = lm
  qm = qatjax.quantize_model(model, W4A8)
  report = qatjax.coverage(qm, IDS)
  assert [(s.path, s.op) for s in report.sites] == EXPECTED
  assert report.fraction == 1.0 and not report.float_sites
  act_x_act = [s.config for s in report.sites if "act x act" in (s.config or "")]
  assert act_x_act == ["A8 dynamic per-token act x act"] * 2
  assert {s.config for s in report.sites if s.op == "gather"} == {"W4g16"}
  v = _quiet(qatjax.from_float, qm, fv, IDS)
  assert set(v) == {"params", "quant_stats"}  # dynamic activations keep no statistics
  stats = jax.tree_util.tree_leaves_with_path(v["quant_stats"])
  assert {jax.tree_util.keystr(p).rsplit("'", 2)[-2] for p, _ in stats} == {"enabled", "observe"}
  y_fq = jax.jit(qm.apply)(v, IDS)
  qv = qatjax.convert(qm, v, IDS)
  y_int = jax.jit(qm.apply)(qv, IDS)
  np.testing.assert_allclose(y_int, y_fq, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(y_fq - jax.jit(model.apply)(fv, IDS)).max()) > 1e-3  # quantization is on
  converted = qatjax.coverage(qm, IDS, variables=qv)
  assert converted.fraction == 1.0
  # Every site serves integers: 9 matmuls and the 2 lookups of int4 rows.
  assert sum(1 for s in converted.sites if (s.config or "").startswith("int ")) == 11
  attn = qv["params"]["Block_0"]["MultiHeadDotProductAttention_0"]
  assert bool(attn["attn_int8"])
  assert attn["query"]["kernel"].shape == (D, HEADS, D // HEADS)  # N-D kernels stay N-D
  assert attn["query"]["kernel"].values.dtype == jnp.uint8  # two 4-bit values per byte


def _int8_dots(fn, *args):
  """``dot_general`` equations of ``fn``'s jaxpr whose operands are both int8."""
  found = []

  def walk(j):
    for e in j.eqns:
      if e.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in e.invars))
      for p in e.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return [d for d in found if d == ("int8", "int8")]


def test_converted_transformer_runs_int8_matmuls_including_attention(lm):
  model, fv = lm
  qm = qatjax.quantize_model(
    model, QuantConfig(8, 8, act_calibration="dynamic", act_granularity="per_token")
  )
  v = _quiet(qatjax.from_float, qm, fv, IDS)
  qv = qatjax.convert(qm, v, IDS)
  # q, k, v, out, Einsum, Dense, tied head, and the two attention products: 9 int8 x int8 dots.
  assert len(_int8_dots(lambda v_, x: qm.apply(v_, x), qv, IDS)) == 9
  assert not _int8_dots(lambda v_, x: qm.apply(v_, x), v, IDS)


def _ref_fake_quant_rows(x, axes, qmin, qmax):
  """Independent per-row affine fake quantization: the range of each row over ``axes``."""
  x = np.asarray(x, np.float64)
  lo = np.minimum(x.min(axis=axes, keepdims=True), 0.0)
  hi = np.maximum(x.max(axis=axes, keepdims=True), 0.0)
  s = np.maximum((hi - lo) / (qmax - qmin), 2.0**-23)
  z = np.clip(qmin - np.round(lo / s), qmin, qmax)
  return (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s


def test_dynamic_per_token_dense_matches_a_row_wise_reference():
  cfg = QuantConfig(None, 8, act_calibration="dynamic", act_granularity="per_token")
  x = np.random.default_rng(0).normal(size=(3, 5, 16)) * np.linspace(0.05, 4.0, 5)[None, :, None]
  x = jnp.asarray(x, jnp.float32)
  layer = qatjax.QDense(6, config=cfg)
  v = layer.init(jax.random.key(0), x)
  want = _ref_fake_quant_rows(x, -1, 0, 255) @ np.asarray(v["params"]["kernel"], np.float64)
  np.testing.assert_allclose(
    layer.apply(v, x), want + np.asarray(v["params"]["bias"]), rtol=1e-4, atol=1e-4
  )
  # A per-tensor scale would differ: the rows span two orders of magnitude.
  per_tensor = _ref_fake_quant_rows(x, (0, 1, 2), 0, 255) @ np.asarray(v["params"]["kernel"])
  assert np.abs(per_tensor - want).max() > 1e-2
  # Gradients pass straight through (nothing clips with a dynamic min/max range).
  g = jax.grad(lambda x_: layer.apply(v, x_).sum())(x)
  np.testing.assert_allclose(
    g, np.broadcast_to(np.asarray(v["params"]["kernel"]).sum(1), x.shape), rtol=1e-5
  )


def test_attention_products_match_an_independent_quantized_attention():
  cfg = QuantConfig(None, 8, act_calibration="dynamic", act_granularity="per_token")
  attn = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)
  x = jax.random.normal(jax.random.key(2), (2, T, D))
  av = attn.init(jax.random.key(3), x)
  qm = qatjax.quantize_model(attn, {"query|key|value|out": None, ".*": cfg})
  got = qm.apply(_quiet(qatjax.from_float, qm, av, x), x)

  def ref_attention(query, key, value, **kw):
    depth = query.shape[-1]
    q = _ref_fake_quant_rows(query / np.sqrt(depth), -1, 0, 255)
    k = _ref_fake_quant_rows(key, -1, 0, 255)
    w = jax.nn.softmax(np.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    p = _ref_fake_quant_rows(w, -1, 0, 255)
    v_ = _ref_fake_quant_rows(value, 1, 0, 255)  # p.v contracts the key axis of the values
    return np.einsum("bhqk,bkhd->bqhd", p, v_).astype(np.float32)

  want = attn.clone(attention_fn=ref_attention).apply(av, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert float(jnp.abs(got - attn.apply(av, x)).max()) > 1e-3


def test_subclasses_dtype_and_custom_dot_general_are_respected():
  calls = []

  def my_dot(a, b, dims, precision=None, **kw):
    calls.append((a.dtype, precision))
    return jax.lax.dot_general(a, b, dims, precision=precision)

  class MyDense(nn.Dense):
    pass

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = MyDense(8, dtype=jnp.bfloat16)(x)
      assert x.dtype == jnp.bfloat16
      return nn.Dense(
        4, dtype=jnp.bfloat16, dot_general=my_dot, precision=jax.lax.Precision.HIGHEST
      )(x)

  x = jax.random.normal(jax.random.key(0), (2, 6))
  qm = qatjax.quantize_model(Net(), QuantConfig(8, 8, act_calibration="dynamic"))
  v = _quiet(qm.init, jax.random.key(1), x)
  report = qatjax.coverage(qm, x, variables=v)
  assert [s.config for s in report.sites] == ["W8 A8 dynamic per-tensor"] * 2
  y = qm.apply(v, x)
  assert calls and calls[-1] == (jnp.bfloat16, jax.lax.Precision.HIGHEST)
  assert y.dtype == jnp.bfloat16


def test_coverage_says_why_ops_stay_float_and_init_warns():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.ones, (x.shape[-1], 3))
      return x @ w

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="kept_float")(x)
      x = nn.Dense(4, name="unmatched")(x)
      x = Custom(name="custom")(x)
      a = nn.MultiHeadDotProductAttention(num_heads=1, name="attn")(x[:, None])
      return a[:, 0]

  rules = {"kept_float": None, "custom|attn|attn/.*": QuantConfig(8, None)}
  qm = qatjax.quantize_model(Net(), rules)
  x = jnp.ones((2, 5))
  with pytest.warns(UserWarning, match=r"stay float in matched layers: custom dot_general"):
    v = qm.init(jax.random.key(0), x)
  reasons = {(s.path, s.op): s.reason for s in qatjax.coverage(qm, x, variables=v).float_sites}
  assert reasons[("kept_float", "dot_general")] == "its rule maps to None"
  assert reasons[("unmatched", "dot_general")] == "no rule matched"
  assert reasons[("custom", "dot_general")].startswith("unsupported op in Custom")
  assert "no act_bits" in reasons[("attn", "dot_general")]
  assert ("attn/query", "dot_general") not in reasons  # W8 weight-only projections


@pytest.mark.parametrize(
  "rules, model_fn, match",
  [
    (
      {".*": QuantConfig(8, 8, attention_matmuls=True)},
      lambda: nn.Dense(3),
      r"layer <root> \(Dense\) matches rule '\.\*'.*attention_matmuls=True.*not an attention",
    ),
    (
      {".*": QuantConfig(8, 8)},
      lambda: nn.Einsum((4, 3), "bd,dk,kk->b"),
      r"layer <root>: einsum equation 'bd,dk,kk->b' must have exactly two operands",
    ),
    (
      {".*": QuantConfig(8, 8)},
      lambda: nn.Einsum((4, 3), "bdz,dk->bk"),
      r"layer <root>: einsum 'bdz,dk->bk'.*index 'z' is summed within one operand",
    ),
    (
      {".*": QuantConfig(8, 8, act_calibration="dynamic", act_granularity="per_token")},
      lambda: nn.Conv(2, (3,)),
      r"layer <root>: a convolution's activations can be quantized per tensor only",
    ),
  ],
)
def test_bad_rules_and_equations_raise_before_any_step(rules, model_fn, match):
  x = jnp.ones((2, 4, 4)) if "Einsum" not in str(model_fn()) else jnp.ones((2, 4, 2))
  if isinstance(model_fn(), nn.Dense):
    x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match=match):
    _quiet(qatjax.quantize_model(model_fn(), rules).init, jax.random.key(0), x)


def test_dynamic_config_rejects_observer_only_fields():
  with pytest.raises(ValueError, match=r"act_calibration='dynamic'.*pact=True"):
    QuantConfig(act_calibration="dynamic", pact=True)
  with pytest.raises(ValueError, match=r"act_calibration='dynamic'.*act_momentum=0\.2"):
    QuantConfig(act_calibration="dynamic", act_momentum=0.2)
  with pytest.raises(ValueError, match=r"act_granularity='per_token' needs act_calibration"):
    QuantConfig(act_granularity="per_token")
  with pytest.raises(ValueError, match=r"weight_group_size must be an int >= 1, got 0"):
    QuantConfig(4, 8, weight_granularity="per_group", weight_group_size=0)


def test_float16_group_scales_give_the_q4_0_layout_and_the_same_outputs():
  """int4 in groups of 32 with float16 scales (4.5 bits per weight) and no zero points."""
  cfg = QuantConfig(
    4,
    8,
    act_calibration="dynamic",
    act_granularity="per_token",
    weight_granularity="per_group",
    weight_group_size=32,
    weight_scale_dtype="float16",
  )
  k, n = 96, 40
  layer = qatjax.QDense(n, config=cfg, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (4, k))
  v = layer.init(jax.random.key(1), x)
  qv = qatjax.convert(layer, v, x)
  qa = qv["params"]["kernel"]
  assert qa.scale.dtype == jnp.float16 and qa.scale.shape == (3, n) and qa.zero_point.shape == ()
  assert qatjax.model_size(qv).total == k * n // 2 + 3 * n * 2 + 4
  # The training grid already uses the float16-rounded scales: integers give the same outputs.
  np.testing.assert_allclose(layer.apply(qv, x), layer.apply(v, x), rtol=1e-5, atol=1e-5)
  w = np.asarray(v["params"]["kernel"])
  # observer weights use the narrow range [-7, 7]: s = max|w| / 7 per group, rounded to float16
  s = (np.abs(w.reshape(3, 32, n)).max(1) / 7.0).astype(np.float16).astype(np.float32)
  want = np.clip(np.round(w / np.repeat(s, 32, axis=0)), -7, 7)
  np.testing.assert_array_equal(np.asarray(qa.unpack()), want)
