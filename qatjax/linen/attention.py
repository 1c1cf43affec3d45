"""Attention's two activation x activation matmuls, quantized through Flax's own hook.

``nn.MultiHeadDotProductAttention`` (and its subclasses ``nn.MultiHeadAttention``,
``nn.SelfAttention``) computes ``q.k`` and ``p.v`` in its ``attention_fn``; Flax's
``dot_product_attention`` takes the two einsums as arguments (``qk_attn_weights_einsum`` /
``attn_weights_value_einsum``, the hook Flax keeps for quantized einsums). The module is run
with an ``attention_fn`` that passes :func:`qatjax.ops.attention.act_einsum` there, so both
operands of both products are quantized and their state lives in the attention module's own
variables (``attn_q_*``, ``attn_k_*``, ``attn_p_*``, ``attn_v_*``). Its projections are
``DenseGeneral`` layers, quantized by their own rules.
"""

from __future__ import annotations

import functools

import flax.linen as nn

from qatjax.core.config import ActQuant, QuantConfig
from qatjax.linen.context import LinenContext, module_path
from qatjax.ops.attention import act_einsum, config_float_reason
from qatjax.ops.registry import ATTENTION_SITES

_MARK = "_qatjax_quantized_attention"


def float_reason(m, cfg: QuantConfig | None) -> str | None:
  """Why an attention module's two matmuls stay float under ``cfg`` (``None``: quantized)."""
  if cfg is None:
    return "its rule maps to None"
  reason = config_float_reason(cfg)
  if reason is not None:
    return reason
  if m.attention_fn is not nn.dot_product_attention and not getattr(m.attention_fn, _MARK, False):
    return "a custom attention_fn (only flax's dot_product_attention is quantized)"
  return None


def _quantized_attention_fn(ctx: LinenContext, act_q: ActQuant):
  @functools.wraps(nn.dot_product_attention)
  def attention_fn(query, key, value, *args, precision=None, **kwargs):
    def product(sites):
      return lambda eq, a, b: act_einsum(ctx, eq, a, b, act_q, sites, precision=precision)

    kwargs.update(
      qk_attn_weights_einsum=product(ATTENTION_SITES[0]),
      attn_weights_value_einsum=product(ATTENTION_SITES[1]),
    )
    return nn.dot_product_attention(query, key, value, *args, **kwargs)

  setattr(attention_fn, _MARK, True)
  return attention_fn


def is_quantized_attention(m) -> bool:
  """Whether ``m`` already runs the quantized ``attention_fn`` (a clone made below)."""
  return getattr(getattr(m, "attention_fn", None), _MARK, False)


def attention_call(m, cfg: QuantConfig, args, kwargs):
  """Runs the attention module ``m`` with quantized ``q.k`` / ``p.v`` (``cfg``'s activation
  settings), or returns ``NotImplemented`` when they stay float (see :func:`float_reason`)."""
  if float_reason(m, cfg) is not None:
    return NotImplemented
  quantized = m.clone(
    parent=m.scope, attention_fn=_quantized_attention_fn(LinenContext(m), cfg.act_quant)
  )
  return quantized(*args, **kwargs)


def check_attention_rule(m, cfg: QuantConfig | None, pattern: str | None) -> None:
  """An attention-only rule (``attention_matmuls=True``) must match attention modules only."""
  if (
    cfg is not None
    and cfg.attention_matmuls is True
    and not isinstance(m, nn.MultiHeadDotProductAttention)
  ):
    raise ValueError(
      f"layer {module_path(m)} ({type(m).__name__}) matches rule {pattern!r}, whose config has "
      "attention_matmuls=True (an attention-only rule), but it is not an attention module"
    )
