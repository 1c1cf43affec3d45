"""Checkpoints of the whole train state with orbax-checkpoint (one sub-directory per step).

Orbax writes a step to ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` once every
file is written (an atomic commit). A run killed while writing leaves the temporary directory:
it is never restored (:func:`restore_checkpoint` falls back to the latest complete step with a
warning naming it, or raises when that very step is asked for) and the next save removes it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

import jax

from qatjax.training._layout import check_layouts
from qatjax.training._tree import diff_specs, leaf_specs, metadata_specs

# The name orbax gives a step directory until its write is committed.
_TMP_STEP = re.compile(r"(\d+)\.orbax-checkpoint-tmp.*")


def _orbax():
  import orbax.checkpoint as ocp  # optional dependency

  return ocp


class _DropReadOnlyNotes(logging.Filter):
  """Hides orbax's warnings that a read-only manager (used here to inspect) is read-only."""

  def filter(self, record):
    msg = record.getMessage()
    return not ("read_only=True" in msg or "directory is read only" in msg)


def _manager(directory: str, *, read_only: bool):
  ocp = _orbax()
  log, note_filter = logging.getLogger("absl"), _DropReadOnlyNotes()
  log.addFilter(note_filter)
  try:
    options = ocp.CheckpointManagerOptions(
      read_only=read_only,
      create=not read_only,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only,  # a writer removes interrupted writes first
    )
    return ocp.CheckpointManager(
      directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )
  finally:
    log.removeFilter(note_filter)


def _saved_tree(manager, step):
  meta = manager.item_metadata(step)
  return getattr(meta, "tree", meta)


