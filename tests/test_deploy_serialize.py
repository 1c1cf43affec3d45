"""save_quantized / load_quantized: exact round trips and clear errors on bad files."""

import functools
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qatjax import QAct, QArray, QConvBN, QDense, QuantConfig, convert
from qatjax.model.serialize import MAGIC, load_quantized, save_quantized


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(QConvBN(4, (3, 3), config=QuantConfig(weight_bits=4))(x, use_running_average=True))
    x = QAct(QuantConfig(weight_bits=None, act_bits=8))(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(
      QDense(
        9, config=QuantConfig(weight_bits=4, weight_granularity="per_group", weight_group_size=16)
      )(x)
    )
    x = QDense(7, config=QuantConfig(weight_bits=8))(x)
    return QDense(3, config=QuantConfig(weight_bits=3, method="lsq"))(x)


@pytest.fixture(scope="module")
def model_and_vars():
  model = Net()
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  v = jax.jit(model.init)(jax.random.key(1), x)
  _, stats = jax.jit(functools.partial(model.apply, mutable=["quant_stats"]))(v, x)
  qv = convert(model, {**v, **stats}, x)
  return model, qv, x


def assert_trees_identical(a, b):
  is_q = lambda t: isinstance(t, QArray)
  la, ta = jax.tree_util.tree_flatten(a, is_leaf=is_q)
  lb, tb = jax.tree_util.tree_flatten(b, is_leaf=is_q)
  assert ta == tb
  for x, y in zip(la, lb):
    if isinstance(x, QArray):
      assert isinstance(y, QArray)
      assert (x.shape, x.bits, x.axis, x.group_size, x.perm) == (
        y.shape,
        y.bits,
        y.axis,
        y.group_size,
        y.perm,
      )
      pairs = [(x.values, y.values), (x.scale, y.scale), (x.zero_point, y.zero_point)]
    else:
      pairs = [(x, y)]
    for p, q in pairs:
      p, q = np.asarray(p), np.asarray(q)
      assert p.dtype == q.dtype and p.shape == q.shape
      assert p.tobytes() == q.tobytes()  # bitwise


def test_round_trip_is_exact_and_runs(model_and_vars, tmp_path):
  model, qv, x = model_and_vars
  path = tmp_path / "model.qjx"
  save_quantized(path, qv)
  back = load_quantized(path)
  assert_trees_identical(qv, back)
  kernels = {k: back["params"][k]["kernel"] for k in ("QDense_0", "QDense_1", "QDense_2")}
  assert kernels["QDense_0"].group_size == 16 and kernels["QDense_1"].perm == (1, 0)
  assert back["params"]["QConvBN_0"]["kernel"].values.dtype == jnp.uint8
  assert back["quant_stats"]["QAct_0"]["enabled"].dtype == jnp.bool_
  np.testing.assert_array_equal(jax.jit(model.apply)(back, x), jax.jit(model.apply)(qv, x))
  assert not os.path.exists(str(path) + ".tmp")
  # saving the loaded tree gives the same bytes
  save_quantized(tmp_path / "again.qjx", back)
  assert (tmp_path / "again.qjx").read_bytes() == path.read_bytes()


def test_round_trip_float_and_odd_leaves(tmp_path):
  tree = {
    "params": {
      "w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
      "empty": {},
      "s": np.float32(2.5),
      "i": np.arange(3, dtype=np.int64),
    },
    "other": {},
  }
  save_quantized(tmp_path / "t.qjx", tree)
  back = load_quantized(tmp_path / "t.qjx")
  assert back["params"]["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(back["params"]["w"], tree["params"]["w"])
  assert back["params"]["empty"] == {} and back["other"] == {}
  assert back["params"]["s"].shape == () and float(back["params"]["s"]) == 2.5
  assert back["params"]["i"].dtype == np.int64  # kept exact (numpy) without x64


@pytest.fixture
def saved(model_and_vars, tmp_path):
  path = tmp_path / "m.qjx"
  save_quantized(path, model_and_vars[1])
  return path


@pytest.mark.parametrize("cut", [0, 5, 19, 40, -1, -100])
def test_truncated_file_is_a_clear_error(saved, cut):
  blob = saved.read_bytes()
  bad = saved.parent / "cut.qjx"
  bad.write_bytes(blob[:cut] if cut >= 0 else blob[: len(blob) + cut])
  with pytest.raises(ValueError, match=r"cut.qjx") as e:
    load_quantized(bad)
  assert any(w in str(e.value) for w in ("truncated", "shorter", "not a qatjax"))


def test_foreign_files_are_clear_errors(saved, tmp_path):
  npy = tmp_path / "x.npy"
  np.save(npy, np.zeros(10))
  with pytest.raises(ValueError, match=r"x\.npy is not a qatjax quantized-variables file"):
    load_quantized(npy)
  with pytest.raises(ValueError, match=r"not found.*missing"):
    load_quantized(tmp_path / "missing")
  blob = bytearray(saved.read_bytes())
  newer = tmp_path / "newer.qjx"
  newer.write_bytes(bytes(blob[:8]) + struct.pack("<I", 99) + bytes(blob[12:]))
  with pytest.raises(ValueError, match=r"newer.qjx has format version 99"):
    load_quantized(newer)
  blob[-3] ^= 0xFF
  corrupt = tmp_path / "corrupt.qjx"
  corrupt.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=r"corrupt.qjx is corrupt"):
    load_quantized(corrupt)
  garbage = tmp_path / "garbage.qjx"
  garbage.write_bytes(MAGIC + struct.pack("<IQ", 1, 5) + b"{nope")
  with pytest.raises(ValueError, match=r"garbage.qjx.*header"):
    load_quantized(garbage)


def test_save_rejects_unsupported_leaves(tmp_path):
  with pytest.raises(ValueError, match="params/f"):
    save_quantized(tmp_path / "x.qjx", {"params": {"f": "a string"}})
  with pytest.raises(ValueError, match="not a string"):
    save_quantized(tmp_path / "x.qjx", {"params": {1: jnp.ones(2)}})
  assert not (tmp_path / "x.qjx").exists()


def _version(path):
  return struct.unpack_from("<I", path.read_bytes(), 8)[0]


def test_two_bit_kernels_round_trip_as_version_2_and_others_stay_version_1(tmp_path):
  q = np.random.default_rng(0).integers(-2, 2, size=(5, 7)).astype(np.int8)
  w2 = QArray.create(jnp.asarray(q), jnp.full((1, 7), 0.5), bits=2, perm=(1, 0))
  save_quantized(tmp_path / "w2.qjx", {"params": {"kernel": w2}})
  back = load_quantized(tmp_path / "w2.qjx")["params"]["kernel"]
  assert _version(tmp_path / "w2.qjx") == 2  # older readers say "upgrade" instead of misreading
  assert back.values.size == -(-q.size // 4)
  np.testing.assert_array_equal(back.unpack(), q)
  w4 = QArray.create(jnp.asarray(q), jnp.float32(0.5), bits=4)
  save_quantized(tmp_path / "w4.qjx", {"params": {"kernel": w4}})
  assert _version(tmp_path / "w4.qjx") == 1  # what version-1 readers read


def test_version_1_files_with_two_bit_kernels_still_load(tmp_path):
  """Version 1 stored 2-bit values two per byte: such a file (its header and nibble data, as the
  old writer wrote them) loads with the values repacked four per byte."""
  q = np.random.default_rng(1).integers(-2, 2, size=(3, 5)).astype(np.int8)
  nibbles = np.zeros(-(-q.size // 2), np.uint8)  # the old layout, written out by hand
  for i, v in enumerate(q.reshape(-1)):
    nibbles[i // 2] |= (int(v) & 0xF) << (4 * (i % 2))
  old = QArray(jnp.asarray(nibbles), jnp.float32(0.5), jnp.float32(0.0), q.shape, 2)
  path = tmp_path / "v1.qjx"
  save_quantized(path, {"params": {"kernel": old, "bias": jnp.ones(5)}})
  blob = path.read_bytes()
  path.write_bytes(blob[:8] + struct.pack("<I", 1) + blob[12:])  # the old writer's version
  back = load_quantized(path)["params"]
  np.testing.assert_array_equal(back["kernel"].unpack(), q)
  assert back["kernel"].values.size == -(-q.size // 4)
  np.testing.assert_array_equal(back["bias"], np.ones(5))
