"""NNX models where a function of the model package takes a Linen-style variables dict."""

from __future__ import annotations

import sys


def as_variables(tree):
  """``tree`` itself, or an NNX model's (or ``nnx.State``'s) variables as Linen collections
  (:func:`qatjax.nnx.to_variables`).

  Example:
    >>> from flax import nnx
    >>> from qatjax.model.nnx_variables import as_variables
    >>> sorted(as_variables(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))["params"])
    ['bias', 'kernel']
  """
  nnx = sys.modules.get("flax.nnx")  # NNX objects exist only once flax.nnx is imported
  if nnx is not None and isinstance(tree, (nnx.Module, nnx.State)):
    from qatjax.nnx.variables import to_variables

    return to_variables(tree)
  return tree
