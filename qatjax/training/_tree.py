"""Pytree paths and ``(shape, dtype)`` specs, for comparing a state with a checkpoint or a model."""

from __future__ import annotations

import jax
import numpy as np


def key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_str(path) -> str:
  """``"params/Dense_0/kernel"`` for a ``jax.tree_util`` key path."""
  return "/".join(key_name(e) for e in path)


def leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` of every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    path_str(p): (
      tuple(np.shape(x)),
      str(np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype)),
    )
    for p, x in leaves
  }


def metadata_leaves(tree, prefix: str = "") -> dict:
  """``{path: leaf}`` of an orbax metadata tree (nested dicts / lists of array metadata)."""
  if tree is None:
    return {}
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(metadata_leaves(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def metadata_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` of an orbax metadata tree (nested dicts / lists of metadata)."""
  out = {}
  for path, leaf in metadata_leaves(tree).items():
    shape, dtype = getattr(leaf, "shape", ()), getattr(leaf, "dtype", None)
    out[path] = (tuple(shape or ()), str(np.dtype(dtype)) if dtype is not None else "?")
  return out


def diff_specs(
  have: dict, want: dict, *, have_name: str, want_name: str, dtypes: bool = True, limit: int = 3
) -> list[str]:
  """Human-readable differences between two spec dicts (empty when they agree)."""
  problems = []
  for path in want:  # shape / dtype differences first: the most telling
    if path in have:
      (hs, hd), (ws, wd) = have[path], want[path]
      if hs != ws:
        problems.append(f"{path} has shape {hs} in {have_name} but {ws} in {want_name}")
      elif dtypes and hd != wd and "?" not in (hd, wd):
        problems.append(f"{path} has dtype {hd} in {have_name} but {wd} in {want_name}")
  problems += [f"{path} is missing from {have_name}" for path in want if path not in have]
  problems += [
    f"{path} is in {have_name} but not in {want_name}" for path in have if path not in want
  ]
  if len(problems) > limit:
    problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
  return problems
