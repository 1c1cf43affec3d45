"""qatjax.training: orbax checkpoints of the whole train state; exact resume; bad input."""

import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from helpers import assert_bitwise

from qatjax import QConvBN, QDense, QuantConfig
from qatjax.training import (
  create_train_state,
  fit,
  make_optimizer,
  make_train_step,
  restore_checkpoint,
  save_checkpoint,
)


class Net(nn.Module):
  features: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(QConvBN(4, (3, 3), config=QuantConfig())(x, use_running_average=not train))
    return QDense(self.features, config=QuantConfig(method="lsq"))(x.reshape(x.shape[0], -1))


RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 5, 5, 1)).astype(np.float32)
Y = RNG.integers(0, 3, 32).astype(np.int32)
TX = make_optimizer(optax.adamw(1e-2, weight_decay=1e-3), optax.adam(1e-3))
STEP = make_train_step(apply_kwargs={"train": True})


def fresh(seed=0, model=None):
  return create_train_state(model or Net(), TX, jax.random.key(seed), X[:1])


def train(state, steps):
  for _ in range(steps):
    j = int(state.step) % 4
    state, _ = STEP(state, (X[8 * j : 8 * j + 8], Y[8 * j : 8 * j + 8]))
  return state


def listing(d):
  return sorted(
    (root, tuple(sorted(files)), os.path.getmtime(root)) for root, _, files in os.walk(d)
  )


def test_round_trip_bitwise_and_resume(tmp_path):
  s3 = train(fresh(), 3)
  assert s3.batch_stats and s3.quant_stats and "kernel_scale" in s3.params["QDense_0"]
  path = save_checkpoint(tmp_path / "ckpt", s3)
  assert path.endswith(os.path.join("ckpt", "3"))
  restored = restore_checkpoint(tmp_path / "ckpt", fresh(seed=1))  # other init values
  assert_bitwise(restored, s3)
  assert restored.apply_fn == s3.apply_fn and int(restored.step) == 3
  # resuming continues exactly as the uninterrupted run
  assert_bitwise(train(restored, 3), train(s3, 3))
  # several steps: the latest by default, or the one asked for
  save_checkpoint(tmp_path / "ckpt", train(s3, 1))
  assert int(restore_checkpoint(tmp_path / "ckpt", s3).step) == 4
  assert_bitwise(restore_checkpoint(tmp_path / "ckpt", s3, step=3), s3)


def test_fit_resume_matches_uninterrupted(tmp_path):
  kw = dict(batch_size=8, train_step=STEP, rng=jax.random.key(3), progress=False)
  full, hist = fit(fresh(), (X, Y), epochs=2, **kw)
  half, _ = fit(fresh(), (X, Y), epochs=1, **kw)
  save_checkpoint(tmp_path, half)
  resumed, hist2 = fit(restore_checkpoint(tmp_path, fresh()), (X, Y), epochs=1, **kw)
  assert_bitwise(resumed, full)
  assert hist2[0]["epoch"] == 2 and hist2[0]["train_loss"] == hist[1]["train_loss"]


def test_bad_directories_raise_and_write_nothing(tmp_path):
  state = fresh()
  missing = tmp_path / "nope"
  with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
    restore_checkpoint(missing, state)
  assert not missing.exists()

  save_checkpoint(tmp_path / "a", state)
  before = listing(tmp_path)
  other = fresh(model=Net(features=5))  # another model's tree
  with pytest.raises(
    ValueError,
    match=r"/a holds a different.*params/QDense_0/bias has shape "
    r"\(3,\) in checkpoint step 0 but \(5,\) in the target",
  ):
    restore_checkpoint(tmp_path / "a", other)
  with pytest.raises(ValueError, match="params/QDense_0/bias"):
    save_checkpoint(tmp_path / "a", other.replace(step=other.step + 1))
  float_state = create_train_state(nn.Dense(3), TX, 0, X[:1].reshape(1, -1))
  with pytest.raises(ValueError, match=r"different state tree.*params/bias is missing"):
    restore_checkpoint(tmp_path / "a", float_state)
  with pytest.raises(ValueError, match="already holds step 0"):
    save_checkpoint(tmp_path / "a", state)
  with pytest.raises(ValueError, match=r"no step 7 \(it has \[0\]\)"):
    restore_checkpoint(tmp_path / "a", state, step=7)
  with pytest.raises(ValueError, match="holds no checkpoint"):
    restore_checkpoint(tmp_path, state)
  assert listing(tmp_path) == before
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    save_checkpoint(tmp_path / "f", state)
