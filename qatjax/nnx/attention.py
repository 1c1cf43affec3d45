"""``QMultiHeadAttention``: ``nnx.MultiHeadAttention`` with its two activation x activation
matmuls (``q.k`` and ``p.v``) quantized by :func:`qatjax.ops.attention.act_einsum`.

Its ``query`` / ``key`` / ``value`` / ``out`` projections are ``nnx.LinearGeneral`` layers,
quantized by their own rules (``quantize_model`` turns them into ``QLinearGeneral``). NNX's
``dot_product_attention`` has no einsum hook, so the quantized module runs
:func:`quantized_dot_product_attention`: the same steps as Flax's (query scaled by
``1 / sqrt(depth)``, bias, mask, softmax, dropout) in the order Linen's attention runs them,
so a Linen and an NNX transformer with the same weights compute the same numbers. Both operands
of both products are quantized with the activation settings of ``config``; their state lives
in the attention module itself (``attn_q_*``, ``attn_k_*``, ``attn_p_*``, ``attn_v_*``), and
``convert`` records the integer kernel's marker and frozen scales there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from qatjax.core.config import ActQuant, QuantConfig
from qatjax.nnx.context import QuantModule
from qatjax.ops.attention import act_einsum, config_float_reason
from qatjax.ops.registry import ATTENTION_SITES


def float_reason(cfg: QuantConfig | None) -> str | None:
  """Why the two matmuls stay float under ``cfg`` (``None``: they are quantized)."""
  return "config=None" if cfg is None else config_float_reason(cfg)


def quantized_dot_product_attention(
  ctx,
  act_q: ActQuant,
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  broadcast_dropout: bool = True,
  dropout_rng=None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype=None,
  precision=None,
  module=None,
  is_causal: bool = False,
):
  """``nnx.dot_product_attention`` with ``q.k`` and ``p.v`` quantized (``ctx`` holds the state).

  Grouped-query attention (fewer key / value heads than query heads) repeats the key and value
  heads, which quantizes them exactly as the grouped einsum would see them.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QMultiHeadAttention, init_quantizers
    >>> from qatjax.nnx.attention import quantized_dot_product_attention
    >>> dynamic = QuantConfig(8, 8, act_calibration="dynamic")   # scales from each tensor
    >>> module = QMultiHeadAttention(2, 8, config=dynamic, decode=False, rngs=nnx.Rngs(0))
    >>> init_quantizers(module, jnp.ones((1, 4, 8)))
    >>> q = k = v = jnp.ones((1, 4, 2, 4))   # (batch, length, heads, head_dim)
    >>> out = quantized_dot_product_attention(
    ...   module.quant_context, dynamic.act_quant, q, k, v, is_causal=True)
    >>> out.shape
    (1, 4, 2, 4)
  """
  query, key, value = dtypes.promote_dtype((query, key, value), dtype=dtype)
  dtype = query.dtype
  if key.shape[-2] != query.shape[-2]:
    n_rep = query.shape[-2] // key.shape[-2]
    key, value = jnp.repeat(key, n_rep, axis=-2), jnp.repeat(value, n_rep, axis=-2)
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  qk_sites, pv_sites = ATTENTION_SITES
  weights = act_einsum(
    ctx, "...qhd,...khd->...hqk", query, key, act_q, qk_sites, precision=precision
  )
  if bias is not None:
    weights = weights + bias
  if is_causal:
    t, s = weights.shape[-2:]
    causal = jnp.tril(jnp.ones((t, s), dtype=bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    weights = jnp.where(mask, weights, jnp.finfo(dtype).min)
  weights = jax.nn.softmax(weights).astype(dtype)
  if module is not None:
    module.sow(nnx.Intermediate, "attention_weights", weights)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = (1,) * (key.ndim - 2) + weights.shape[-2:] if broadcast_dropout else weights.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
  return act_einsum(
    ctx, "...hqk,...khd->...qhd", weights, value, act_q, pv_sites, precision=precision
  )


class QMultiHeadAttention(nnx.MultiHeadAttention, QuantModule):
  """An ``nnx.MultiHeadAttention`` whose ``q.k`` and ``p.v`` products are quantized.

  Same arguments and submodules as ``nnx.MultiHeadAttention`` (``query``, ``key``, ``value``,
  ``out``: quantize them with :class:`QLinearGeneral` rules, as :func:`quantize_model` does).
  The two activation x activation matmuls use the activation settings of ``config`` (static
  observers, LSQ steps or dynamic scales); with ``config=None``, a weight-only config, PACT or
  ``attention_matmuls=False`` they stay float and :func:`qatjax.nnx.coverage` says why.
  After :func:`qatjax.nnx.convert` they run int8 x int8 -> int32 (Jacob et al. 2018).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QMultiHeadAttention, init_quantizers
    >>> attn = QMultiHeadAttention(2, 8, config=QuantConfig(8, 8), decode=False,
    ...                            rngs=nnx.Rngs(0))
    >>> init_quantizers(attn, jnp.ones((1, 5, 8)))
    >>> sorted(k for k in vars(attn) if k.startswith("attn_") and k.endswith("_max"))
    ['attn_k_max', 'attn_p_max', 'attn_q_max', 'attn_v_max']
  """

  def __init__(self, num_heads, in_features, *args, config=None, use_running_average=False, **kw):
    super().__init__(num_heads, in_features, *args, **kw)
    self.init_quant(config, use_running_average)

  @classmethod
  def unsupported(cls, module) -> str | None:
    if module.attention_fn is not nnx.dot_product_attention:
      return "a custom attention_fn (only flax's dot_product_attention is quantized)"
    return None

  def set_view(
    self,
    use_running_average: bool | None = None,
    deterministic: bool | None = None,
    decode: bool | None = None,
    batch_size=None,
    max_length=None,
  ):
    """``nnx.view`` support: the observers' mode and ``nnx.MultiHeadAttention``'s own."""
    QuantModule.set_view(self, use_running_average)
    return nnx.MultiHeadAttention.set_view(self, deterministic, decode, batch_size, max_length)

  def __call__(self, *args, **kwargs):
    """As ``nnx.MultiHeadAttention.__call__``, with ``q.k`` and ``p.v`` quantized."""
    cfg = self.quant_config
    if float_reason(cfg) is not None:
      return super().__call__(*args, **kwargs)
    ctx, act_q = self.quant_context, cfg.act_quant
    float_fn = vars(self)["attention_fn"]

    def attention_fn(query, key, value, bias=None, mask=None, **kw):
      return quantized_dot_product_attention(ctx, act_q, query, key, value, bias, mask, **kw)

    # MultiHeadAttention reads self.attention_fn; swap it for this call only (a static
    # attribute, restored before the call returns, so the module's graph never changes).
    vars(self)["attention_fn"] = attention_fn
    try:
      return super().__call__(*args, **kwargs)
    finally:
      vars(self)["attention_fn"] = float_fn
