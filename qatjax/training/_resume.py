"""Periodic checkpoints of a ``fit`` run and its resumption from the latest complete one."""

from __future__ import annotations

import os
import warnings

import jax

from qatjax.training._checkpoint import (
  complete_steps,
  incomplete_steps,
  restore_checkpoint,
  save_checkpoint,
)


def check_checkpointing(checkpoint_dir, checkpoint_every, arrays) -> None:
  """Raises ``ValueError`` for checkpoint options ``fit`` cannot honour (nothing is written)."""
  if checkpoint_every is not None and (
    isinstance(checkpoint_every, bool)
    or not isinstance(checkpoint_every, int)
    or checkpoint_every < 1
  ):
    raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
  if checkpoint_dir is None:
    if checkpoint_every is not None:
      raise ValueError("checkpoint_every needs a checkpoint_dir")
    return
  path = os.fspath(checkpoint_dir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"checkpoint_dir {path} is a file")
  if arrays is None:
    raise ValueError(
      "checkpoint_dir needs train_data as (x, y) arrays: a resumed run finds its place in the "
      "data (epoch order and batch) from the step, which an iterable of batches cannot replay"
    )


def resume(checkpoint_dir, state, train_step, last_step: int):
  """The latest complete checkpoint in ``checkpoint_dir`` restored onto ``state``'s layout (as
  ``train_step`` places it), or ``state`` when there is none; interrupted writes are skipped with
  a warning. Raises ``ValueError`` (before any step) for a checkpoint of another tree or layout,
  or one past ``last_step``."""
  directory = os.path.abspath(os.fspath(checkpoint_dir))
  steps = complete_steps(directory)
  if not steps:
    partial = incomplete_steps(directory)
    if partial:
      warnings.warn(
        f"ignoring the incomplete checkpoint {partial[max(partial)]} (its write was "
        f"interrupted); no complete checkpoint in {directory}, starting from the given state",
        stacklevel=3,
      )
    return state
  place = getattr(train_step, "shard_state", None)
  target = place(state) if place is not None else state
  restored = restore_checkpoint(directory, target)
  step = int(jax.device_get(restored.step))
  if step > last_step:
    raise ValueError(
      f"checkpoint_dir {directory} holds step {step}, past the end of this run (step "
      f"{last_step}: the given state's step plus epochs * steps per epoch)"
    )
  return restored


def maybe_save(checkpoint_dir, state, step: int, every: int, last_step: int) -> None:
  """Saves ``state`` (at ``step``) every ``every`` steps and at the run's last step."""
  if checkpoint_dir is not None and (step % every == 0 or step == last_step):
    save_checkpoint(checkpoint_dir, state, step=step)
