"""Validation and broadcasting of per-tensor, per-channel and per-group scales."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax


def check_axis(axis, ndim: int, name: str = "axis") -> int | None:
  """Normalizes ``axis`` (``None`` or an int in ``[-ndim, ndim)``)."""
  if axis is None:
    return None
  if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
    raise ValueError(
      f"{name} must be None or an int in [{-ndim}, {ndim}) for a {ndim}-D input, got {axis!r}"
    )
  return axis % ndim


def num_groups(size: int, group_size: int) -> int:
  """Number of groups of ``group_size`` covering ``size`` (the last one may be shorter)."""
  return math.ceil(size / group_size)


def group_shape(shape, axis: int, group_size: int) -> tuple[int, ...]:
  """Shape of a per-group statistic: ``shape`` with ``shape[axis]`` replaced by its group count."""
  shape = list(shape)
  shape[axis] = num_groups(shape[axis], group_size)
  return tuple(shape)


def check_group_size(group_size) -> int:
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
  return group_size


def expand_qparam(p, x_shape, axis, group_size, name: str):
  """Broadcasts a scale or zero point to a shape that broadcasts against ``x``.

  * ``axis=None``: ``p`` must be a scalar (or size-1 array); returned as a 0-d array.
  * ``axis=k``, no group: ``p`` is 1-D of length ``x_shape[k]``; reshaped to broadcast along k.
  * ``axis=k``, ``group_size=g``: ``p`` has ``x.ndim`` dims, dim k equal to
    ``ceil(x_shape[k] / g)`` and the other dims equal to ``x_shape`` or 1; it is repeated g times
    along k and cut to ``x_shape[k]`` (uneven sizes work). A 1-D ``p`` of length
    ``ceil(x_shape[k] / g)`` is also accepted (one scale per group, shared by the other axes).

  Raises:
    ValueError: naming ``name`` when the shape does not fit.
  """
  p = jnp.asarray(p, jnp.float32)
  ndim = len(x_shape)
  if axis is None:
    if group_size is not None:
      raise ValueError(f"group_size={group_size} needs an axis to group along, got axis=None")
    if p.size != 1:
      raise ValueError(
        f"{name} must be a scalar for per-tensor quantization (axis=None), got shape {p.shape}"
      )
    return p.reshape(())
  if group_size is None:
    if p.shape != (x_shape[axis],):
      raise ValueError(
        f"{name} must have shape ({x_shape[axis]},) for per-channel quantization "
        f"along axis {axis} of an input of shape {tuple(x_shape)}, got {p.shape}"
      )
    return p.reshape([-1 if d == axis else 1 for d in range(ndim)])
  check_group_size(group_size)
  n = num_groups(x_shape[axis], group_size)
  if p.ndim == 1 and p.shape == (n,):
    p = p.reshape([-1 if d == axis else 1 for d in range(ndim)])
  ok = p.ndim == ndim and all(
    (p.shape[d] == n) if d == axis else (p.shape[d] in (1, x_shape[d])) for d in range(ndim)
  )
  if not ok:
    want = group_shape(x_shape, axis, group_size)
    raise ValueError(
      f"{name} must have shape ({n},) or {want} (dims other than {axis} may be 1) "
      f"for groups of {group_size} along axis {axis} of an input of shape "
      f"{tuple(x_shape)}, got {p.shape}"
    )
  full = jnp.repeat(p, group_size, axis=axis)
  return lax.slice_in_dim(full, 0, x_shape[axis], axis=axis)
