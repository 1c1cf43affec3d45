"""How a checkpoint splits its arrays over a mesh, compared with a restore target's layout."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from qatjax.training._tree import metadata_leaves, path_str


def _split(mesh_shape: dict[str, int], spec, ndim: int) -> tuple:
  """Per array axis, the ``(mesh axis, size)`` pairs it is split over (size-1 axes dropped);
  ``()`` for an array that is not split (replicated or on one device)."""
  entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  split = tuple(
    tuple(
      (n, mesh_shape[n])
      for n in (e if isinstance(e, (tuple, list)) else (e,) if e is not None else ())
      if mesh_shape[n] > 1
    )
    for e in entries
  )
  return split if any(split) else ()


def _saved_layout(meta) -> tuple[tuple, dict]:
  sharding = getattr(meta, "sharding", None)
  if sharding is None or getattr(sharding, "partition_spec", None) is None:
    return (), {}
  mesh_shape = dict(zip(sharding.axis_names, np.asarray(sharding.shape).tolist()))
  ndim = len(getattr(meta, "shape", ()) or ())
  return _split(mesh_shape, sharding.partition_spec, ndim), mesh_shape


def _target_layout(x) -> tuple[tuple, dict]:
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return (), {}
  mesh_shape = dict(sharding.mesh.shape)
  return _split(mesh_shape, sharding.spec, np.ndim(x)), mesh_shape


def _describe(split, mesh_shape) -> str:
  if not split:
    return "unsplit (replicated or on one device)"
  axes = ", ".join(
    f"axis {i} over {'x'.join(n for n, _ in parts)} ({np.prod([k for _, k in parts])} parts)"
    for i, parts in enumerate(split)
    if parts
  )
  return f"split {axes} of mesh {mesh_shape}"


def check_layouts(saved_tree, target, what: str) -> None:
  """Raises ``ValueError`` naming the first leaf that ``saved_tree`` (orbax metadata) splits over
  a mesh differently from ``target`` (a pytree of arrays)."""
  saved = metadata_leaves(saved_tree)
  for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = path_str(path)
    if name not in saved:
      continue
    have, have_mesh = _saved_layout(saved[name])
    want, want_mesh = _target_layout(x)
    if have != want:
      raise ValueError(
        f"{what} has {name} (shape {tuple(np.shape(x))}) "
        f"{_describe(have, have_mesh)}, but the target has it {_describe(want, want_mesh)}: "
        "the meshes or sharding rules differ; build the target with the same mesh and rules, "
        "or pass reshard=True to restore onto the target's layout"
      )
