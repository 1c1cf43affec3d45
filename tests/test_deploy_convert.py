"""Converted variables: integer storage, int4 packing, the integer kernels, sizes, errors."""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax import (
  QArray,
  QConv,
  QConvBN,
  QDense,
  QuantConfig,
  compare_sizes,
  convert,
  model_size,
  pack_int4,
  qrange,
  unpack_int4,
)
from qatjax.core.int_kernels import int_matmul_nk


class Net(nn.Module):
  """Conv + ConvBN + dense: every converted layer kind."""

  cfg: QuantConfig

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(QConvBN(6, (3, 3), config=self.cfg)(x, use_running_average=not train))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(QConv(8, (3, 3), padding="VALID", config=self.cfg)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(17, config=self.cfg)(x))
    return QDense(5, config=self.cfg)(x)


def calibrated(model, x, **kw):
  v = jax.jit(functools.partial(model.init, **kw))(jax.random.key(1), x)
  apply = functools.partial(model.apply, mutable=["quant_stats", "batch_stats"], **kw)
  _, upd = jax.jit(apply)(v, x)
  return {**v, **upd}


CONFIGS = {
  "int8": QuantConfig(),
  "int4": QuantConfig(weight_bits=4),
  "int2": QuantConfig(weight_bits=2),
  "int3_lsq": QuantConfig(weight_bits=3, method="lsq"),
  "int6_tensor": QuantConfig(weight_bits=6, weight_granularity="per_tensor"),
  "int4_group": QuantConfig(weight_bits=4, weight_granularity="per_group", weight_group_size=4),
  "pact4": QuantConfig(act_bits=4, pact=True, pact_init=2.0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request):
  cfg = CONFIGS[request.param]
  model = Net(cfg)
  x = jax.random.normal(jax.random.key(0), (8, 12, 12, 1))
  v = calibrated(model, x, train=True)
  return cfg, model, v, convert(model, v, x), x


def qarrays(tree):
  return [
    leaf
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda a: isinstance(a, QArray))
    if isinstance(leaf, QArray)
  ]


def test_kernels_are_stored_as_integers_in_range(converted):
  cfg, _, _, qv, _ = converted
  qmin, qmax = cfg.weight_range
  kernels = qarrays(qv)
  assert len(kernels) == 4
  for qa in kernels:
    n = math.prod(qa.shape)
    if cfg.weight_bits <= 4:  # two values per byte (four at 2 bits), flat
      per_byte = 4 if cfg.weight_bits == 2 else 2
      assert qa.values.dtype == jnp.uint8 and qa.values.shape == (-(-n // per_byte),)
    else:
      assert qa.values.dtype == jnp.int8 and qa.values.size == n
    q = np.asarray(qa.unpack())
    assert q.dtype == np.int8 and q.shape == qa.shape
    assert q.min() >= qmin and q.max() <= qmax
    assert qmin >= qrange(cfg.weight_bits)[0] and qmax <= qrange(cfg.weight_bits)[1]
    assert qa.bits == cfg.weight_bits
  # dense kernels are stored (N, K) for the int8 matmul; logical shape unchanged
  dense = qv["params"]["QDense_0"]["kernel"]
  assert dense.perm == (1, 0) or dense.group_size is not None
  assert dense.shape == (8 * 4 * 4, 17) and dense.unpack().shape == dense.shape


def test_integer_inference_matches_fake_quant(converted):
  """Random inputs: the integer path computes the fake-quant model's values (float rounding only,
  plus rare one-step flips of an activation exactly on a rounding boundary)."""
  _, model, v, qv, x = converted
  x = jax.random.normal(jax.random.key(7), (64,) + x.shape[1:])
  y_fq, y_int = np.asarray(model.apply(v, x)), np.asarray(model.apply(qv, x))
  assert (y_fq.argmax(-1) == y_int.argmax(-1)).mean() >= 0.98
  close = np.abs(y_fq - y_int) <= 1e-5 * np.abs(y_fq).max() + 1e-6
  assert close.mean() >= 0.95, np.abs(y_fq - y_int).max()


def test_pact_layers_keep_their_input_quantizer():
  """Regression: convert used to drop PACT layers' input clip + quantization."""
  model = nn.Sequential(
    [
      QDense(16, config=QuantConfig(act_bits=4, pact=True, pact_init=0.5)),
      QDense(3, config=QuantConfig(act_bits=4, pact=True, pact_init=0.5)),
    ]
  )
  x = 3 * jax.random.normal(jax.random.key(0), (32, 6))
  v = model.init(jax.random.key(1), x)
  qv = convert(model, v, x)
  assert "input_scale" in qv["params"]["layers_0"]
  np.testing.assert_allclose(model.apply(qv, x), model.apply(v, x), atol=1e-5)


def test_convert_never_calibrated_names_the_layer():
  model = nn.Sequential([QDense(4, config=None), QDense(3, config=QuantConfig())])
  x = jnp.ones((2, 5))
  v = model.init(jax.random.key(0), x)  # no calibration pass
  with pytest.raises(ValueError, match="layers_1"):
    convert(model, v, x)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 33])
