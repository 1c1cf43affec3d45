"""``QEmbed``: ``nn.Embed`` with a weight-quantized embedding table, a thin user of the quantized
embedding lookup."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules, resolve
from qatjax.linen.context import LinenContext, module_path, weight_param
from qatjax.ops.embed import embed_attend, embed_lookup


def embed_setup(m):
  """``nn.Embed.setup``: the table, or the ``QArray`` that ``convert`` stored."""
  m.embedding = weight_param(
    m, "embedding", m.embedding_init, (m.num_embeddings, m.features), m.param_dtype
  )


def embed_call(m, inputs, cfg: QuantConfig | None):
  """``nn.Embed.__call__`` with a quantized table, on any module with Embed's fields."""
  wq = None if cfg is None else cfg.weight_quant
  return embed_lookup(LinenContext(m), m.embedding, inputs, wq, dtype=m.dtype or m.param_dtype)


def embed_attend_call(m, query, cfg: QuantConfig | None):
  """``nn.Embed.attend`` (a tied output head) as a quantized matmul with the same table."""
  wq, aq = (None, None) if cfg is None else (cfg.weight_quant, cfg.act_quant)
  return embed_attend(LinenContext(m), query, m.embedding, wq, aq, dtype=m.dtype)


class QEmbed(nn.Module):
  """An ``nn.Embed`` whose ``embedding`` table is quantized (one scale per row by default).

  The lookup quantizes the table only (indices are not activations); :meth:`attend` (a tied
  output head) is a quantized matmul of the query (activation settings of ``config``) with the
  same quantized table. After :func:`qatjax.convert` the table is stored as integers: looked-up
  rows are scaled int8 rows and ``attend`` runs the integer ``dot_general``.

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
    embed_setup(self)

  def __call__(self, inputs):
    """Looks up rows of the (quantized) table for integer ``inputs``."""
    return embed_call(self, inputs, resolve(self.config, module_path(self)))

  def attend(self, query):
    """Dot product of ``query`` with every (quantized) row, as ``nn.Embed.attend`` (the query
    is quantized with the activation settings, the table as for the lookup).

    Example:
      >>> emb = QEmbed(10, 4, config=QuantConfig(weight_bits=8, act_bits=None))
      >>> v = emb.init(jax.random.key(0), jnp.array([1, 2]))
      >>> emb.apply(v, jnp.ones((3, 4)), method=QEmbed.attend).shape   # a score per row
      (3, 10)
    """
    return embed_attend_call(self, query, resolve(self.config, module_path(self)))
