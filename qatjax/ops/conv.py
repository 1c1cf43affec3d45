"""The quantized convolution (channels-last ``conv_general_dilated``, 1-D to 3-D).

It owns the fake-quant forward (input per tensor, kernel per output channel, per tensor or per
group of input channels), what ``convert`` records (the ``HWIO`` kernel as a
:class:`~qatjax.core.qarray.QArray`, its zero-point correction sums and the input's frozen scale
and zero point) and the integer kernel (:func:`~qatjax.core.int_kernels.int_conv`). Padding is
the op's too: ``CIRCULAR`` / ``REFLECT`` / ``CAUSAL`` pad the input (with its zero point once it
is integer), so padding stays exact in every path.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import _conv_dimension_numbers, canonicalize_padding
from jax import lax

from qatjax.core.config import ActQuant, WeightQuant
from qatjax.core.int_kernels import int_conv, quantize_input_int8
from qatjax.core.qarray import QArray
from qatjax.ops.act_quantizers import (
  act_params,
  act_state,
  record_act,
  serving_act_params,
  serving_dtype,
)
from qatjax.ops.context import QuantContext, flags
from qatjax.ops.coverage import describe, op_scope
from qatjax.ops.product import quantized_product
from qatjax.ops.weight_quantizers import (
  weight_layout,
  weight_qarray,
  weight_scale_used,
  weight_state,
)


def _tuple(x, n):
  if x is None:
    x = 1
  return (x,) * n if isinstance(x, int) else tuple(x)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A convolution's canonical kernel size, strides, dilations and padding (lax or special)."""

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  padding: object

  @classmethod
  def of(cls, module, inputs_shape, path: str) -> ConvGeometry:
    """The geometry of a module with ``nn.Conv``'s fields, for inputs of ``inputs_shape``."""
    ks = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    n = len(ks)
    if not 1 <= n <= 3:
      raise ValueError(
        f"layer {path}: kernel_size must have 1 to 3 dims, got {module.kernel_size!r}"
      )
    if len(inputs_shape) < n + 1:
      raise ValueError(
        f"layer {path}: a {n}-D convolution needs inputs of rank >= {n + 1} "
        f"(spatial dims + features), got shape {tuple(inputs_shape)}"
      )
    return cls(
      ks,
      _tuple(module.strides, n),
      _tuple(module.input_dilation, n),
      _tuple(module.kernel_dilation, n),
      canonicalize_padding(module.padding, n),
    )

  def special_pads(self):
    """``(mode, [(lo, hi), ...])`` of CIRCULAR / REFLECT / CAUSAL padding (``jnp.pad``'s mode
    ``"wrap"`` / ``"reflect"`` / ``"constant"``, per spatial dim), else ``None``."""
    padding, ks, kd = self.padding, self.kernel_size, self.kernel_dilation
    if padding in ("CIRCULAR", "REFLECT"):
      dil = [(k - 1) * d + 1 for k, d in zip(ks, kd)]
      mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
      return mode, [((k - 1) // 2, k // 2) for k in dil]
    if padding == "CAUSAL":
      if len(ks) != 1:
        raise ValueError("Causal padding is only implemented for 1D convolutions.")
      return "constant", [(kd[0] * (ks[0] - 1), 0)]
    return None

  def pad_special(self, x, value=0):
    """``(x, lax_padding)``: CIRCULAR / REFLECT / CAUSAL padding done on ``x``, as ``nn.Conv``
    does; other paddings are returned for ``lax``."""
    special = self.special_pads()
    if special is None:
      return x, self.padding
    mode, spatial = special
    pads = [(0, 0)] + spatial + [(0, 0)]
    if mode == "constant":
      return jnp.pad(x, pads, constant_values=value), "VALID"
    return jnp.pad(x, pads, mode=mode), "VALID"

  def explicit_pads(self, spatial_shape, lax_padding):
    """``lax_padding`` as ``[(lo, hi), ...]`` for inputs of ``spatial_shape``."""
    if not isinstance(lax_padding, str):
      return lax_padding
    dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation)]
    return lax.padtype_to_pads(spatial_shape, dilated, self.strides, lax_padding)


