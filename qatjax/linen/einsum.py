"""``QEinsum``: a drop-in for ``nn.Einsum``, a thin user of the quantized einsum."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules, resolve
from qatjax.linen.context import LinenContext, module_path, weight_param
from qatjax.ops import einsum as ops_einsum

default_kernel_init = nn.initializers.lecun_normal()


def einsum_call(m, inputs, einsum_str: str | None, cfg: QuantConfig | None):
  """``nn.Einsum.__call__`` with quantization, on any bound module with Einsum's fields.

  The kernel's output indices get one scale each (per channel); groups run along its last
  contracted index.
  """
  eq = nn.merge_param("einsum_str", m.einsum_str, einsum_str)
  shape = tuple(m.shape)
  plan = ops_einsum.plan_einsum(eq, inputs.shape, shape, module_path(m))

  def check(stored):
    if stored != shape:
      raise ValueError(
        f"layer {module_path(m)}: kernel of shape {stored} does not match shape={shape}"
      )

  kernel = weight_param(m, "kernel", m.kernel_init, shape, m.param_dtype, check=check)
  bias = None
  if m.use_bias:
    bias_shape = tuple(shape[a] for a in plan.rhs_out_axes if a is not None)
    bias = m.param("bias", m.bias_init, bias_shape, m.param_dtype)
  wq, aq = (None, None) if cfg is None else (cfg.weight_quant, cfg.act_quant)
  y = ops_einsum.einsum(
    LinenContext(m), eq, inputs, kernel, wq, aq, precision=m.precision, dtype=m.dtype
  )
  if bias is not None:
    bshape = tuple(1 if a is None else shape[a] for a in plan.rhs_out_axes)
    y = y + jnp.asarray(bias, y.dtype).reshape(bshape)
  return y


class QEinsum(nn.Module):
  """A quantized ``nn.Einsum``: same fields, same ``kernel`` / ``bias`` parameters.

  ``einsum_str`` has two operands, the input and the kernel (``"btd,dnh->btnh"``); the kernel is
  quantized with one scale per output index (per channel), per tensor, or per group along its
  last contracted index, and the input with the activation settings of ``config``. After
  :func:`qatjax.convert` it runs the integer ``dot_general`` of ``QDense``.

  Attributes:
    shape: the kernel's shape.
    einsum_str: the equation (or pass it to ``__call__``).
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None`` (plain ``nn.Einsum``).
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.Einsum``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QEinsum((8, 2, 4), "btd,dnh->btnh", config=QuantConfig(4, 8))
    >>> v = layer.init(jax.random.key(0), jnp.ones((1, 3, 8)))
    >>> layer.apply(v, jnp.ones((1, 3, 8))).shape, v["params"]["bias"].shape
    ((1, 3, 2, 4), (2, 4))
  """

  shape: tuple[int, ...]
  einsum_str: str | None = None
  config: QuantConfig | QuantRules | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs, einsum_str: str | None = None):
    """Applies the (quantized) einsum of ``inputs`` with the kernel."""
    return einsum_call(self, inputs, einsum_str, resolve(self.config, module_path(self)))
