"""``QLinear``, ``QLinearGeneral``, ``QEinsum``: drop-ins for ``nnx.Linear`` / ``LinearGeneral`` /
``Einsum``, thin users of the quantized ``dot_general`` (and of the einsum planned onto it)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax

from qatjax.nnx.context import QuantModule, custom_promotion
from qatjax.ops import dot_general as dot
from qatjax.ops import einsum as ops_einsum


def _add_bias(y, bias, shape=None):
  if bias is None:
    return y
  b = jnp.asarray(bias.get_value(), y.dtype)
  return y + (b if shape is None else b.reshape(shape))


class QLinear(nnx.Linear, QuantModule):
  """A quantized ``nnx.Linear``: same arguments, same ``kernel`` / ``bias`` parameters.

  The input is fake-quantized with the activation quantizer and the kernel with the weight
  quantizer of ``config``; after :func:`qatjax.nnx.convert` the same module runs the integer
  kernel of :func:`qatjax.ops.dot_general.dot_general` (what Linen's ``QDense`` runs). With
  ``config=None`` it computes exactly ``nnx.Linear``.

  Args:
    in_features, out_features: as ``nnx.Linear``.
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None``.
    use_running_average: observers frozen (``model.eval()`` sets it, ``model.train()`` clears it).
    **kwargs: ``nnx.Linear``'s other arguments (``use_bias``, ``dtype``, ``param_dtype``,
      ``precision``, ``kernel_init``, ``bias_init``, ``rngs``, ...). A custom ``dot_general``,
      ``promote_dtype`` or ``preferred_element_type`` cannot be quantized (``ValueError``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, init_quantizers
    >>> layer = QLinear(3, 4, config=QuantConfig(weight_bits=8, act_bits=8), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((2, 3)))   # creates the observer's state
    >>> layer(jnp.ones((2, 3))).shape, int(layer.input_count[...])
    ((2, 4), 2)
  """

  def __init__(self, in_features, out_features, *, config=None, use_running_average=False, **kw):
    super().__init__(in_features, out_features, **kw)
    self.init_quant(config, use_running_average)

  @classmethod
  def unsupported(cls, module) -> str | None:
    if module.dot_general is not lax.dot_general:
      return "a custom dot_general"
    return custom_promotion(module)

  def __call__(self, inputs, out_sharding=None):
    """Applies the (quantized) linear transformation to the last axis of ``inputs``."""
    self.reject_out_sharding(out_sharding)
    ctx = self.quant_context
    kernel = self.kernel.get_value()
    if inputs.shape[-1] != kernel.shape[0]:
      raise ValueError(
        f"layer {ctx.path}: input feature size {inputs.shape[-1]} does not match its kernel, "
        f"which expects {kernel.shape[0]}"
      )
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    y = dot.dot_general(
      ctx, inputs, kernel, dims, *self.quant_specs(), precision=self.precision, dtype=self.dtype
    )
    return _add_bias(y, self.bias)


class QLinearGeneral(nnx.LinearGeneral, QuantModule):
  """A quantized ``nnx.LinearGeneral`` (attention projections to ``(heads, head_dim)``).

  The kernel keeps its shape (``in_features + out_features``) in training and after conversion;
  weights get one scale per output element (per channel) or one per tensor; per-group scales need
  a single contracting ``axis``. ``batch_axis``, a custom ``dot_general`` / ``dot_general_cls``,
  ``promote_dtype`` or ``preferred_element_type`` cannot be quantized (``ValueError``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinearGeneral, init_quantizers
    >>> layer = QLinearGeneral(8, (2, 4), config=QuantConfig(), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((3, 8)))
    >>> layer.kernel.shape, layer(jnp.ones((3, 8))).shape
    ((8, 2, 4), (3, 2, 4))
  """

  def __init__(self, in_features, out_features, *, config=None, use_running_average=False, **kw):
    super().__init__(in_features, out_features, **kw)
    self.init_quant(config, use_running_average)

  @classmethod
  def unsupported(cls, module) -> str | None:
    if module.batch_axis:
      return "batch_axis"
    if module.dot_general is not None or module.dot_general_cls is not None:
      return "a custom dot_general"
    return custom_promotion(module)

  def __call__(self, inputs, out_sharding=None):
    """Contracts ``axis`` of ``inputs`` with the (quantized) kernel."""
    self.reject_out_sharding(out_sharding)
    ctx = self.quant_context
    axis = tuple(sorted(a % inputs.ndim for a in self.axis))  # as nnx.LinearGeneral
    in_shape = tuple(inputs.shape[a] for a in axis)
    kernel = self.kernel.get_value()
    if tuple(kernel.shape[: len(axis)]) != in_shape:
      raise ValueError(
        f"layer {ctx.path}: input shape {in_shape} does not match its kernel, which expects "
        f"{tuple(kernel.shape[: len(axis)])}"
      )
    wq, aq = self.quant_specs()
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    y = dot.dot_general(
      ctx, inputs, kernel, dims, wq, aq, precision=self.precision, dtype=self.dtype
    )
    return _add_bias(y, self.bias)


class QEinsum(nnx.Einsum, QuantModule):
  """A quantized ``nnx.Einsum`` of the input and its kernel, served by the quantized
  ``dot_general`` (:func:`qatjax.ops.einsum.einsum`): scales per output index of the kernel.

  Equations the op cannot serve (an index summed within one operand, ``...`` in the kernel,
  repeated indices) raise a ``ValueError`` naming the layer; so does a custom ``einsum_op``,
  ``promote_dtype`` or ``preferred_element_type``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QEinsum, init_quantizers
    >>> layer = QEinsum("btd,dnh->btnh", (8, 2, 4), (2, 4), config=QuantConfig(),
    ...                 rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((1, 5, 8)))
    >>> layer(jnp.ones((1, 5, 8))).shape
    (1, 5, 2, 4)
  """

  def __init__(
    self, einsum_str, kernel_shape, bias_shape=None, *, config=None, use_running_average=False, **kw
  ):
    super().__init__(einsum_str, kernel_shape, bias_shape, **kw)
    self.init_quant(config, use_running_average)

  @classmethod
  def unsupported(cls, module) -> str | None:
    if module.einsum_op is not jnp.einsum:
      return "a custom einsum_op"
    return custom_promotion(module)

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    """``einsum(einsum_str, inputs, kernel) + bias`` with the operands quantized."""
    self.reject_out_sharding(out_sharding)
    ctx = self.quant_context
    eq = (einsum_str if einsum_str is not None else self.einsum_str).replace(" ", "")
    kernel = self.kernel.get_value()
    y = ops_einsum.einsum(
      ctx, eq, inputs, kernel, *self.quant_specs(), precision=self.precision, dtype=self.dtype
    )
    if self.bias is None:
      return y
    plan = ops_einsum.plan_einsum(eq, inputs.shape, kernel.shape, ctx.path)
    shape = tuple(1 if a is None else kernel.shape[a] for a in plan.rhs_out_axes)
    return _add_bias(y, self.bias, shape)