def incomplete_steps(directory) -> dict[int, str]:
  """``{step: path}`` of the interrupted (uncommitted) writes in ``directory``."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return {
    int(m.group(1)): os.path.join(directory, name)
    for name in sorted(names)
    if (m := _TMP_STEP.fullmatch(name))
  }


def complete_steps(directory) -> list[int]:
  """The committed steps in ``directory`` (empty if it does not exist)."""
  if not os.path.isdir(directory):
    return []
  manager = _manager(os.path.abspath(os.fspath(directory)), read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _check_tree(manager, step, state, directory, what):
  problems = diff_specs(
    metadata_specs(_saved_tree(manager, step)),
    leaf_specs(state),
    have_name=f"checkpoint step {step}",
    want_name=what,
  )
  if problems:
    raise ValueError(
      f"checkpoint directory {directory} holds a different state tree than "
      f"{what}: " + "; ".join(problems)
    )


def _check_step(step):
  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    raise ValueError(f"step must be a non-negative int or None, got {step!r}")


def save_checkpoint(directory, state, step: int | None = None) -> str:
  """Saves the whole train state to ``directory/<step>`` with orbax-checkpoint.

  Everything that makes a run resumable is saved: ``step``, ``params`` (weights and learned
  scales), ``opt_state``, ``quant_stats`` (observer statistics and flags) and ``batch_stats``;
  arrays are written as they are (bitwise). The save is synchronous. ``directory`` is created
  if needed; on several hosts call it on every host (orbax coordinates the write).

  Args:
    directory: the checkpoint root (one sub-directory per step).
    state: a :class:`TrainState` (or any pytree of arrays).
    step: the step number to save under (default: ``state.step``).

  Returns:
    The path of the saved step.

  Raises:
    ValueError: ``directory`` is a file, already holds this step, or holds checkpoints of a
      different state tree (naming the mismatching paths); nothing is written then.

  Example:
    >>> import os, tempfile, optax
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import create_train_state, restore_checkpoint, save_checkpoint
    >>> s = create_train_state(QDense(2, config=QuantConfig()), optax.adam(1e-3),
    ...                        jax.random.key(0), jnp.ones((1, 3)))
    >>> d = tempfile.mkdtemp()
    >>> os.path.basename(save_checkpoint(d, s))
    '0'
    >>> r = restore_checkpoint(d, s)
    >>> bool((r.params["kernel"] == s.params["kernel"]).all())
    True
  """
  directory = os.path.abspath(os.fspath(directory))
  step = int(jax.device_get(state.step)) if step is None else step
  _check_step(step)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"checkpoint directory {directory} is a file")
  if os.path.isdir(directory):
    reader = _manager(directory, read_only=True)
    try:
      steps = reader.all_steps()
      if step in steps:
        raise ValueError(f"checkpoint directory {directory} already holds step {step}")
      if steps:
        _check_tree(reader, max(steps), state, directory, "the state being saved")
    finally:
      reader.close()
  manager = _manager(directory, read_only=False)
  manager.save(step, args=_orbax().args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  return os.path.join(directory, str(step))


def restore_checkpoint(directory, target_state, step: int | None = None, *, reshard: bool = False):
  """Restores a state saved by :func:`save_checkpoint` into the structure of ``target_state``.

  ``target_state`` gives the tree, shapes, dtypes and shardings (e.g. a freshly created,
  :func:`replicate`-d or :func:`shard_state`-d state) and the static ``apply_fn`` / ``tx``; its
  values are not used. Restored arrays are bitwise the saved ones. Only committed steps are
  restored: an interrupted write (``<step>.orbax-checkpoint-tmp``) newer than the latest complete
  step is skipped with a ``UserWarning`` naming it.

  An array split over a mesh is restored split the same way: if the checkpoint splits a leaf
  differently from ``target_state`` (another mesh, other sharding rules; replicated arrays and
  single-device arrays count as unsplit) this raises, unless ``reshard=True``, which restores
  onto the target's layout (e.g. a sharded run's checkpoint onto one device).

  Args:
    directory: the checkpoint root passed to :func:`save_checkpoint`.
    target_state: a state of the same model and optimizer.
    step: the step to restore (default: the latest complete one).
    reshard: allow a layout (mesh / sharding) other than the saved one.

  Returns:
    The restored state.

  Raises:
    ValueError: ``directory`` does not exist or holds no complete checkpoint, ``step`` is not
      there or was never completely written, the checkpoint's tree differs from
      ``target_state`` (naming the mismatching paths), or (without ``reshard``) a leaf is split
      differently (naming the path, both meshes and both splits). Nothing is written.

  Example:
    >>> import tempfile, optax
    >>> from qatjax import QDense
    >>> from qatjax.training import create_train_state, restore_checkpoint
    >>> s = create_train_state(QDense(2), optax.sgd(0.1), jax.random.key(0), jnp.ones((1, 3)))
    >>> try:
    ...   restore_checkpoint(tempfile.mkdtemp() + "/missing", s)
    ... except ValueError as e:
    ...   print("does not exist" in str(e))
    True
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint directory {directory} does not exist")
  if step is not None:
    _check_step(step)
  manager = _manager(directory, read_only=True)
  try:
    steps = manager.all_steps()
    partial = incomplete_steps(directory)
    if step in partial and step not in steps:
      raise ValueError(
        f"checkpoint step {step} in {directory} was never completely written ({partial[step]} "
        f"is an interrupted write); complete steps: {sorted(steps)}"
      )
    if not steps:
      found = f" (only interrupted writes: {sorted(partial.values())})" if partial else ""
      raise ValueError(f"checkpoint directory {directory} holds no checkpoint{found}")
    if step is None:
      step = max(steps)
      newer = [path for s, path in partial.items() if s > step]
      if newer:
        warnings.warn(
          f"ignoring the incomplete checkpoint {newer[-1]} (its write was interrupted); "
          f"restoring step {step}, the latest complete one",
          stacklevel=2,
        )
    if step not in steps:
      raise ValueError(
        f"checkpoint directory {directory} has no step {step} (it has {sorted(steps)})"
      )
    _check_tree(manager, step, target_state, directory, "the target state")
    if not reshard:
      check_layouts(_saved_tree(manager, step), target_state, f"checkpoint step {step}")
    ocp = _orbax()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  finally:
    manager.close()
