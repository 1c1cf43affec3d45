"""QDense / QDenseGeneral / QConv / QEmbed against their Flax counterparts.

For every layer geometry and for ``config=None`` / observer / LSQ:
  * the parameter tree is Flax's (plus only quantizer leaves), and init draws the same values;
  * a float Flax checkpoint loads unchanged (params copied, quant_stats from init);
  * with quantization disabled the output equals the Flax layer's bit for bit.

Compilation dominates the cost of these tests on CPU, so initializers are cheap
(``test_layers_helpers.cheap_init``), each layer's inits run in one jitted function, and the
un-jitted variant runs on a representative subset.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from test_layers_helpers import QUANTIZER_LEAVES, cheap_init

import qatjax
from qatjax import QConv, QDense, QDenseGeneral, QEmbed, QuantConfig

CONFIGS = {
  "float": None,
  "observer_w8a8": QuantConfig(),
  "lsq_w4a4_tensor": QuantConfig(4, 4, method="lsq", weight_granularity="per_tensor"),
}


def _dense(features, **kw):
  kw.setdefault("kernel_init", cheap_init)
  return (lambda: nn.Dense(features, **kw)), (lambda cfg: QDense(features, config=cfg, **kw))


def _dg(features, **kw):
  kw.setdefault("kernel_init", cheap_init)
  return (
    (lambda: nn.DenseGeneral(features, **kw)),
    (lambda cfg: QDenseGeneral(features, config=cfg, **kw)),
  )


def _conv(features, kernel_size, **kw):
  kw.setdefault("kernel_init", cheap_init)
  return (
    (lambda: nn.Conv(features, kernel_size, **kw)),
    (lambda cfg: QConv(features, kernel_size, config=cfg, **kw)),
  )


# name -> (flax ctor, Q ctor, input shape); "embed*" layers take integer inputs.
LAYERS = {
  "dense": (*_dense(5), (3, 7)),
  "dense_3d_input_no_bias": (*_dense(5, use_bias=False), (2, 3, 7)),
  "dense_general_two_axes": (*_dg((2, 3), axis=(1, 2)), (2, 3, 4, 5)),
  "dense_general_unsorted_axes": (*_dg((2, 3), axis=(-1, 1)), (2, 3, 4, 5)),
  "dense_general_last": (*_dg(4), (3, 6)),
  "conv1d": (*_conv(6, (3,)), (2, 9, 4)),
  "conv1d_unbatched": (*_conv(6, 3), (9, 4)),
  "conv1d_causal_kernel_dilation": (
    *_conv(6, (3,), padding="CAUSAL", kernel_dilation=2),
    (2, 9, 4),
  ),
  "conv2d_same_stride2": (*_conv(6, (3, 3), strides=2), (2, 7, 6, 4)),
  "conv2d_valid": (*_conv(6, (3, 2), padding="VALID"), (2, 7, 6, 4)),
  "conv2d_explicit_input_dilation": (
    *_conv(6, (3, 3), padding=((1, 1), (0, 2)), input_dilation=2),
    (2, 5, 4, 4),
  ),
  "conv2d_int_padding": (*_conv(6, (3, 3), padding=1), (2, 7, 6, 4)),
  "conv2d_circular_kernel_dilation": (
    *_conv(6, (3, 3), padding="CIRCULAR", kernel_dilation=(1, 2)),
    (2, 7, 6, 4),
  ),
  "conv2d_grouped": (*_conv(6, (3, 3), feature_group_count=2), (2, 7, 6, 4)),
  "conv2d_depthwise": (*_conv(8, (3, 3), feature_group_count=4), (2, 7, 6, 4)),
  "conv2d_two_batch_dims": (*_conv(6, (3, 3)), (2, 2, 5, 5, 4)),
  "conv3d_strides": (*_conv(5, (2, 2, 2), strides=(1, 2, 1)), (2, 4, 5, 3, 2)),
  "embed": (
    (lambda: nn.Embed(11, 4, embedding_init=cheap_init)),
    (lambda cfg: QEmbed(11, 4, config=cfg, embedding_init=cheap_init)),
    (2, 5),
  ),
}

# The un-jitted variant runs on these (one of each layer kind).
EAGER_LAYERS = ("dense_general_two_axes", "conv2d_circular_kernel_dilation", "embed")


def _input(name, shape, seed=1):
  rng = np.random.default_rng(seed)
  if name.startswith("embed"):
    return jnp.asarray(rng.integers(0, 11, shape), jnp.int32)
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _tree_sig(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def _checkpoint(shapes, seed=7):
  """A 'trained' float checkpoint of the given tree shapes, drawn with numpy (no compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _check_tree_and_init(layer, fvars, qvars):
  """Flax's params (shapes, dtypes, init values) plus quantizer state only."""
  fp = fvars["params"]
  assert set(fvars) == {"params"}
  for name, cfg in CONFIGS.items():
    qv = qvars[name]
    qp = qv["params"]
    # Flax's leaves with Flax's shapes and dtypes, and (same key) Flax's initial values: the Q
    # layer draws its float params first, in Flax's order.
    assert _tree_sig({k: qp[k] for k in fp}) == _tree_sig(fp), name
    for k in fp:
      np.testing.assert_array_equal(qp[k], fp[k], err_msg=f"{name}: {k}")
    # ... plus quantizer leaves only (LSQ's learned scales; none for float and observers).
    extra = set(qp) - set(fp)
    if cfg is None:
      assert set(qv) == {"params"} and not extra, name
      continue
    assert extra <= QUANTIZER_LEAVES, (name, extra)
    assert bool(extra) == (cfg.method == "lsq"), name
    # init creates no other state (in particular not convert's "quant_record").
    assert set(qv) == {"params", "quant_stats"}, (name, sorted(qv))
    stats = qv["quant_stats"]
    for flag in ("enabled", "observe"):
      assert stats[flag].dtype == jnp.bool_ and stats[flag].shape == () and bool(stats[flag])
    observed = cfg.method == "observer" and not layer.startswith("embed")
    assert ({"input_min", "input_max", "input_count"} <= set(stats)) == observed, name
    if observed:  # init never calibrates
      assert int(stats["input_count"]) == 0, name
      assert float(stats["input_min"]) == float(stats["input_max"]) == 0.0, name


def _error_bound(f, cfg, params, ckpt_params, x):
  """Element-wise bound on |quantized layer - float layer| from the quantization steps alone.

  ``F(x_q, w_q) - F(x, w) = F(x_q - x, w_q) + F(x, w_q - w)`` for the (bilinear, bias-free) float
  layer ``F``, so ``|error| <= F(e_x, |w| + e_w) + F(|x|, e_w)`` with element-wise bounds
  ``e_x >= |x_q - x|`` and ``e_w >= |w_q - w|``: the input's range is calibrated on ``x`` itself
  (observer: min/max; LSQ: initialised from it), so ``e_x`` is one step (half a step of rounding
  plus at most half a step that the rounded zero point moves the range by); observer weights are
  min/max per channel (half a step); LSQ weights clip at ``qmax * s``, so
  ``e_w = max(s / 2, |w| - qmax * s)``. An embedding lookup reads ``e_w``'s rows.
  """
  wname = "embedding" if isinstance(f, nn.Embed) else "kernel"
  w = ckpt_params[wname]
  qmin, qmax = cfg.weight_range
  if cfg.method == "lsq":  # the learned step of the state, clamped as the quantizer does
    s = jnp.maximum(params[f"{wname}_scale"], qatjax.EPS)
    e_w = jnp.maximum(s / 2, jnp.abs(w) - qmax * s)
  else:  # per channel: the axes a scale is shared along are the contracted ones
    n_out = len(f.features) if isinstance(getattr(f, "features", None), tuple) else 1
    shared = (1,) if wname == "embedding" else tuple(range(w.ndim - n_out))
    step = jnp.abs(w).max(axis=shared, keepdims=True) / ((qmax - qmin) / 2)
    e_w = jnp.broadcast_to(step / 2, w.shape)
  zeros = {k: jnp.zeros_like(a) for k, a in ckpt_params.items()}
  layer = lambda inputs, weight: f.apply({"params": {**zeros, wname: weight}}, inputs)
  if wname == "embedding":
    return layer(x, e_w)
  aqmin, aqmax = cfg.act_range
  e_x = (jnp.maximum(x.max(), 0) - jnp.minimum(x.min(), 0)) / (aqmax - aqmin)
  return layer(jnp.full_like(x, e_x), jnp.abs(w) + e_w) + layer(jnp.abs(x), e_w)


class MatchesFlaxTest(chex.TestCase):
  """Every layer jitted; the un-jitted variant on EAGER_LAYERS only."""

  @chex.variants(with_jit=True)
  @parameterized.named_parameters((layer, layer) for layer in sorted(LAYERS))
  def test_matches_flax_tree_checkpoint_and_disabled_output(self, layer):
    self._check_tree_checkpoint_and_disabled_output(layer)

  @chex.variants(without_jit=True)
  @parameterized.named_parameters((layer, layer) for layer in sorted(EAGER_LAYERS))
  def test_matches_flax_tree_checkpoint_and_disabled_output_eager(self, layer):
    self._check_tree_checkpoint_and_disabled_output(layer)

  def _check_tree_checkpoint_and_disabled_output(self, layer):
    make_flax, make_q, shape = LAYERS[layer]
    x = _input(layer, shape)
    f = make_flax()
    qs = {name: make_q(cfg) for name, cfg in CONFIGS.items()}
    ckpt = _checkpoint(jax.eval_shape(f.init, jax.random.key(0), x))

    def run(ckpt, x):
      fvars = f.init(jax.random.key(0), x)
      qvars = {n: q.init(jax.random.key(0), x) for n, q in qs.items()}
      out = {"flax": f.apply(ckpt, x)}
      for name, q in qs.items():
        if CONFIGS[name] is None:  # config=None: the float checkpoint is the whole variables dict
          out[name] = q.apply(ckpt, x)
          continue
        # The checkpoint's params replace the Q layer's, unchanged; quantizer state from init.
        v = {**qvars[name], "params": {**qvars[name]["params"], **ckpt["params"]}}
        off = qatjax.set_quant_flags(v, enabled=False)
        out[name] = (
          q.apply(off, x),
          q.apply(off, x, mutable=["quant_stats"])[0],  # observers update meanwhile
          q.apply(v, x, mutable=["quant_stats"])[0],  # enabled
          _error_bound(f, CONFIGS[name], v["params"], ckpt["params"], x),
        )
      return fvars, qvars, out

    fvars, qvars, out = self.variant(run)(ckpt, x)
    _check_tree_and_init(layer, fvars, qvars)
    y_flax = out["flax"]
    for name in CONFIGS:
      if CONFIGS[name] is None:
        np.testing.assert_array_equal(out[name], y_flax, err_msg=name)
        continue
      y_eval, y_train, y_on, bound = out[name]
      np.testing.assert_array_equal(y_eval, y_flax, err_msg=name)
      np.testing.assert_array_equal(y_train, y_flax, err_msg=name)
      # Enabled, the layer does quantize (otherwise the equalities above would prove nothing), and
      # by no more than its quantization steps allow.
      assert not np.array_equal(y_on, y_flax), name
      err = np.abs(np.asarray(y_on, np.float64) - np.asarray(y_flax))
      slack = 1e-5 * float(np.abs(y_flax).max()) + 1e-6  # float32 summation order
      assert np.all(err <= np.asarray(bound) + slack), (name, float((err - bound).max()))


def test_observer_params_tree_is_exactly_the_float_checkpoint():
  make_flax, make_q, shape = LAYERS["conv2d_same_stride2"]
  x = _input("conv", shape)
  f, q = make_flax(), make_q(CONFIGS["observer_w8a8"])
  ckpt = _checkpoint(jax.eval_shape(f.init, jax.random.key(0), x))
  qinit = jax.jit(q.init)(jax.random.key(0), x)
  assert jax.tree.structure(ckpt["params"]) == jax.tree.structure(qinit["params"])
  assert _tree_sig(ckpt["params"]) == _tree_sig(qinit["params"])
  off = qatjax.set_quant_flags({**ckpt, "quant_stats": qinit["quant_stats"]}, enabled=False)
  run = jax.jit(lambda off, ckpt, x: (q.apply(off, x), f.apply(ckpt, x)))
  y_q, y_f = run(off, ckpt, x)
  np.testing.assert_array_equal(y_q, y_f)


class EmbedAttendTest(chex.TestCase):
  """QEmbed.attend against nn.Embed.attend, jitted and un-jitted."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_embed_attend_matches_flax(self):
    make_flax, make_q, shape = LAYERS["embed"]
    f, q = make_flax(), make_q(CONFIGS["observer_w8a8"])
    ckpt = _checkpoint(jax.eval_shape(f.init, jax.random.key(0), _input("embed", shape)))
    query = _input("query", (3, 4))
    # attend quantizes the query too: its observer statistics come from an init through attend
    qinit = jax.jit(functools.partial(q.init, method="attend"))(jax.random.key(0), query)
    want = f.apply(ckpt, query, method="attend")
    attend = self.variant(lambda v, q_: q.apply(v, q_, method="attend"))
    on = {**ckpt, "quant_stats": qinit["quant_stats"]}
    np.testing.assert_array_equal(attend(qatjax.set_quant_flags(on, enabled=False), query), want)
    assert not np.array_equal(attend(on, query), want)
    np.testing.assert_array_equal(QEmbed(11, 4).apply(ckpt, query, method="attend"), want)


def test_dtype_and_precision_fields_are_honoured():
  x = _input("conv", (2, 6, 6, 3))
  kw = dict(dtype=jnp.bfloat16, precision=jax.lax.Precision.HIGHEST, kernel_init=cheap_init)
  f = nn.Conv(4, (3, 3), **kw)
  q = QConv(4, (3, 3), config=QuantConfig(), **kw)
  fv = jax.jit(f.init)(jax.random.key(0), x)
  qv = qatjax.set_quant_flags(jax.jit(q.init)(jax.random.key(0), x), enabled=False)
  y = jax.jit(q.apply)(qv, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, jax.jit(f.apply)(fv, x))
