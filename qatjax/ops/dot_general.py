"""The quantized ``dot_general`` of an activation and a weight.

One op serves ``Dense``, ``DenseGeneral`` (kernels of any rank) and ``Embed.attend``. It owns:

* **training**: the activation (``lhs``) and the weight (``rhs``) fake-quantized with their
  specs, then ``lax.dot_general`` in the layer's dtype (the fake quantization recomputed in the
  backward pass, :mod:`qatjax.ops.product`);
* **what convert records**: the weight as a :class:`~qatjax.core.qarray.QArray` stored in the
  order the integer kernel reads (``DotLayout.rhs_perm``), its zero-point correction sums
  (``<weight>_sum``) and the input's frozen scale and zero point;
* **integer serving** (when ``rhs`` is a ``QArray``): ``int8 x int8 -> int32`` (Jacob et al.
  2018), rescaled per channel, per group, or weight-only (the weight dequantized).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from qatjax.core.config import ActQuant, WeightQuant
from qatjax.core.exact_dot import contracted_length, int_dot_general
from qatjax.core.int_kernels import (
  DotLayout,
  int8_input_magnitude,
  int_matmul,
  int_matmul_grouped,
  int_matmul_nk,
  quantize_input_int8,
  rescaled,
)
from qatjax.core.qarray import QArray
from qatjax.ops.act_quantizers import (
  act_params,
  act_state,
  record_act,
  serving_act_params,
  serving_dtype,
)
from qatjax.ops.context import QuantContext, flags
from qatjax.ops.coverage import AUXILIARY_SCOPE, describe, op_scope
from qatjax.ops.product import (
  computes_in_float32,
  integer_forward,
  integer_unit,
  integer_when_differentiated,
  quantized_product,
)
from qatjax.ops.weight_quantizers import (
  weight_integers,
  weight_layout,
  weight_qarray,
  weight_scale_used,
  weight_state,
)


def canonical_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int):
  """``dot_general`` dimension numbers as tuples of non-negative ints."""
  (lc, rc), (lb, rb) = dimension_numbers
  norm = lambda axes, nd: tuple(int(a) % nd for a in axes)
  return ((norm(lc, lhs_ndim), norm(rc, rhs_ndim)), (norm(lb, lhs_ndim), norm(rb, rhs_ndim)))


def dot_general(
  ctx: QuantContext,
  lhs,
  rhs,
  dimension_numbers,
  weight_q: WeightQuant | None,
  act_q: ActQuant | None,
  *,
  weight: str = "kernel",
  site: str = "input",
  group_axis: int | None = None,
  precision=None,
  dtype=None,
  float_dot=None,
):
  """Quantized ``lax.dot_general(lhs, rhs, dimension_numbers)``.

  Args:
    ctx: the layer's state.
    lhs: the activation.
    rhs: the weight (float), or the :class:`QArray` ``convert`` stored (integer serving).
    dimension_numbers: as ``lax.dot_general``'s.
    weight_q: the weight's spec (``None``: float weight).
    act_q: the activation's spec (``None``: float activation).
    weight: the weight's parameter name (``"kernel"``, ``"embedding"``).
    site: the activation quantizer's name prefix.
    group_axis: the contracted weight axis the groups run along (default: the last contracted).
    precision: as ``lax.dot_general``'s (float paths).
    dtype: the computation dtype (``None``: promoted from the operands), as Flax's layers.
    float_dot: the ``dot_general`` that multiplies the (fake-quantized) float operands; default
      ``lax.dot_general`` (a layer's own ``dot_general`` field is respected this way).

  Returns:
    The product, shaped as ``lax.dot_general``'s.
  """
  dims = canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  if isinstance(rhs, QArray):
    with op_scope(describe(weight_q, act_q, integer=act_q is not None) or "weight-only"):
      out = _serve(ctx, lhs, rhs, dims, act_q, weight, site)
    return out.astype(serving_dtype(lhs, dtype))
  float_dot = lax.dot_general if float_dot is None else float_dot
  if weight_q is None and act_q is None:
    lhs, rhs = promote_dtype(lhs, rhs, dtype=dtype)
    return float_dot(lhs, rhs, dims, precision=precision)
  with op_scope(describe(weight_q, act_q)):
    enabled, observe = flags(ctx)
    # Quantizer state first (parameters, observer updates), outside the product below.
    a_state = None if act_q is None else act_state(ctx, lhs, act_q, observe, site, dims[0][0])
    layout = w_state = None
    if weight_q is not None:
      layout = weight_layout(weight_q, rhs.shape, dims[0][1], group_axis)
      w_state = weight_state(ctx, rhs, weight_q, layout, weight)
      if ctx.recording:
        scale = weight_scale_used(weight_q, w_state)
        _record(ctx, lhs.shape, rhs, scale, weight_q, layout, dims, weight)
        record_act(ctx, None if act_q is None else act_params(act_q, a_state), site)

    def op(lhs, rhs):
      lhs, rhs = promote_dtype(lhs, rhs, dtype=dtype)
      return float_dot(lhs, rhs, dims, precision=precision)

    def product(lhs, rhs, a_state, w_state, enabled):
      # Recomputed in the backward pass: the layer keeps what the float layer keeps.
      return quantized_product(op, lhs, rhs, act_q, a_state, weight_q, w_state, layout, enabled)

    grouped = layout is not None and layout.group_axis is not None
    kernel = "grouped" if grouped else "per_channel"  # (no weight quantizer: no integer unit)
    unit = _integer_unit(weight_q, act_q, lhs, rhs, dims, dtype, float_dot, kernel)
    if unit is None:
      return product(lhs, rhs, a_state, w_state, enabled)
    bf16 = unit == "bf16"

    def integer(lhs, rhs, a_state, w_state):
      act = act_params(act_q, a_state)

      def value():
        scale = weight_scale_used(weight_q, w_state)
        q, stored_scale = weight_integers(rhs, scale, weight_q, layout)  # not packed
        if layout.group_axis is None:
          return _int_channels(lhs, q, stored_scale, dims, act_q, act.scale, act.zero_point, bf16)
        dl = DotLayout.of(lhs.shape, rhs.shape, dims, layout.group_axis)  # (value, factors):
        args = (
          dl.rhs3(q),
          dl.rhs_param(stored_scale),
          layout.group_size,
          rhs.shape[layout.group_axis],
        )
        return _int_groups(lhs, dl, *args, act_q, act.scale, act.zero_point, bf16)

      return value, act.ready

    differentiated = integer_when_differentiated(kernel)
    return integer_forward(
      product, integer, lhs, rhs, a_state, w_state, enabled, differentiated=differentiated
    )


def _integer_unit(weight_q, act_q, lhs, rhs, dims, dtype, float_dot, kernel) -> str | None:
  """Whether (and on which unit) training computes the forward value with the integer kernel
  (:func:`qatjax.ops.product.qat_forward`): float32 layers with ``lax.dot_general`` and both
  operands quantized to at most 8 bits (the kernels return float32)."""
  if not (
    weight_q is not None
    and act_q is not None
    and weight_q.bits <= 8
    and act_q.bits <= 8
    and float_dot is lax.dot_general
    and computes_in_float32(lhs, rhs, dtype)
  ):
    return None
  amax_lhs = int8_input_magnitude(act_q.qmin, act_q.qmax)
  amax_rhs = max(abs(weight_q.qmin), abs(weight_q.qmax))
  k = contracted_length(rhs.shape, dims[0][1])
  return integer_unit(k, amax_lhs, amax_rhs, kernel)


def _record(ctx, lhs_shape, w, scale, weight_q, layout, dims, weight):
  """What ``convert`` stores: the integers in the kernel's read order, and their sums."""
  perm = DotLayout.of(lhs_shape, w.shape, dims, layout.group_axis).rhs_perm
  qa = weight_qarray(
    w, scale, weight_q, layout, perm=None if perm == tuple(range(w.ndim)) else perm
  )
  ctx.record(weight, qa)
  if layout.group_axis is None:
    ctx.record(
      f"{weight}_sum", jnp.sum(qa.unpack().astype(jnp.int32), axis=dims[0][1], keepdims=True)
    )


def _is_canonical(qa: QArray, dl: DotLayout) -> bool:
  """Whether the weight is stored in the order the kernel reads (what ``convert`` writes)."""
  return (tuple(range(len(qa.shape))) if qa.perm is None else qa.perm) == dl.rhs_perm


def _weight3(qa: QArray, dl: DotLayout):
  """The weight's integers as ``(B, N, K)`` int8 (no transpose when stored canonically)."""
  if _is_canonical(qa, dl):
    return qa.stored().reshape(dl.b, dl.n, dl.k)
  return dl.rhs3(qa.unpack())


def _serve_groups(lhs, qa: QArray, dims, act_q, scale, zero_point):
  """int8 activations x int4 groups -> int32 per group, rescaled (the W4A8 kernel)."""
  dl = DotLayout.of(lhs.shape, qa.shape, dims, qa.axis)
  w3, scale3 = _weight3(qa, dl), dl.rhs_param(qa.scale)
  y3, factors = _int_groups(
    lhs, dl, w3, scale3, qa.group_size, qa.shape[qa.axis], act_q, scale, zero_point
  )
  return dl.out(rescaled(y3, factors))


def _int_groups(lhs, dl, w3, scale3, group_size, grouped_len, act_q, scale, zero_point, bf16=False):
  """The grouped kernel on the weight's int8 ``(B, N, K)`` view and its ``(B, N, G)`` scales
  (``bf16``: the int32 products on bfloat16 units, exactly; see :mod:`qatjax.core.exact_dot`),
  as ``(y3, factors)``: the ``(B, M, N)`` result is ``rescaled(y3, factors)``."""
  qx, zx = quantize_input_int8(lhs, scale, zero_point, act_q.qmin, act_q.qmax)
  s, zx = dl.lhs_param(scale), dl.lhs_param(zx)  # scalars, or (B, M, 1) per token
  y3 = int_matmul_grouped(dl.lhs3(qx), zx, w3, scale3, group_size, grouped_len, bf16)
  return y3, (s,)


def _serve(ctx, lhs, qa: QArray, dims, act_q, weight, site):
  """Integer serving of a converted weight (the bias is the layer's)."""
  params = serving_act_params(ctx, lhs, act_q, site, dims[0][0])
  if params is None:  # weight-only: dequantize the weight, float product
    return lax.dot_general(lhs, qa.dequantize(), dims)
  if qa.group_size is not None:
    return _serve_groups(lhs, qa, dims, act_q, *params)
  dl = DotLayout.of(lhs.shape, qa.shape, dims)
  qx, zx = quantize_input_int8(lhs, *params, act_q.qmin, act_q.qmax)
  s, zx = dl.lhs_param(params[0]), dl.lhs_param(zx)  # scalars, or (B, M, 1) per token
  x3 = dl.lhs3(qx)
  ksum = dl.rhs_param(ctx.converted(f"{weight}_sum"))
  sw = dl.rhs_param(qa.scale)
  if dl.b == 1 and _is_canonical(qa, dl):  # the layout XLA:CPU's int8 matmul reads fastest
    ks = ksum.reshape(-1) if ksum.ndim else ksum
    zx2 = zx if zx.ndim == 0 else zx[0]
    acc = int_matmul_nk(x3[0], zx2, qa.values, dl.n, dl.k, qa.bits, ks)[None]
  else:
    acc = int_matmul(x3, zx, _weight3(qa, dl), _per_column(ksum))
  return dl.out(rescaled(*_rescale(acc, s, sw)))


def _per_column(p):
  """A ``(B, N, 1)`` weight parameter as ``(B, 1, N)`` (scalars as they are)."""
  return p if p.ndim == 0 else jnp.swapaxes(p, 1, 2)


def _rescale(acc, s, sw):
  """The int32 ``(B, M, N)`` sums in float32 and the factors that rescale them
  (:func:`~qatjax.core.int_kernels.rescaled`): the activation and weight scales."""
  return acc.astype(jnp.float32), (s, _per_column(sw))


def _int_channels(lhs, q, stored_scale, dims, act_q, scale, zero_point, bf16):
  """:func:`_serve`'s arithmetic for the training forward: the same int32 sums (computed on the
  weight in its own order: ``convert``'s stored order saves no transpose here) and rescaling
  factors, hence bitwise the converted model's output; ``(value, factors)`` as
  :func:`_rescale`."""
  dl = DotLayout.of(lhs.shape, q.shape, dims)
  qx, zx = quantize_input_int8(lhs, scale, zero_point, act_q.qmin, act_q.qmax)
  q = q.astype(jnp.int8)
  acc = int_dot_general(qx, q, dims, bf16=bf16).reshape(dl.b, dl.m, dl.n)
  if not (act_q.symmetric and act_q.qmin < 0):  # signed symmetric: zero point 0, no correction
    ksum = dl.rhs_param(_column_sums(q, dims, bf16))
    acc = acc - dl.lhs_param(zx) * _per_column(ksum)
  return _rescale(acc, dl.lhs_param(scale), dl.rhs_param(stored_scale))


def _column_sums(q, dims, bf16):
  """The int32 sums of the int8 weight ``q`` over its contracted axes (kept as size 1): a
  product with ones on the same unit as the layer's (one read of ``q``, no int32 copy of it)."""
  (_, rc), (_, rb) = dims
  if rb:
    return jnp.sum(q.astype(jnp.int32), axis=rc, keepdims=True)
  ones = jnp.ones([q.shape[a] for a in rc], jnp.int8)
  with jax.named_scope(AUXILIARY_SCOPE):  # not a site of its own (coverage)
    sums = int_dot_general(ones, q, ((tuple(range(len(rc))), rc), ((), ())), bf16=bf16)
  return sums.reshape([1 if a in rc else d for a, d in enumerate(q.shape)])
