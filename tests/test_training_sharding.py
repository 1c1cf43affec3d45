"""qatjax.training: parameter sharding rules (which spec each parameter and its quantizer state
get, checked on an abstract 4 x 2 mesh), their errors, and fit's checkpoint options."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from qatjax import QConv, QDense, QEmbed, QuantConfig
from qatjax.training import (
  create_train_state,
  data_mesh,
  data_model_mesh,
  fit,
  make_train_step,
  restore_checkpoint,
  sharding_rules,
)
from qatjax.training._sharding import state_shardings

MESH = AbstractMesh((4, 2), ("data", "model"))
LSQ = QuantConfig(method="lsq")


def init(layer, x):
  return layer.init(jax.random.key(0), x)["params"]


PARAMS = {
  "dense": init(QDense(8, config=LSQ), jnp.ones((1, 3))),  # kernel (3, 8), scale (8,)
  "fsdp": init(QDense(6, config=LSQ), jnp.ones((1, 8))),  # kernel (8, 6)
  "conv": init(QConv(8, (3, 3), config=LSQ), jnp.ones((1, 5, 5, 1))),  # kernel (3, 3, 1, 8)
  "group": init(  # kernel (16, 8): 4 groups of 4 inputs, scale (4, 8)
    QDense(
      8, config=QuantConfig(method="lsq", weight_granularity="per_group", weight_group_size=4)
    ),
    jnp.ones((1, 16)),
  ),
  "group3": init(  # kernel (12, 8): 3 groups, scale (3, 8)
    QDense(
      8, config=QuantConfig(method="lsq", weight_granularity="per_group", weight_group_size=4)
    ),
    jnp.ones((1, 12)),
  ),
  "tensor": init(
    QDense(8, config=QuantConfig(method="lsq", weight_granularity="per_tensor")), jnp.ones((1, 3))
  ),
  "rows": init(QEmbed(10, 4, config=LSQ), jnp.zeros((2,), jnp.int32)),  # table (10, 4), scale (10,)
  "cols": init(QEmbed(10, 4, config=LSQ), jnp.zeros((2,), jnp.int32)),
}
RULES = {
  "dense/kernel": P(None, "model"),
  "fsdp/kernel": P("data", None),
  "conv/kernel": P(None, None, None, "model"),
  "group.*/kernel": P("model", None),
  "tensor/kernel": P(None, "model"),
  "rows/embedding": P("model", None),
  "cols/embedding": P(None, "model"),
}


def test_quantizer_state_follows_its_weight():
  assert PARAMS["group"]["kernel_scale"].shape == (4, 8)
  specs = sharding_rules(RULES).param_specs(MESH, PARAMS)
  want = {
    "dense/kernel": P(None, "model"),
    "dense/kernel_scale": P("model"),  # per output channel: split as the output axis
    "fsdp/kernel": P("data"),
    "fsdp/kernel_scale": P(),  # the kernel is split on its contracted axis: channels whole
    "conv/kernel": P(None, None, None, "model"),
    "conv/kernel_scale": P("model"),
    "group/kernel": P("model"),
    "group/kernel_scale": P("model"),  # 8 rows per device: two whole groups each
    "group3/kernel": P("model"),
    "group3/kernel_scale": P(),  # 6 rows per device: groups would straddle devices
    "tensor/kernel": P(None, "model"),
    "tensor/kernel_scale": P(),  # one scale
    "rows/embedding": P("model"),
    "rows/embedding_scale": P("model"),  # one scale per row
    "cols/embedding": P(None, "model"),
    "cols/embedding_scale": P(),
  }
  for path, spec in want.items():
    assert specs[path] == spec, (path, specs[path])
  for path, spec in specs.items():  # biases and activation quantizer parameters: replicated
    if path not in want:
      assert spec == P(), path


def test_optimizer_state_follows_parameters():
  params = {"dense": PARAMS["dense"]}
  state = create_train_state(QDense(8, config=LSQ), optax.adam(1e-3), 0, jnp.ones((1, 3)))
  state = state.replace(params=params, opt_state=state.tx.init(params))
  sh = state_shardings(MESH, state, sharding_rules({"dense/kernel": P(None, "model")}))
  adam = sh.opt_state[0]
  for moments in (adam.mu, adam.nu):
    assert moments["dense"]["kernel"].spec == P(None, "model")
    assert moments["dense"]["kernel_scale"].spec == P("model")
    assert moments["dense"]["bias"].spec == P()
  assert adam.count.spec == P() and sh.step.spec == P()


@pytest.mark.parametrize(
  "rules, message",
  [
    (
      {".*kernel": P(None, "tensor")},
      r"'\.\*kernel' .* names mesh axis 'tensor'.*\('data', 'model'\)",
    ),
    ({"dense/kernel_scale": P("model")}, r"'dense/kernel_scale' matches no parameter"),
    ({"Dense_0/kernel": P(None, "model")}, r"'Dense_0/kernel' matches no parameter"),
    ({"dense/bias": P(None, "model")}, r"params/dense/bias has shape \(8,\), fewer axes"),
    (
      {"conv/kernel": P("model")},
      r"params/conv/kernel has shape \(3, 3, 1, 8\): axis 0 \(3\) is not divisible by the 2",
    ),
  ],
)
def test_bad_rules_name_the_rule_path_and_axis(rules, message):
  with pytest.raises(ValueError, match=message):
    sharding_rules(rules).param_specs(MESH, PARAMS)


def test_rules_are_checked_when_made():
  with pytest.raises(ValueError, match="does not compile"):
    sharding_rules({"(": P()})
  with pytest.raises(ValueError, match=r"must map to a jax\.sharding\.PartitionSpec"):
    sharding_rules({"x": ("model",)})
  with pytest.raises(ValueError, match="expects a mapping"):
    sharding_rules([("x", P())])
  with pytest.raises(ValueError, match="must be regex strings"):
    sharding_rules({1: P()})


def test_steps_check_rules_before_running():
  x, y = np.ones((4, 3), np.float32), np.zeros(4, np.int32)
  state = create_train_state(QDense(2, config=LSQ), optax.sgd(0.1), 0, x[:1])
  with pytest.raises(ValueError, match="param_sharding needs a mesh"):
    make_train_step(param_sharding={"kernel": P(None, "model")})
  with pytest.raises(
    ValueError, match=r"names mesh axis 'model', but the mesh has axes \('data',\)"
  ):
    make_train_step(mesh=data_mesh(), param_sharding={"kernel": P(None, "model")})
  step = make_train_step(mesh=data_model_mesh(1, jax.devices()[:1]), param_sharding={"k": P()})
  with pytest.raises(ValueError, match="'k' matches no parameter"):
    step(state, (x, y))
  assert step.jitted._cache_size() == 0
  for bad in (0, 2, True):
    with pytest.raises(ValueError, match="positive int dividing the 1 devices"):
      data_model_mesh(bad, jax.devices()[:1])


X = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32)


def fresh():
  return create_train_state(QDense(2, config=QuantConfig()), optax.adam(1e-2), 0, X[:1])


def run(state, directory, **kw):
  kw = dict(epochs=1, batch_size=4, train_step=make_train_step(), rng=1, progress=False) | kw
  return fit(state, (X, Y), checkpoint_dir=directory, **kw)


def test_fit_checkpoint_options_fail_before_writing(tmp_path):
  d = tmp_path / "ckpt"
  with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_dir"):
    run(fresh(), None, checkpoint_every=2)
  with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
    run(fresh(), d, checkpoint_every=0)
  with pytest.raises(ValueError, match=r"needs train_data as \(x, y\) arrays"):
    fit(
      fresh(),
      [(X[:4], Y[:4])],
      epochs=1,
      batch_size=4,
      train_step=make_train_step(),
      rng=1,
      progress=False,
      checkpoint_dir=d,
    )
  assert not d.exists()
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    run(fresh(), tmp_path / "file")


def test_fit_checkpoints_resume_and_interrupted_writes(tmp_path):
  d = tmp_path / "ckpt"
  os.makedirs(d / "2.orbax-checkpoint-tmp")  # what a write killed before its commit leaves
  with pytest.raises(
    ValueError, match=r"holds no checkpoint \(only interrupted writes: .*2\.orbax"
  ):
    restore_checkpoint(d, fresh())
  with pytest.warns(
    UserWarning, match=r"incomplete checkpoint .*2\.orbax-checkpoint-tmp.*starting"
  ):
    state, hist = run(fresh(), d, epochs=2, checkpoint_every=3)
  assert int(state.step) == 8 and [h["epoch"] for h in hist] == [1, 2]
  assert sorted(os.listdir(d), key=int) == ["3", "6", "8"]  # every 3 steps and the last one
  # the same call again finds the finished run
  again, hist = run(fresh(), d, epochs=2, checkpoint_every=3)
  assert hist == [] and int(again.step) == 8
  assert all(np.array_equal(a, b) for a, b in zip(*map(jax.tree_util.tree_leaves, (again, state))))
  # a shorter run cannot resume from a checkpoint past its end
  with pytest.raises(ValueError, match=r"holds step 8, past the end of this run \(step 4"):
    run(fresh(), d)