def conv(
  ctx: QuantContext,
  inputs,
  kernel,
  weight_q: WeightQuant | None,
  act_q: ActQuant | None,
  geometry: ConvGeometry,
  *,
  feature_group_count: int = 1,
  precision=None,
  dtype=None,
):
  """Quantized convolution of ``inputs`` ``(N, *spatial, C)`` with ``kernel``
  ``(*spatial, C // groups, F)`` (float), or the :class:`QArray` ``convert`` stored.

  Returns the output ``(N, *spatial', F)`` without a bias.
  """
  g = geometry
  if act_q is not None and act_q.granularity == "per_token":
    raise ValueError(
      f"layer {ctx.path}: a convolution's activations can be quantized per tensor only, got "
      "act_granularity='per_token'"
    )
  if isinstance(kernel, QArray):
    with op_scope(describe(weight_q, act_q, integer=act_q is not None) or "weight-only"):
      out = _serve(ctx, inputs, kernel, act_q, g, feature_group_count)
    return out.astype(serving_dtype(inputs, dtype))
  if weight_q is None and act_q is None:
    return _float_conv(inputs, kernel, g, feature_group_count, precision, dtype)
  with op_scope(describe(weight_q, act_q)):
    enabled, observe = flags(ctx)
    a_state = None if act_q is None else act_state(ctx, inputs, act_q, observe)
    layout = w_state = None
    if weight_q is not None:
      nd = len(g.kernel_size)
      layout = weight_layout(weight_q, kernel.shape, range(nd + 1), group_axis=nd)
      w_state = weight_state(ctx, kernel, weight_q, layout, "kernel")
      if ctx.recording:
        qa = weight_qarray(kernel, weight_scale_used(weight_q, w_state), weight_q, layout)
        ctx.record("kernel", qa)
        if layout.group_axis is None:
          ctx.record(
            "kernel_sum", jnp.sum(qa.unpack().astype(jnp.int32), axis=tuple(range(nd + 1)))
          )
        record_act(ctx, None if act_q is None else act_params(act_q, a_state))

    def op(inputs, kernel):
      return _float_conv(inputs, kernel, g, feature_group_count, precision, dtype)

    # Recomputed in the backward pass: the layer keeps what the float layer keeps.
    return quantized_product(op, inputs, kernel, act_q, a_state, weight_q, w_state, layout, enabled)


def _float_conv(inputs, kernel, g: ConvGeometry, feature_group_count, precision, dtype):
  inputs, pad_lax = g.pad_special(inputs)
  inputs, kernel = promote_dtype(inputs, kernel, dtype=dtype)
  return lax.conv_general_dilated(
    inputs,
    kernel,
    g.strides,
    pad_lax,
    lhs_dilation=g.input_dilation,
    rhs_dilation=g.kernel_dilation,
    dimension_numbers=_conv_dimension_numbers(inputs.shape),
    feature_group_count=feature_group_count,
    precision=precision,
  )


def _serve(ctx, inputs, qa: QArray, act_q, g: ConvGeometry, feature_group_count):
  """Integer inference for a converted kernel (without the bias)."""
  params = serving_act_params(ctx, inputs, act_q, "input", None)
  if params is not None and qa.group_size is not None:
    # Per-group scales vary along the contraction: no single int32 correction exists, so the
    # quantized input and kernel are dequantized and convolved in float (same values).
    qx, zx = quantize_input_int8(inputs, *params, act_q.qmin, act_q.qmax)
    inputs, params = (qx.astype(jnp.float32) - zx) * params[0], None
  if params is None:
    x, pad_lax = g.pad_special(inputs)
    return lax.conv_general_dilated(
      x,
      qa.dequantize(),
      g.strides,
      pad_lax,
      lhs_dilation=g.input_dilation,
      rhs_dilation=g.kernel_dilation,
      dimension_numbers=_conv_dimension_numbers(x.shape),
      feature_group_count=feature_group_count,
    )
  s = jnp.reshape(params[0], ())
  qx, zx = quantize_input_int8(inputs, s, jnp.reshape(params[1], ()), act_q.qmin, act_q.qmax)
  qx, pad_lax = g.pad_special(qx, value=zx.astype(jnp.int8))
  pads = g.explicit_pads(qx.shape[1:-1], pad_lax)
  acc = int_conv(
    qx,
    zx,
    qa.unpack(),
    ctx.converted("kernel_sum"),
    strides=g.strides,
    pads=pads,
    lhs_dilation=g.input_dilation,
    rhs_dilation=g.kernel_dilation,
    feature_group_count=feature_group_count,
  )
  return acc.astype(jnp.float32) * (s * qa.scale.reshape(-1 if qa.scale.size > 1 else ()))