def test_int4_packing_round_trips(n):
  q = np.random.default_rng(n).integers(-8, 8, size=n).astype(np.int8)
  packed = pack_int4(jnp.asarray(q))
  assert packed.dtype == jnp.uint8 and packed.shape == ((n + 1) // 2,)
  np.testing.assert_array_equal(unpack_int4(packed, (n,)), q)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 9])
def test_int2_packing_is_four_values_per_byte(n):
  """Written out by hand: value i sits in bits 2 * (i % 4) of byte i // 4 (two's complement)."""
  q = np.random.default_rng(n).integers(-2, 2, size=n).astype(np.int8)
  want = np.zeros(-(-n // 4), np.uint8)
  for i, v in enumerate(q):
    want[i // 4] |= (int(v) & 3) << (2 * (i % 4))
  qa = QArray.create(jnp.asarray(q), jnp.float32(1.0), bits=2)
  np.testing.assert_array_equal(qa.values, want)
  np.testing.assert_array_equal(qa.unpack(), q)


@pytest.mark.parametrize(
  "shape,perm", [((3, 5), None), ((3, 5), (1, 0)), ((5, 7), (1, 0)), ((2, 3, 3), (2, 0, 1))]
)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qarray_storage_order_round_trips(shape, perm, bits):
  lo, hi = qrange(bits)
  q = np.random.default_rng(0).integers(lo, hi + 1, size=shape).astype(np.int8)
  qa = QArray.create(q, jnp.float32(0.5), bits=bits, perm=perm)
  np.testing.assert_array_equal(qa.unpack(), q)
  np.testing.assert_array_equal(qa.dequantize(), q * 0.5)
  if perm is not None:
    np.testing.assert_array_equal(qa.stored(), np.transpose(q, perm))
  assert qa.with_perm(None).unpack().tolist() == q.tolist()
  with pytest.raises(ValueError, match="perm"):
    QArray.create(q, 1.0, bits=bits, perm=(0,) * len(shape))


@pytest.mark.parametrize("k", [6, 7, 8])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_matmul_nk_is_bitwise_the_reference(k, bits):
  """The (N, K)-stored kernel path (incl. the field split of packed 2- and 4-bit weights, the
  row swap for few rows and the padded single row) gives numpy's int64 result exactly."""
  rng = np.random.default_rng(k)
  lo, hi = qrange(bits)
  q = rng.integers(lo, hi + 1, size=(k, 5)).astype(np.int8)
  zx = -17
  ksum = q.astype(np.int64).sum(0)
  for rows in [6, 1, 70]:  # 1 row: padded; <= 64 rows: (W @ x.T).T
    qx = rng.integers(-128, 128, size=(rows, k)).astype(np.int8)
    ref = qx.astype(np.int64) @ q.astype(np.int64) - zx * ksum
    qa = QArray.create(q, jnp.ones((1, 5)), bits=bits, perm=(1, 0))
    got = jax.jit(int_matmul_nk, static_argnums=(3, 4, 5))(
      jnp.asarray(qx), jnp.int32(zx), qa.values, 5, k, qa.bits, jnp.asarray(ksum, jnp.int32)
    )
    assert got.dtype == jnp.int32 and got.shape == (rows, 5)
    np.testing.assert_array_equal(got, ref)


def test_w2_kernel_takes_half_the_bytes_of_w4_with_the_same_integer_outputs():
  """Four 2-bit weights per byte: a W2 layer's kernel is half a W4 layer's. Its integer serving
  equals the same integers stored two per byte (the old layout) and numpy's reference."""
  x = jax.random.normal(jax.random.key(0), (8, 64))
  sizes, served = {}, {}
  for bits in (2, 4):
    layer = QDense(32, config=QuantConfig(weight_bits=bits))
    v = calibrated(layer, x)
    qv = convert(layer, v, x)
    sizes[bits] = model_size(qv)["<root>"]
    served[bits] = (layer, qv)
  assert (sizes[2].weight_bytes, sizes[4].weight_bytes) == (64 * 32 // 4, 64 * 32 // 2)
  assert (sizes[2].weight_bits, sizes[2].dtype) == (2, "int2")
  assert sizes[2].total - sizes[2].weight_bytes == sizes[4].total - sizes[4].weight_bytes
  layer, qv = served[2]
  qa = qv["params"]["kernel"]
  as_nibbles = QArray.create(qa.unpack(), qa.scale, bits=4, perm=qa.perm)
  assert as_nibbles.values.size == 2 * qa.values.size
  y = np.asarray(layer.apply(qv, x))
  y_nibbles = layer.apply({"params": {**qv["params"], "kernel": as_nibbles}}, x)
  np.testing.assert_array_equal(y, y_nibbles)
  p = {k: np.asarray(a, np.float64) for k, a in qv["params"].items() if k != "kernel"}
  q = np.asarray(qa.unpack(), np.float64)
  s, z = p["input_scale"], p["input_zero_point"]
  inv_s = np.float32(1.0) / np.float32(s)  # the kernel's float32 x * (1 / s)
  qx = np.clip(np.round(np.asarray(x, np.float32) * inv_s).astype(np.float64) + z, 0, 255)
  ref = ((qx - z) @ q) * s * np.asarray(qa.scale, np.float64) + p["bias"]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# --- model_size ----------------------------------------------------------------------------------


class MLP(nn.Module):
  sizes: tuple
  cfg: QuantConfig | None

  @nn.compact
  def __call__(self, x):
    for i, n in enumerate(self.sizes):
      x = QDense(n, config=self.cfg)(x)
      x = nn.relu(x) if i < len(self.sizes) - 1 else x
    return x


def expected_bytes(dims, bits):
  """Bytes from shapes: float32 kernel + bias, or the converted layout per layer."""
  total = 0
  for k, n in itertools.pairwise(dims):
    if bits is None:
      total += (k * n + n) * 4
    else:
      per_byte = 1 if bits > 4 else 2 if bits > 2 else 4
      kernel = -(-k * n // per_byte)
      # + per-channel scale, kernel_sum, bias (3 x n float32/int32), one scalar weight zero
      # point (symmetric weights), input s / z (float32) and input bits (int8)
      total += kernel + 3 * 4 * n + 4 + 2 * 4 + 1
  return total


@pytest.mark.parametrize("bits,goal", [(8, 0.26), (4, 0.14), (2, 0.08)])
def test_model_size_mnist_mlp(bits, goal):
  dims = (784, 512, 512, 10)
  x = jnp.zeros((2, 784))
  fv = jax.eval_shape(lambda: MLP(dims[1:], None).init(jax.random.key(0), x))
  model = MLP(dims[1:], QuantConfig(weight_bits=bits))
  qv = convert(model, calibrated(model, jax.random.normal(jax.random.key(0), (4, 784))), x)
  f, q = model_size(fv), model_size(qv)
  assert f.total == expected_bytes(dims, None) == 2_678_824
  assert q.total == expected_bytes(dims, bits)
  assert q["QDense_0"].weight_bytes == 784 * 512 * bits // 8
  # scale and kernel_sum per channel, one scalar weight zero point; input s / z, input bits
  assert q["QDense_0"].quant_bytes == 2 * 4 * 512 + 4 + 8 + 1
  assert q["QDense_0"].other_bytes == 4 * 512  # bias
  assert q.ratio(f) <= goal, q.ratio(f)
  table = f.compare(q)
  assert "QDense_0" in table and f"{100 * q.ratio(f):.1f}%" in table.splitlines()[-1]
  assert "total" in str(q) and str(q.total) in str(q)


def test_model_size_cnn_counts_every_leaf():
  model = Net(QuantConfig())
  x = jax.random.normal(jax.random.key(0), (4, 12, 12, 1))
  v = calibrated(model, x, train=True)
  qv = convert(model, v, x)
  float_vars = {"params": v["params"], "batch_stats": v["batch_stats"]}
  f, q = model_size(float_vars), model_size(qv)
  leaves = lambda t: sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(t))
  assert f.total == leaves(float_vars)
  # kernel 3*3*1*6 int8; scale, kernel_sum per channel, one scalar zp, folded bias; s/z/bits in
  conv_bn = q["QConvBN_0"]
  assert (conv_bn.weight_bytes, conv_bn.quant_bytes, conv_bn.other_bytes) == (
    54,
    2 * 24 + 4 + 9,
    24,
  )
  assert f["QConvBN_0"].total == 54 * 4 + 4 * 6 * 4  # kernel, bn scale/bias, mean/var
  assert q.total < f.total / 3
  assert "QConvBN_0" in compare_sizes(float_vars, qv, ("f32", "int8"))
  with pytest.raises(ValueError, match="collection"):
    model_size(qv, collections=["nope"])


def test_model_size_tells_mixed_precision_layers_apart():
  """8-, 4-, 2-bit, weight-only and float layers: bit widths and storage dtype per layer."""
  model = qatjax.quantize_model(
    nn.Sequential([nn.Dense(16), nn.Dense(16), nn.Dense(16), nn.Dense(16), nn.Dense(4)]),
    {
      "layers_0": QuantConfig(8, 8),
      "layers_1": QuantConfig(4, 4),
      "layers_2": QuantConfig(2, 2),
      "layers_3": QuantConfig(weight_bits=4, act_bits=None),
      "layers_4": None,
    },
  )
  x = jax.random.normal(jax.random.key(0), (4, 16))
  qv = convert(model, calibrated(model, x), x)
  report = model_size(qv)
  got = {lay.name: (lay.weight_bits, lay.act_bits, lay.dtype) for lay in report.layers}
  assert got == {
    "layers_0": (8, 8, "int8"),
    "layers_1": (4, 4, "int4"),
    "layers_2": (2, 2, "int2"),
    "layers_3": (4, None, "int4"),
    "layers_4": (None, None, "float32"),
  }
  rows = {line.split()[0]: line.split()[1:4] for line in report.table().splitlines()[2:-1]}
  assert rows == {
    "layers_0": ["8", "8", "int8"],
    "layers_1": ["4", "4", "int4"],
    "layers_2": ["2", "2", "int2"],
    "layers_3": ["4", "-", "int4"],
    "layers_4": ["-", "-", "float32"],
  }
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), qv["params"]["layers_4"])
  assert model_size({"params": {"layers_4": bf16}})["layers_4"].dtype == "bfloat16"


def _int32_conv(qx, qw, zx, ksum, pads, strides, lhs_dil, rhs_dil, groups):
  """The reference: XLA's int32 convolution of the input padded with its zero point, minus the
  zero-point correction; also the padded input."""
  from jax import lax

  cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dil)] + [(0, 0, 0)]
  padded = lax.pad(qx.astype(jnp.int32), zx, cfg)
  spec = {3: ("NWC", "WIO", "NWC"), 4: ("NHWC", "HWIO", "NHWC"), 5: ("NDHWC", "DHWIO", "NDHWC")}
  conv = lax.conv_general_dilated(
    padded,
    qw.astype(jnp.int32),
    strides,
    "VALID",
    rhs_dilation=rhs_dil,
    feature_group_count=groups,
    dimension_numbers=spec[qx.ndim],
  )
  return conv - zx * ksum, padded


