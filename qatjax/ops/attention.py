"""The quantized activation x activation einsum: attention's ``q.k`` and ``p.v`` products.

Both operands are activations, each quantized with the activation spec at its own site (static
observers or learned steps keep per-site state; dynamic scales are computed per row from the
operand). ``convert`` records a marker (``attn_int8``) and the frozen static scales; the integer
model then computes, for ``a ~ (qa - za) sa`` and ``b ~ (qb - zb) sb`` (Jacob et al. 2018)::

  a . b = sa sb (qa . qb - za sum(qb) - zb sum(qa) + K za zb)

in int32 from int8 operands, with ``K`` the contraction length.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from qatjax.core.config import ActQuant
from qatjax.core.int_kernels import DotLayout, quantize_input_int8
from qatjax.ops.act_quantizers import (
  quantize_act,
  record_act,
  serving_act_params,
)
from qatjax.ops.context import QuantContext, flags
from qatjax.ops.coverage import describe, op_scope
from qatjax.ops.einsum import plan_einsum
from qatjax.ops.registry import ATTENTION_MARKER


def config_float_reason(cfg) -> str | None:
  """Why a config keeps attention's two matmuls float (``None``: it quantizes them)."""
  if cfg.attention_matmuls is False:
    return "attention_matmuls=False"
  if cfg.act_bits is None:
    return "the config has no act_bits (weight-only): activation x activation stays float"
  if cfg.pact:
    return "PACT clips at 0, which signed queries and keys are not"
  return None


def act_einsum(
  ctx: QuantContext,
  equation: str,
  a,
  b,
  act_q: ActQuant,
  sites: tuple[str, str],
  *,
  precision=None,
  dtype=None,
):
  """``jnp.einsum(equation, a, b)`` with both operands quantized (``sites`` name their state)."""
  plan = plan_einsum(equation, a.shape, b.shape, ctx.path, rhs_ellipsis=True)
  dims = plan.dimension_numbers
  if ctx.converted(ATTENTION_MARKER) is not None:
    with op_scope(describe(None, act_q, integer=True) + " act x act"):
      y = _serve(ctx, a, b, dims, act_q, sites)
  else:
    with op_scope(describe(None, act_q) + " act x act"):
      enabled, observe = flags(ctx)
      a, pa = quantize_act(ctx, a, act_q, enabled, observe, sites[0], dims[0][0])
      b, pb = quantize_act(ctx, b, act_q, enabled, observe, sites[1], dims[0][1])
      if ctx.recording:
        ctx.record(ATTENTION_MARKER, jnp.bool_(True))
        record_act(ctx, pa, sites[0])
        record_act(ctx, pb, sites[1])
      a, b = promote_dtype(a, b, dtype=dtype)
      y = lax.dot_general(a, b, dims, precision=precision)
  return y if plan.out_perm is None else lax.transpose(y, plan.out_perm)


def _serve(ctx, a, b, dims, act_q: ActQuant, sites):
  """The int8 x int8 -> int32 product with both zero-point corrections, rescaled."""
  (lc, rc), _ = dims
  (sa, za), (sb, zb) = (
    serving_act_params(ctx, a, act_q, sites[0], lc),
    serving_act_params(ctx, b, act_q, sites[1], rc),
  )
  qa, za = quantize_input_int8(a, sa, za, act_q.qmin, act_q.qmax)
  qb, zb = quantize_input_int8(b, sb, zb, act_q.qmin, act_q.qmax)
  dl = DotLayout.of(a.shape, b.shape, dims)
  a3, b3 = dl.lhs3(qa), dl.rhs3(qb)  # (B, M, K), (B, N, K)
  za, sa = dl.lhs_param(za), dl.lhs_param(sa)  # scalars or (B, M, 1)
  zb, sb = dl.rhs_param(zb), dl.rhs_param(sb)  # scalars or (B, N, 1)
  if zb.ndim:
    zb, sb = jnp.swapaxes(zb, 1, 2), jnp.swapaxes(sb, 1, 2)  # (B, 1, N)
  k = math.prod(a.shape[d] for d in lc)
  acc = lax.dot_general(a3, b3, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.int32)
  sum_a = jnp.sum(a3.astype(jnp.int32), axis=2, keepdims=True)  # (B, M, 1)
  sum_b = jnp.swapaxes(jnp.sum(b3.astype(jnp.int32), axis=2, keepdims=True), 1, 2)  # (B, 1, N)
  acc = acc - za * sum_b - zb * sum_a + k * za * zb
  return dl.out(acc.astype(jnp.float32) * (sa * sb))
