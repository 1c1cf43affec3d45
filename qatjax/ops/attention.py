"""The quantized activation x activation einsum: attention's ``q.k`` and ``p.v`` products.

Both operands are activations, each quantized with the activation spec at its own site (static
observers or learned steps keep per-site state; dynamic scales are computed per row from the
operand). ``convert`` records a marker (``attn_int8``) and the frozen static scales; the integer
model then computes, for ``a ~ (qa - za) sa`` and ``b ~ (qb - zb) sb`` (Jacob et al. 2018)::

  a . b = sa sb (qa . qb - za sum(qb) - zb sum(qa) + K za zb)

in int32 from int8 operands, with ``K`` the contraction length.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from qatjax.core.config import ActQuant
from qatjax.core.exact_dot import contracted_length, int_dot_general
from qatjax.core.int_kernels import (
  DotLayout,
  int8_input_magnitude,
  quantize_input_int8,
  rescaled,
)
from qatjax.ops.act_quantizers import (
  act_params,
  act_state,
  apply_act,
  record_act,
  serving_act_params,
)
from qatjax.ops.context import QuantContext, flags
from qatjax.ops.coverage import describe, op_scope
from qatjax.ops.einsum import plan_einsum
from qatjax.ops.product import (
  computes_in_float32,
  integer_forward,
  integer_unit,
  integer_when_differentiated,
)
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
      y = _train(ctx, a, b, dims, act_q, sites, precision, dtype)
  return y if plan.out_perm is None else lax.transpose(y, plan.out_perm)


def _train(ctx, a, b, dims, act_q: ActQuant, sites, precision, dtype):
  """Both operands fake-quantized, then multiplied; or, where ``qat_forward`` says so, the
  forward value of :func:`_int_product` (the converted model's) with the fake quantization's
  gradients."""
  enabled, observe = flags(ctx)
  (lc, rc), _ = dims
  state_a = act_state(ctx, a, act_q, observe, sites[0], lc)
  state_b = act_state(ctx, b, act_q, observe, sites[1], rc)
  if ctx.recording:
    ctx.record(ATTENTION_MARKER, jnp.bool_(True))
    record_act(ctx, act_params(act_q, state_a), sites[0])
    record_act(ctx, act_params(act_q, state_b), sites[1])

  def product(a, b, state_a, state_b, enabled):
    a, b = apply_act(a, act_q, state_a, enabled), apply_act(b, act_q, state_b, enabled)
    a, b = promote_dtype(a, b, dtype=dtype)
    return lax.dot_general(a, b, dims, precision=precision)

  amax = int8_input_magnitude(act_q.qmin, act_q.qmax)
  k = contracted_length(a.shape, lc)
  unit = integer_unit(k, amax, amax, "act_x_act")
  if unit is None or not computes_in_float32(a, b, dtype):
    return product(a, b, state_a, state_b, enabled)

  def integer(a, b, state_a, state_b):
    pa, pb = act_params(act_q, state_a), act_params(act_q, state_b)
    params = ((pa.scale, pa.zero_point), (pb.scale, pb.zero_point))
    return lambda: _int_product(a, b, dims, act_q, *params, unit == "bf16"), pa.ready & pb.ready

  differentiated = integer_when_differentiated("act_x_act")
  return integer_forward(
    product, integer, a, b, state_a, state_b, enabled, differentiated=differentiated
  )


def _serve(ctx, a, b, dims, act_q: ActQuant, sites):
  """The integer product with the serving scales (frozen, or dynamic from each operand)."""
  (lc, rc), _ = dims
  params_a = serving_act_params(ctx, a, act_q, sites[0], lc)
  params_b = serving_act_params(ctx, b, act_q, sites[1], rc)
  y3, factors = _int_product(a, b, dims, act_q, params_a, params_b, bf16=False)
  return DotLayout.of(a.shape, b.shape, dims).out(rescaled(y3, factors))


def _int_product(a, b, dims, act_q: ActQuant, params_a, params_b, bf16):
  """The int8 x int8 -> int32 product with both zero-point corrections (``bf16``: the int32 sums
  computed exactly on bfloat16 units, :mod:`qatjax.core.exact_dot`), in float32 on the
  ``(B, M, N)`` view, and the factors that rescale it
  (:func:`~qatjax.core.int_kernels.rescaled`)."""
  (lc, _), _ = dims
  (sa, za), (sb, zb) = params_a, params_b
  qa, za = quantize_input_int8(a, sa, za, act_q.qmin, act_q.qmax)
  qb, zb = quantize_input_int8(b, sb, zb, act_q.qmin, act_q.qmax)
  dl = DotLayout.of(a.shape, b.shape, dims)
  a3, b3 = dl.lhs3(qa), dl.rhs3(qb)  # (B, M, K), (B, N, K)
  za, sa = dl.lhs_param(za), dl.lhs_param(sa)  # scalars or (B, M, 1)
  zb, sb = dl.rhs_param(zb), dl.rhs_param(sb)  # scalars or (B, N, 1)
  if zb.ndim:
    zb, sb = jnp.swapaxes(zb, 1, 2), jnp.swapaxes(sb, 1, 2)  # (B, 1, N)
  k = contracted_length(a.shape, lc)
  acc = int_dot_general(a3, b3, (((2,), (2,)), ((0,), (0,))), bf16=bf16)
  sum_a = jnp.sum(a3.astype(jnp.int32), axis=2, keepdims=True)  # (B, M, 1)
  sum_b = jnp.swapaxes(jnp.sum(b3.astype(jnp.int32), axis=2, keepdims=True), 1, 2)  # (B, 1, N)
  acc = acc - za * sum_b - zb * sum_a + k * za * zb
  return acc.astype(jnp.float32), (sa, sb)
