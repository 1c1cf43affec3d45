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
from qatjax.core.int_kernels import rescaled
from qatjax.core.qarray import QArray
from qatjax.ops import dot_general as dot
from qatjax.ops.context import QuantContext, flags
from qatjax.ops.coverage import describe, op_scope
from qatjax.ops.product import integer_forward
from qatjax.ops.weight_quantizers import (
  apply_weight,
  weight_integers,
  weight_layout,
  weight_qarray,
  weight_scale_used,
  weight_state,
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
    w_state = weight_state(ctx, table, weight_q, layout, "embedding")
    if ctx.recording:
      scale = weight_scale_used(weight_q, w_state)
      ctx.record("embedding", weight_qarray(table, scale, weight_q, layout))

    def fake(ids, table, _, w_state, enabled):
      table = apply_weight(table, weight_q, w_state, layout, enabled)
      (table,) = promote_dtype(table, dtype=dtype, inexact=False)
      return jnp.take(table, ids, axis=0)

    served = layout.group_axis is None and table.dtype == jnp.float32
    if not served or (dtype is not None and jnp.dtype(dtype) != jnp.float32):
      return fake(ids, table, None, w_state, enabled)

    def integer(ids, table, _, w_state):
      def value():  # the rows as the converted model computes them (_scaled_rows)
        scale = weight_scale_used(weight_q, w_state)
        q, stored_scale = weight_integers(table, scale, weight_q, layout)
        return _scaled_rows(q, stored_scale, ids)

      return value, True

    # The converted model's rows where no derivative is taken, rescaled after the branch: XLA
    # fuses that multiply with the next add (token + position) into one multiply-add, which rows
    # gathered from a fake-quantized table would round differently.
    return integer_forward(fake, integer, ids, table, None, w_state, enabled, differentiated=False)


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


def _scaled_rows(codes, scale, ids):
  """``(codes[ids] in float32, factors)``: the rows are ``rescaled(rows, factors)``, with one
  scale per row (or one for the table)."""
  rows = jnp.take(codes, ids, axis=0).astype(jnp.float32)
  scale = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
  return rows, (jnp.take(scale, ids, axis=0)[..., None] if scale.ndim else scale,)


def _serve(qa: QArray, ids):
  if qa.group_size is None:
    return rescaled(*_scaled_rows(qa.unpack(), qa.scale, ids))
  return jnp.take(qa.dequantize(), ids, axis=0)
