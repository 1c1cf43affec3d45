"""The Flax NNX layers qatjax quantizes, and the quantized class each becomes."""

from __future__ import annotations

from flax import nnx

from qatjax.nnx.attention import QMultiHeadAttention
from qatjax.nnx.conv import QConv
from qatjax.nnx.embed import QEmbed
from qatjax.nnx.linear import QEinsum, QLinear, QLinearGeneral

# Exact float type -> quantized class (a subclass of it), for ``quantize_model`` and ``coverage``.
LAYERS = {
  nnx.Linear: QLinear,
  nnx.LinearGeneral: QLinearGeneral,
  nnx.Einsum: QEinsum,
  nnx.Conv: QConv,
  nnx.Embed: QEmbed,
  nnx.MultiHeadAttention: QMultiHeadAttention,
}
