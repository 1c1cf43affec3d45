"""``QEmbed``: ``nn.Embed`` with a weight-quantized embedding table, a thin user of the quantized
embedding lookup."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules, resolve
from qatjax.linen.context import LinenContext, module_path, weight
from qatjax.ops.embed import embed_attend, embed_lookup


class QEmbed(nn.Module):
  """An ``nn.Embed`` whose ``embedding`` table is quantized (one scale per row by default).

  Only the table is quantized (``config.act_bits`` is ignored: indices are not activations).
  After :func:`qatjax.convert` the table is stored as integers and looked-up rows are dequantized.

  Attributes:
    num_embeddings: number of rows.
    features: row length.
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None`` (plain ``nn.Embed``).
    dtype, param_dtype, embedding_init: as ``nn.Embed``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> emb = QEmbed(10, 4, config=QuantConfig(weight_bits=4, act_bits=None))
    >>> v = emb.init(jax.random.key(0), jnp.array([1, 2]))
    >>> emb.apply(v, jnp.array([[1, 2, 3]])).shape
    (1, 3, 4)
  """

  num_embeddings: int
  features: int
  config: QuantConfig | QuantRules | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

  def setup(self):
    self._cfg = resolve(self.config, module_path(self))
    self._wq = None if self._cfg is None else self._cfg.weight_quant
    self.embedding = weight(
      self, "embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype
    )

  def __call__(self, inputs):
    """Looks up rows of the (quantized) table for integer ``inputs``."""
    return embed_lookup(
      LinenContext(self), self.embedding, inputs, self._wq, dtype=self.dtype or self.param_dtype
    )

  def attend(self, query):
    """Dot product of ``query`` with every (quantized) row, as ``nn.Embed.attend``.

    Example:
      >>> emb = QEmbed(10, 4, config=QuantConfig(weight_bits=8, act_bits=None))
      >>> v = emb.init(jax.random.key(0), jnp.array([1, 2]))
      >>> emb.apply(v, jnp.ones((3, 4)), method=QEmbed.attend).shape   # a score per row
      (3, 10)
    """
    return embed_attend(LinenContext(self), query, self.embedding, self._wq)
