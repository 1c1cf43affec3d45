"""``QEmbed``: ``nn.Embed`` with a weight-quantized embedding table."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qatjax._config import QuantConfig, QuantRules, resolve
from qatjax._quantizers import flags, is_converted, module_path, quantize_weight


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
    cfg = resolve(self.config, module_path(self))
    if is_converted(self):
      self._qtable = self.get_variable("params", "embedding")
      self.embedding = None
      return
    self._qtable = None
    table = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features),
                       self.param_dtype)
    self.embedding = table
    if cfg is not None and cfg.weight_bits is not None:
      enabled, _ = flags(self)
      table = quantize_weight(self, table, cfg, enabled, in_axis=1, out_axis=0, name="embedding")
    self._table = table

  def _rows(self, inputs):
    qa = self._qtable
    if qa.group_size is None:
      rows = jnp.take(qa.unpack(), inputs, axis=0).astype(jnp.float32)
      scale = qa.scale.reshape(-1) if qa.scale.size > 1 else qa.scale.reshape(())
      return rows * (jnp.take(scale, inputs, axis=0)[..., None] if scale.ndim else scale)
    return jnp.take(qa.dequantize(), inputs, axis=0)

  def __call__(self, inputs):
    """Looks up rows of the (quantized) table for integer ``inputs``."""
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"layer {module_path(self)}: inputs must be integers, got {inputs.dtype}")
    if self._qtable is not None:
      return self._rows(inputs)
    return jnp.take(jnp.asarray(self._table, self.dtype or self.param_dtype), inputs, axis=0)

  def attend(self, query):
    """Dot product of ``query`` with every (quantized) row, as ``nn.Embed.attend``."""
    table = self._qtable.dequantize() if self._qtable is not None else self._table
    return jnp.dot(query, table.T)
