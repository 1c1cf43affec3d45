"""The quantized embedding lookup (and, through the quantized ``dot_general``, ``attend``).

The table ``(rows, features)`` is a weight whose "contraction" is its feature axis: one scale
per row (per channel), per table, or per group of features. The lookup fake-quantizes the table
in training; ``convert`` records it as a :class:`~qatjax.core.qarray.QArray`; integer serving
gathers int8 rows and scales them. ``attend`` (a tied output head) is
:func:`qatjax.ops.dot_general.dot_general` of the query with the same table and the same
quantizer state (``embedding_scale``), so both uses see one quantized table.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from qatjax.core.config import ActQuant, WeightQuant
from qatjax.core.qarray import QArray
from qatjax.ops import dot_general as dot
from qatjax.ops.context import QuantContext, flags
from qatjax.ops.coverage import describe, op_scope
from qatjax.ops.weight_quantizers import (
  quantize_weight,
  weight_layout,
  weight_qarray,
)

# The table's feature axis plays the contraction: scales are per row.
TABLE_CONTRACT = (1,)


def embed_lookup(ctx: QuantContext, table, ids, weight_q: WeightQuant | None, *, dtype=None):
  """Rows ``table[ids]`` of a (fake-)quantized table, or of the ``QArray`` ``convert`` stored.

  Raises:
    ValueError: ``ids`` are not integers (naming the layer).
  """
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"layer {ctx.path}: inputs must be integers, got {ids.dtype}")
  if isinstance(table, QArray):
    with op_scope(describe(weight_q, None, integer=True)):
      out = _serve(table, ids)
    return out.astype(jnp.float32 if dtype is None else dtype)
  if weight_q is None:
    (table,) = promote_dtype(table, dtype=dtype, inexact=False)
    return jnp.take(table, ids, axis=0)
  with op_scope(describe(weight_q, None)):
    enabled, _ = flags(ctx)
    layout = weight_layout(weight_q, table.shape, TABLE_CONTRACT)
    w = table
    table, scale = quantize_weight(ctx, table, weight_q, enabled, layout, "embedding")
    if ctx.recording:
      ctx.record("embedding", weight_qarray(w, scale, weight_q, layout))
    (table,) = promote_dtype(table, dtype=dtype, inexact=False)
    return jnp.take(table, ids, axis=0)


def embed_attend(
  ctx: QuantContext,
  query,
  table,
  weight_q: WeightQuant | None,
  act_q: ActQuant | None = None,
  *,
  precision=None,
  dtype=None,
):
  """``query @ table.T`` with the table quantized as in :func:`embed_lookup` (and the query as
  ``act_q``, if given)."""
  dims = (((query.ndim - 1,), TABLE_CONTRACT), ((), ()))
  return dot.dot_general(
    ctx, query, table, dims, weight_q, act_q, weight="embedding", precision=precision, dtype=dtype
  )


def _serve(qa: QArray, ids):
  if qa.group_size is None:
    rows = jnp.take(qa.unpack(), ids, axis=0).astype(jnp.float32)
    scale = qa.scale.reshape(-1) if qa.scale.size > 1 else qa.scale.reshape(())
    return rows * (jnp.take(scale, ids, axis=0)[..., None] if scale.ndim else scale)
  return jnp.take(qa.dequantize(), ids, axis=0)
