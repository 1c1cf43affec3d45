"""Data-parallel training with ``jax.sharding``: a mesh over the batch axis.

The train state is replicated on every device of the mesh (unless sharding rules split its
parameters over a ``("data", "model")`` mesh, see ``_sharding.py``) and each batch is sharded
along its first axis over every mesh axis but ``"model"`` (``PartitionSpec("data")``).
The train step is one ``jax.jit`` program over the global batch, so everything that reduces over
the batch (the loss mean, and therefore the gradients; the observers' ``jnp.min`` / ``jnp.max``
/ EMA of activation ranges; BatchNorm batch statistics) is reduced across devices by XLA: every
replica ends each step with the same parameters, the same observer statistics and hence the same
quantization scales, with no explicit ``psum``.

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
divisible by the number of batch parts its devices hold, and the global batch is the
concatenation over hosts in process order). On CPU the processes talk through JAX's gloo
collectives (``jax_cpu_collectives_implementation``, the default in jax 0.10);
``tests/distributed_worker.py`` is a complete two-process job.
Checkpoints (:func:`save_checkpoint`) are written collectively by orbax; call them on every host.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"


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


def data_model_mesh(model: int, devices=None) -> Mesh:
  """A two-dimensional mesh ``("data", "model")`` of shape ``(len(devices) // model, model)``.

  Batches are split over ``"data"``; parameters are split by the rules given to
  :func:`make_train_step` (``param_sharding``), e.g. kernels over ``"model"`` (tensor parallel)
  or over ``"data"`` (FSDP). Consecutive devices (those of one host first) form a ``"model"``
  group.

  Args:
    model: devices along ``"model"``; must divide the number of devices.
    devices: default all devices (``jax.devices()``: all hosts).

  Raises:
    ValueError: ``model`` is not a positive divisor of the device count.

  Example:
    >>> from qatjax.training import data_model_mesh
    >>> dict(data_model_mesh(1, jax.devices()[:1]).shape)
    {'data': 1, 'model': 1}
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if isinstance(model, bool) or not isinstance(model, int) or model < 1 or n % model:
    raise ValueError(f"model must be a positive int dividing the {n} devices, got {model!r}")
  return Mesh(np.asarray(devices).reshape(n // model, model), (DATA_AXIS, MODEL_AXIS))


def _check_mesh(mesh):
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}")


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that puts a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over: every axis but ``"model"``."""
  return tuple(a for a in mesh.axis_names if a != MODEL_AXIS)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding that splits axis 0 over the batch axes of ``mesh`` (all but ``"model"``)."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())


def put(x, sharding: NamedSharding):
  """``x`` as a global array with ``sharding`` (passed through if it already has it).

  With several processes every process passes the same (host-local) value, and each keeps the
  parts its devices hold (``jax.make_array_from_callback``).
  """
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(mesh: Mesh, tree):
  """``tree`` (e.g. a :class:`TrainState`) copied to every device of ``mesh``.

  With several processes each must pass the same values (same seed / same checkpoint). To split
  parameters over the mesh instead, see :func:`shard_state`.

  Example:
    >>> from qatjax.training import data_mesh, replicate
    >>> r = replicate(data_mesh(), {"w": jnp.ones(3)})
    >>> r["w"].sharding.is_fully_replicated
    True
  """
  _check_mesh(mesh)
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: put(x, sharding), tree)


def _batch_shards_here(mesh: Mesh) -> int:
  """How many distinct parts of a batch this process's devices hold (all, with one process)."""
  axes = [mesh.axis_names.index(a) for a in batch_axes(mesh)]
  me = jax.process_index()
  coords = {
    tuple(int(c[a]) for a in axes)
    for c in np.argwhere(np.vectorize(lambda d: d.process_index == me)(mesh.devices))
  }
  return len(coords)


def shard_batch(mesh: Mesh, batch):
  """``batch`` (a pytree of arrays) split along axis 0 over the batch axes of ``mesh``.

  The batch axes are all mesh axes but ``"model"``. With one process the arrays hold the global
  batch; with several, each process passes its own part and the global batch is assembled with
  ``jax.make_array_from_process_local_data`` (in process order). Arrays that already have this
  sharding are passed through.

  Raises:
    ValueError: a leaf whose leading dimension is not divisible by the number of devices along
      the batch axes (with several processes: by those of this process).

  Example:
    >>> from qatjax.training import data_mesh, shard_batch
    >>> xs, ys = shard_batch(data_mesh(), (jnp.ones((8, 3)), jnp.zeros(8, jnp.int32)))
    >>> xs.shape
    (8, 3)
  """
  _check_mesh(mesh)
  sharding = batch_sharding(mesh)
  multi = jax.process_count() > 1
  n_dev = _batch_shards_here(mesh)
  where = "devices of this process along" if multi else "devices along"

  def place(path, x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    shape = np.shape(x)
    name = "batch" + jax.tree_util.keystr(path)
    if not shape or shape[0] % n_dev:
      raise ValueError(
        f"{name} has shape {shape}: its batch size (axis 0) must be divisible by "
        f"the {n_dev} {where} the mesh's batch axes {batch_axes(mesh)}"
      )
    if multi:
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(place, batch)
