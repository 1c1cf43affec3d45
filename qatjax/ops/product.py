"""The product of a fake-quantized activation and weight, with the fake quantization recomputed
in the backward pass.

A float layer's backward pass keeps its input and its weight. Fake-quantizing both first and
letting autodiff save what the product needs would keep the fake-quantized copies as well (and
the quantizers' own residuals): about 1.7x (observers) to 2x (LSQ) the float layer's residual
bytes on an MLP. Here the fake quantization runs inside ``jax.checkpoint`` with nothing saved,
so the backward pass recomputes it from the float operands (a few elementwise operations) and
a quantized layer keeps what the float layer keeps; gradients are unchanged (the same
straight-through estimators, Esser et al. 2020 for the learned steps).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from qatjax.core.config import ActQuant, WeightQuant
from qatjax.ops.quantizers import WeightLayout, apply_act, apply_weight


def quantized_product(
  op: Callable,
  lhs,
  rhs,
  act_q: ActQuant | None,
  act_state,
  weight_q: WeightQuant | None,
  weight_state,
  layout: WeightLayout | None,
  enabled,
):
  """``op(fake_quant(lhs), fake_quant(rhs))`` from the quantizers' state (see
  :func:`qatjax.ops.quantizers.act_state` / ``weight_state``), rematerialized in the backward.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from qatjax.ops.product import quantized_product
    >>> from qatjax.ops.quantizers import weight_layout
    >>> spec = QuantConfig(8, None).weight_quant
    >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0]])
    >>> s = jnp.abs(w).max(axis=0, keepdims=True) / 127
    >>> y = quantized_product(jnp.dot, jnp.ones((1, 2)), w, None, None, spec, s,
    ...                       weight_layout(spec, w.shape, (0,)), True)
    >>> bool(jnp.allclose(y, jnp.ones((1, 2)) @ w, atol=1e-2))
    True
  """

  def product(lhs, rhs, act_state, weight_state, enabled):
    if act_q is not None:
      lhs = apply_act(lhs, act_q, act_state, enabled)
    if weight_q is not None:
      rhs = apply_weight(rhs, weight_q, weight_state, layout, enabled)
    return op(lhs, rhs)

  remat = jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)
  return remat(lhs, rhs, act_state, weight_state, enabled)
