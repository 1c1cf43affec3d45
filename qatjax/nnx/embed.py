"""``QEmbed``: ``nnx.Embed`` with a weight-quantized table, a thin user of the quantized embedding
lookup (and of the quantized ``dot_general`` for ``attend``)."""

from __future__ import annotations

from flax import nnx

from qatjax.nnx.context import QuantModule, custom_promotion
from qatjax.ops.embed import embed_attend, embed_lookup


class QEmbed(nnx.Embed, QuantModule):
  """An ``nnx.Embed`` whose ``embedding`` table is quantized (one scale per row by default).

  The lookup quantizes the table only (indices are not activations); ``attend`` (a tied output
  head) is a quantized matmul of the query (activation settings of ``config``) with the same
  quantized table and the same ``embedding_scale``, as Linen's ``QEmbed``.
  After :func:`qatjax.nnx.convert` the table is stored as integers.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QEmbed, init_quantizers
    >>> emb = QEmbed(10, 4, config=QuantConfig(weight_bits=4, act_bits=None), rngs=nnx.Rngs(0))
    >>> init_quantizers(emb, jnp.array([1, 2]))
    >>> emb(jnp.array([[1, 2, 3]])).shape, emb.attend(jnp.ones((2, 4))).shape
    ((1, 3, 4), (2, 10))
  """

  def __init__(self, num_embeddings, features, *, config=None, use_running_average=False, **kw):
    super().__init__(num_embeddings, features, **kw)
    self.init_quant(config, use_running_average)

  @classmethod
  def unsupported(cls, module) -> str | None:
    return custom_promotion(module)

  def __call__(self, inputs, out_sharding=None):
    """Looks up rows of the (quantized) table for integer ``inputs``."""
    self.reject_out_sharding(out_sharding)
    wq, _ = self.quant_specs()
    return embed_lookup(
      self.quant_context, self.embedding.get_value(), inputs, wq, dtype=self.dtype
    )

  def attend(self, query, out_sharding=None):
    """Dot product of ``query`` with every (quantized) row, as ``nnx.Embed.attend``."""
    self.reject_out_sharding(out_sharding)
    wq, aq = self.quant_specs()
    return embed_attend(
      self.quant_context, query, self.embedding.get_value(), wq, aq, dtype=self.dtype
    )
