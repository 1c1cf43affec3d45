"""The Flax Linen layers ``quantize_model`` runs quantized, and the quantized method of each.

One entry per layer kind of :mod:`qatjax.ops.registry` (``KINDS``): the Flax class, and for each
of its methods a handler ``(module, config, args, kwargs) -> result`` that runs the method with
the quantized op (or returns ``NotImplemented`` to let the float method run). Subclasses are
matched through their MRO, so ``class MyDense(nn.Dense)`` is quantized like ``nn.Dense``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn

from qatjax.linen.attention import attention_call
from qatjax.linen.conv import conv_call
from qatjax.linen.dense import dense_call, dense_general_call
from qatjax.linen.einsum import einsum_call
from qatjax.linen.embed import embed_attend_call, embed_call, embed_setup


@dataclasses.dataclass(frozen=True)
class FlaxLayer:
  """A Flax layer class ``quantize_model`` quantizes: its kind and its quantized methods."""

  kind: str
  methods: dict[str, Callable]


def _einsum(m, cfg, args, kwargs):
  (inputs, *rest) = args
  return einsum_call(m, inputs, rest[0] if rest else kwargs.get("einsum_str"), cfg)


# Order matters only for classes that subclass one another (first match along the MRO wins).
LAYERS: dict[type, FlaxLayer] = {
  nn.Dense: FlaxLayer("dense", {"__call__": lambda m, c, a, k: dense_call(m, *a, c, **k)}),
  nn.DenseGeneral: FlaxLayer(
    "dense_general", {"__call__": lambda m, c, a, k: dense_general_call(m, *a, c, **k)}
  ),
  nn.Einsum: FlaxLayer("einsum", {"__call__": _einsum}),
  nn.Conv: FlaxLayer("conv", {"__call__": lambda m, c, a, k: conv_call(m, *a, c, **k)}),
  nn.Embed: FlaxLayer(
    "embed",
    {
      "setup": lambda m, c, a, k: embed_setup(m),
      "__call__": lambda m, c, a, k: embed_call(m, *a, c, **k),
      "attend": lambda m, c, a, k: embed_attend_call(m, *a, c, **k),
    },
  ),
  nn.MultiHeadDotProductAttention: FlaxLayer("attention", {"__call__": attention_call}),
}


def find_layer(module) -> FlaxLayer | None:
  """The :class:`FlaxLayer` of ``module``'s class or its nearest listed base class, or ``None``.

  Example:
    >>> import flax.linen as nn
    >>> from qatjax.linen.flax_layers import find_layer
    >>> class MyDense(nn.Dense):
    ...   pass
    >>> find_layer(MyDense(3)).kind, find_layer(nn.LayerNorm())
    ('dense', None)
  """
  for cls in type(module).__mro__:
    if cls in LAYERS:
      return LAYERS[cls]
  return None


def layer_kind(module) -> str | None:
  """The registry kind of a Flax layer that ``quantize_model`` quantizes, else ``None``."""
  layer = find_layer(module)
  return None if layer is None else layer.kind
