"""One process of the two-process QAT job of ``test_training_distributed.py``.

Run as ``python distributed_worker.py PROCESS_ID PORT OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: it joins the job on ``127.0.0.1:PORT``,
trains over a ``data`` mesh of the job's 4 CPU devices feeding its own half of every global batch,
writes a checkpoint collectively to ``OUT_DIR/ckpt`` and its own copy of the state and the losses
to ``OUT_DIR/process<ID>.npz``. The model, data and schedule are shared with the test's
one-process reference run.
"""

import sys

import flax.linen as nn
import jax
import numpy as np
import optax

from qatjax import QConvBN, QDense, QuantConfig
from qatjax.training import QATSchedule, create_train_state, make_optimizer, make_train_step

GLOBAL_BATCH, STEPS = 16, 4


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(QConvBN(4, (3, 3), config=QuantConfig())(x, use_running_average=not train))
    x = nn.relu(QDense(16, config=QuantConfig(act_calibration="minmax"))(x.reshape(x.shape[0], -1)))
    return QDense(3, config=QuantConfig(method="lsq"))(x)


def global_batches():
  rng = np.random.default_rng(0)
  return [
    (
      rng.normal(size=(GLOBAL_BATCH, 5, 5, 1)).astype(np.float32) * (1 + i),
      rng.integers(0, 3, GLOBAL_BATCH).astype(np.int32),
    )
    for i in range(STEPS)
  ]


def initial_state():
  tx = make_optimizer(optax.sgd(0.05, momentum=0.9), optax.sgd(0.01))
  return create_train_state(Net(), tx, jax.random.key(0), global_batches()[0][0][:1])


def train_step(mesh=None):
  schedule = QATSchedule(float_steps=1, freeze_observers_step=3)
  return make_train_step(schedule=schedule, apply_kwargs={"train": True}, mesh=mesh)


def flat(state) -> dict[str, np.ndarray]:
  """``{path: this process's copy}`` of every leaf (one addressable shard of a replicated one)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    shard = leaf.addressable_shards[0].data if isinstance(leaf, jax.Array) else leaf
    out[jax.tree_util.keystr(path)] = np.asarray(shard)
  return out


def main(process_id: int, port: str, out_dir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  from qatjax.training import data_mesh, save_checkpoint

  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  mesh = data_mesh()
  step = train_step(mesh)
  state, losses = initial_state(), []
  half = slice(process_id * GLOBAL_BATCH // 2, (process_id + 1) * GLOBAL_BATCH // 2)
  for x, y in global_batches():
    state, metrics = step(state, (x[half], y[half]))  # this process's half of the global batch
    losses.append(float(metrics["loss"].addressable_shards[0].data))
  assert step.jitted._cache_size() == 1
  for leaf in jax.tree_util.tree_leaves(state):  # one array spanning both processes
    assert not leaf.is_fully_addressable and leaf.sharding.is_fully_replicated
  save_checkpoint(f"{out_dir}/ckpt", state)
  np.savez(f"{out_dir}/process{process_id}.npz", losses=np.asarray(losses), **flat(state))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