@pytest.mark.parametrize(
  "cin,groups,strides,lhs_dil,rhs_dil",
  [
    (1, 1, (1, 1), (1, 1), (1, 1)),
    (3, 1, (2, 2), (1, 1), (2, 1)),
    (4, 4, (1, 1), (1, 1), (1, 1)),
    (2, 1, (1, 1), (2, 2), (1, 1)),
    (8, 1, (1, 1), (1, 1), (1, 1)),
  ],
)
def test_int_conv_few_channel_path_is_bitwise_int32(cin, groups, strides, lhs_dil, rhs_dil):
  """Few-channel convs run exactly in float32 on CPU: same integers as the int32 conv."""

  from qatjax.core.int_kernels import int_conv

  rng = np.random.default_rng(cin)
  qx = jnp.asarray(rng.integers(-128, 128, size=(2, 9, 8, cin)).astype(np.int8))
  qw = jnp.asarray(rng.integers(-128, 128, size=(3, 3, cin // groups, 8)).astype(np.int8))
  zx = jnp.int32(77)
  ksum = jnp.sum(qw.astype(jnp.int32), axis=(0, 1, 2))
  pads = [(1, 2), (0, 1)]
  got = jax.jit(
    lambda a: int_conv(
      a,
      zx,
      qw,
      ksum,
      strides=strides,
      pads=pads,
      lhs_dilation=lhs_dil,
      rhs_dilation=rhs_dil,
      feature_group_count=groups,
    )
  )(qx)
  ref, _ = _int32_conv(qx, qw, zx, ksum, pads, strides, lhs_dil, rhs_dil, groups)
  assert got.dtype == (jnp.float32 if cin // groups <= 4 else jnp.int32)
  np.testing.assert_array_equal(np.asarray(got).astype(np.int64), np.asarray(ref))


BF16_LAYERS = {
  "dense": (lambda dt: QDense(5, config=QuantConfig(), dtype=dt), (3, 8), None),
  "dense_general": (
    lambda dt: qatjax.QDenseGeneral((2, 3), config=QuantConfig(), dtype=dt),
    (3, 8),
    None,
  ),
  "conv": (lambda dt: qatjax.QConv(4, (3, 3), config=QuantConfig(), dtype=dt), (2, 6, 6, 3), None),
  "embed": (lambda dt: qatjax.QEmbed(10, 4, config=QuantConfig(), dtype=dt), (2, 3), "ids"),
  "embed_attend": (
    lambda dt: qatjax.QEmbed(10, 4, config=QuantConfig(), dtype=dt),
    (3, 4),
    "attend",
  ),
  "weight_only_dense": (lambda dt: QDense(5, config=QuantConfig(4, None), dtype=dt), (3, 8), None),
}


@pytest.mark.parametrize("name", sorted(BF16_LAYERS))
def test_integer_model_returns_the_layer_dtype(name):
  """A layer with ``dtype=bfloat16`` returns bfloat16 after ``convert`` as in QAT; its values are
  the float32 integer model's rounded to bfloat16; without ``dtype`` the output stays float32."""
  make, shape, kind = BF16_LAYERS[name]
  if kind == "ids":
    x = jax.random.randint(jax.random.key(0), shape, 0, 10)
  else:
    x = jax.random.normal(jax.random.key(0), shape)
  kw = {"method": "attend"} if kind == "attend" else {}
  outs = {}
  for dt in (jnp.bfloat16, None):
    layer = make(dt)
    v = layer.init(jax.random.key(1), x, **kw)
    _, stats = layer.apply(v, x, mutable=["quant_stats"], **kw)
    v = {**v, **stats}
    qat = layer.apply(v, x, **kw)
    qv = convert(layer, v, x, **kw)
    served = jax.jit(functools.partial(layer.apply, **kw))(qv, x)
    assert served.dtype == qat.dtype == (jnp.bfloat16 if dt else jnp.float32), (dt, served.dtype)
    outs[dt] = served
  want = np.asarray(outs[None].astype(jnp.bfloat16).astype(jnp.float32))
  got = np.asarray(outs[jnp.bfloat16].astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)  # bfloat16: 8 significant bits


@pytest.mark.parametrize(
  "groups,group_size,inner,zx_per_row",
  [(3, 32, 96, True), (40, 2, 79, False), (40, 2, 80, True)],
  ids=["3_groups_unrolled", "40_groups_short_last_dot", "40_groups_dot"],
)
def test_int_matmul_grouped_matches_numpy(groups, group_size, inner, zx_per_row):
  """``sum_g s_g * (qx_g . qw_g - zx * sum qw_g)`` against a numpy loop over groups, with two
  outer contracted positions, a short last group where ``inner`` is not a multiple of the group
  size, and both the group-by-group (few groups) and the dot (many groups) rescaling."""
  from qatjax.core.int_kernels import UNROLLED_GROUPS, int_matmul_grouped

  assert (groups <= UNROLLED_GROUPS) == (groups == 3)  # both branches are exercised
  rng = np.random.default_rng(groups + inner)
  m, n, outer = 5, 7, 2
  k = outer * inner
  qx = rng.integers(-128, 128, (1, m, k)).astype(np.int8)
  qw = rng.integers(-8, 8, (1, n, k)).astype(np.int8)
  scale = rng.uniform(0.01, 0.1, (1, n, groups)).astype(np.float32)
  zx = rng.integers(-5, 6, (1, m, 1)).astype(np.int32) if zx_per_row else np.int32(3)
  got = jax.jit(int_matmul_grouped, static_argnums=(4, 5))(qx, zx, qw, scale, group_size, inner)
  want = np.zeros((m, n), np.float64)
  x = qx[0].astype(np.int64).reshape(m, outer, inner)
  w = qw[0].astype(np.int64).reshape(n, outer, inner)
  z = np.broadcast_to(np.asarray(zx).reshape(-1, 1), (m, 1)).astype(np.int64)
  for g in range(groups):
    sl = slice(g * group_size, min((g + 1) * group_size, inner))
    dot = np.einsum("mok,nok->mn", x[:, :, sl], w[:, :, sl]) - z * w[:, :, sl].sum((1, 2))
    want += dot * scale[0, :, g].astype(np.float64)
  np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
  "spatial,cin,strides,lhs_dil,rhs_dil",
  [
    ((9, 8), 8, (1, 1), (1, 1), (1, 1)),
    ((9, 8), 16, (2, 2), (1, 1), (2, 1)),
    ((9, 8), 8, (1, 2), (2, 1), (1, 1)),
    ((11,), 6, (2,), (1,), (3,)),
    ((5, 6, 4), 5, (1, 2, 1), (1, 1, 1), (1, 1, 2)),
  ],
)
def test_int_conv_im2col_path_is_bitwise_int32(spatial, cin, strides, lhs_dil, rhs_dil):
  """Convs with more channels run as one int8 GEMM over their patches (im2col) on CPU: the
  same int32 sums as XLA's int32 convolution of the zero-point-padded input."""

  from qatjax.core import int_kernels

  nd = len(spatial)
  rng = np.random.default_rng(cin + nd)
  qx = jnp.asarray(rng.integers(-128, 128, size=(2, *spatial, cin)).astype(np.int8))
  qw = jnp.asarray(rng.integers(-128, 128, size=(*(3,) * nd, cin, 7)).astype(np.int8))
  zx = jnp.int32(-45)
  ksum = jnp.sum(qw.astype(jnp.int32), axis=tuple(range(nd + 1)))
  pads = [(1, 2), (0, 1), (2, 0)][:nd]
  kw = dict(strides=strides, pads=pads, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil)
  got = jax.jit(lambda a: int_kernels.int_conv(a, zx, qw, ksum, feature_group_count=1, **kw))(qx)
  ref, padded = _int32_conv(qx, qw, zx, ksum, pads, strides, lhs_dil, rhs_dil, 1)
  assert int_kernels._im2col_pays(padded.shape, qw.shape, strides, rhs_dil, 1)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
