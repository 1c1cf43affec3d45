"""An NNX model's variables as Linen-style collections, and back.

``to_variables`` groups a model's variables by type into the collections Linen uses
(``nnx.Param`` -> ``params``, :class:`~qatjax.nnx.QuantStat` -> ``quant_stats``,
``nnx.BatchStat`` -> ``batch_stats``), keyed by module path with string keys. A quantized NNX
model whose attributes are named like a Linen model's modules has exactly the Linen model's
variables; ``qatjax.model_size``, ``save_quantized`` and every other function of variables dicts
read NNX models through it. ``load_variables`` writes such a dict into a model.
"""

from __future__ import annotations

import numpy as np
from flax import nnx, traverse_util

from qatjax.core.qarray import QArray
from qatjax.nnx.context import QuantStat
from qatjax.nnx.passes import module_path

COLLECTIONS = {"params": nnx.Param, "quant_stats": QuantStat, "batch_stats": nnx.BatchStat}


def _collection(var) -> str | None:
  for name, kind in COLLECTIONS.items():
    if isinstance(var, kind):
      return name
  return None


def to_variables(model) -> dict:
  """``{"params": ..., "quant_stats": ..., "batch_stats": ...}`` of an NNX model (or of an
  ``nnx.State``): nested dicts keyed by path parts as strings (other variable types, such as RNG
  streams, are left out).

  Example:
    >>> from flax import nnx
    >>> from qatjax.nnx import to_variables
    >>> v = to_variables(nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
    >>> jax.tree.map(lambda a: a.shape, v)
    {'params': {'layers': {'0': {'bias': (3,), 'kernel': (2, 3)}}}}
  """
  state = model if isinstance(model, nnx.State) else nnx.state(model)
  flat = {}
  for path, var in nnx.to_flat_state(state):
    col = _collection(var)
    if col is not None:
      flat[(col, *(str(p) for p in path))] = var.get_value()
  return traverse_util.unflatten_dict(flat)


def _shape(value):
  return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def load_variables(model, variables) -> None:
  """Writes Linen-style ``variables`` (as :func:`to_variables` returns them) into ``model``.

  A variable the model has gets the new value (a float kernel may become a converted
  :class:`QArray`); one it lacks is created with the collection's type. Everything is checked
  before anything is written.

  Args:
    model: an ``nnx.Module``.
    variables: ``{collection: nested dict}`` with collections ``params``, ``quant_stats``,
      ``batch_stats``; an ``nnx.State`` works too.

  Raises:
    ValueError: naming the path, for an unknown collection, a module path the model lacks, a
      variable of another type, or a shape that differs from the model's.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, load_variables
    >>> float_model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> qlayer = QLinear(3, 2, config=QuantConfig(), rngs=nnx.Rngs(1))
    >>> load_variables(qlayer, nnx.state(float_model))   # a float NNX state loads
    >>> bool((qlayer.kernel[...] == float_model.kernel[...]).all())
    True
  """
  if isinstance(variables, nnx.State):
    variables = to_variables(variables)
  modules = {module_path(p): m for p, m in nnx.iter_modules(model)}
  writes = []
  for col, tree in variables.items():
    if col not in COLLECTIONS:
      raise ValueError(
        f"load_variables: unknown collection {col!r} (allowed: {', '.join(COLLECTIONS)})"
      )
    flat = traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, v: isinstance(v, QArray))
    for keys, value in flat.items():
      layer, name = "/".join(keys[:-1]) or "<root>", keys[-1]
      where = f"{col}/{'/'.join(keys)}"
      if layer not in modules:
        raise ValueError(f"load_variables: {where}: the model has no module at {layer!r}")
      var = vars(modules[layer]).get(name)
      if var is not None and not isinstance(var, COLLECTIONS[col]):
        raise ValueError(
          f"load_variables: layer {layer}: {name} is a {type(var).__name__} in the model, "
          f"not a {COLLECTIONS[col].__name__} ({col})"
        )
      if var is not None and _shape(var.get_value()) != _shape(value):
        raise ValueError(
          f"load_variables: layer {layer}: {col}/{name} has shape {_shape(value)} in the given "
          f"variables but {_shape(var.get_value())} in the model"
        )
      writes.append((modules[layer], name, var, COLLECTIONS[col], value))
  for module, name, var, kind, value in writes:
    if var is None:
      setattr(module, name, kind(value))
    else:
      var.set_value(value)
