"""The ``fit`` run that ``test_training_kill_resume.py`` kills and resumes.

``python fit_worker.py CKPT_DIR [pause-after-step|pause-at-commit K MARKER]`` trains a small QAT
model (QConvBN, dropout, LSQ dense) for 3 epochs of 4 steps with a checkpoint every 3 steps in
CKPT_DIR, resuming from the latest complete one. With a pause it creates MARKER and then waits
(to be killed) right after step K, or at the moment orbax commits checkpoint K (its rename of
``K.orbax-checkpoint-tmp`` to ``K``, seen through a Python audit hook): the kill lands at a known
point without any timing race.
"""

import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from qatjax import QConvBN, QDense, QuantConfig
from qatjax.training import QATSchedule, create_train_state, fit, make_optimizer, make_train_step

EPOCHS, BATCH, EVERY = 3, 8, 3


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(QConvBN(4, (3, 3), config=QuantConfig())(x, use_running_average=not train))
    x = nn.Dropout(0.3, deterministic=not train)(x.reshape(x.shape[0], -1))
    return QDense(3, config=QuantConfig(method="lsq"))(x)


def data():
  rng = np.random.default_rng(0)
  return rng.normal(size=(36, 5, 5, 1)).astype(np.float32), rng.integers(0, 3, 36).astype(np.int32)


def initial_state():
  tx = make_optimizer(optax.adamw(1e-2, weight_decay=1e-3), optax.adam(1e-3))
  return create_train_state(Net(), tx, jax.random.key(0), data()[0][:1])


def train_step():
  return make_train_step(
    schedule=QATSchedule(float_steps=2, freeze_observers_step=7),
    apply_kwargs={"train": True},
    rng=jax.random.key(5),
  )


def wait_to_be_killed(marker):
  with open(marker, "w") as f:
    f.write("paused")
  while True:
    time.sleep(1)


class PauseAfter:
  """``step`` that waits to be killed once the state reaches step ``k``."""

  def __init__(self, step, k, marker):
    self.step, self.k, self.marker = step, k, marker

  def shard_state(self, state):
    return self.step.shard_state(state)

  def __call__(self, state, batch):
    state, metrics = self.step(state, batch)
    if int(state.step) == self.k:
      wait_to_be_killed(self.marker)
    return state, metrics


def pause_at_commit(k, marker):
  tmp_name = f"{k}.orbax-checkpoint-tmp"

  def hook(event, args):
    if event == "os.rename" and os.path.basename(os.fspath(args[0])) == tmp_name:
      wait_to_be_killed(marker)

  sys.addaudithook(hook)


def main(ckpt_dir, pause=None, k=None, marker=None):
  step = train_step()
  if pause == "pause-after-step":
    step = PauseAfter(step, int(k), marker)
  elif pause == "pause-at-commit":
    pause_at_commit(int(k), marker)
  fit(
    initial_state(),
    data(),
    epochs=EPOCHS,
    batch_size=BATCH,
    train_step=step,
    rng=jax.random.key(3),
    progress=False,
    checkpoint_dir=ckpt_dir,
    checkpoint_every=EVERY,
  )


if __name__ == "__main__":
  main(*sys.argv[1:])
