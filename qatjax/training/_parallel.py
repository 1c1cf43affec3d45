"""Data-parallel training with ``jax.sharding``: a mesh over the batch axis.

The train state is replicated on every device of the mesh and each batch is sharded along its
first axis (``PartitionSpec("data")``). The train step is one ``jax.jit`` program over the global
batch, so everything that reduces over the batch (the loss mean, and therefore the gradients; the
observers' ``jnp.min`` / ``jnp.max`` / EMA of activation ranges; BatchNorm batch statistics) is
reduced across devices by XLA: every replica ends each step with the same parameters, the same
observer statistics and hence the same quantization scales, with no explicit ``psum``.

Single host::

    mesh = data_mesh()                                   # all local devices, axis "data"
    step = make_train_step(mesh=mesh)                    # replicates the state, shards batches
    state, metrics = step(state, (x, y))                 # len(x) divisible by mesh.size

Multi-host (the same script on every host)::

    jax.distributed.initialize()                         # before any other JAX call
    mesh = data_mesh()                                   # jax.devices(): devices of all hosts
    state = replicate(mesh, create_train_state(...))     # same seed => same values everywhere
    step = make_train_step(mesh=mesh)
    for x_local, y_local in my_shard_of_the_data:        # this host's part of the global batch
      state, metrics = step(state, (x_local, y_local))

With several processes :func:`shard_batch` builds each global batch from the process-local
arrays with ``jax.make_array_from_process_local_data`` (so each host's batch size must be
divisible by its number of local devices, and the global batch is the concatenation over hosts
in process order). Checkpoints (:func:`save_checkpoint`) are written collectively by orbax; call
them on every host.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A one-dimensional mesh with axis ``"data"`` over ``devices`` (default: all devices).

  Example:
    >>> from qatjax.training import data_mesh
    >>> data_mesh(jax.devices()[:1]).axis_names
    ('data',)
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device, got an empty list")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def _check_mesh(mesh):
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}")


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that puts a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding that splits axis 0 over all axes of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicate(mesh: Mesh, tree):
  """``tree`` (e.g. a :class:`TrainState`) copied to every device of ``mesh``.

  With several processes each must pass the same values (same seed / same checkpoint); the
  global arrays are built with ``jax.make_array_from_process_local_data``.

  Example:
    >>> from qatjax.training import data_mesh, replicate
    >>> r = replicate(data_mesh(), {"w": jnp.ones(3)})
    >>> r["w"].sharding.is_fully_replicated
    True
  """
  _check_mesh(mesh)
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):  # several processes: every host passes the same (host-local) values
    if isinstance(x, jax.Array) and (x.sharding == sharding or not x.is_fully_addressable):
      return x if x.sharding == sharding else jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


def _local_device_count(mesh: Mesh) -> int:
  me = jax.process_index()
  return sum(1 for d in mesh.devices.flat if d.process_index == me)


def shard_batch(mesh: Mesh, batch):
  """``batch`` (a pytree of arrays) sharded along axis 0 over the devices of ``mesh``.

  With one process the arrays hold the global batch; with several, each process passes its
  own part and the global batch is assembled with ``jax.make_array_from_process_local_data``.
  Arrays that already have this sharding are passed through.

  Raises:
    ValueError: a leaf whose leading dimension is not divisible by the number of devices.

  Example:
    >>> from qatjax.training import data_mesh, shard_batch
    >>> xs, ys = shard_batch(data_mesh(), (jnp.ones((8, 3)), jnp.zeros(8, jnp.int32)))
    >>> xs.shape
    (8, 3)
  """
  _check_mesh(mesh)
  sharding = batch_sharding(mesh)
  multi = jax.process_count() > 1
  n_dev = _local_device_count(mesh) if multi else mesh.size
  where = "local devices of this process" if multi else "devices of the mesh"

  def put(path, x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    shape = np.shape(x)
    name = "batch" + jax.tree_util.keystr(path)
    if not shape or shape[0] % n_dev:
      raise ValueError(
        f"{name} has shape {shape}: its batch size (axis 0) must be divisible by "
        f"the {n_dev} {where} {mesh.axis_names}"
      )
    if multi:
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(put, batch)
