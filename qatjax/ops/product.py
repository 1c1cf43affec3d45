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

import contextlib
import contextvars
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from qatjax.core.config import ActQuant, WeightQuant
from qatjax.core.exact_dot import bf16_matmul_fast, exact_in_bf16
from qatjax.core.int_kernels import rescaled
from qatjax.ops.act_quantizers import (
  apply_act,
)
from qatjax.ops.coverage import AUXILIARY_SCOPE
from qatjax.ops.weight_quantizers import (
  WeightLayout,
  apply_weight,
)


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
  :func:`qatjax.ops.act_quantizers.act_state` / ``weight_quantizers.weight_state``),
  rematerialized in the backward.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from qatjax.ops.product import quantized_product
    >>> from qatjax.ops.weight_quantizers import weight_layout
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


def integer_forward(
  product: Callable,
  integer: Callable,
  lhs,
  rhs,
  act_state,
  weight_state,
  enabled,
  *,
  differentiated: bool = True,
):
  """The value of the converted model's integer arithmetic, the derivatives of ``product``.

  ``integer(lhs, rhs, act_state, weight_state)`` returns ``(value, ready)``: a function of no
  arguments computing ``(v, factors)``, what the integer kernel computes from the same integers
  and scales (``y``, the product's output shape, is ``rescaled(v, factors)`` reshaped), and
  whether the activation quantizer is set. While the layer is enabled and ready the forward value
  is ``y`` (``value()`` is traced inside the branch that returns it, so that its output is not
  copied; the last multiply, by the factors, comes after the branch, so that XLA fuses it with
  what follows as it does in the converted model: a bias add becomes one multiply-add in both);
  otherwise (and always for the derivatives: the straight-through estimators) it is
  ``product(lhs, rhs, act_state, weight_state, enabled)``, the fake-quantized product (times
  factors of one), equal to ``y`` up to float rounding. With ``differentiated=False`` the integer
  value is the forward value only where no derivative is taken (``jax.grad`` and ``jax.vjp`` see
  the fake-quantized product's value as well as its derivatives).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from qatjax.ops.product import integer_forward
    >>> fake = lambda x, w, a, s, e: jnp.round(x) * w           # a toy "fake-quant" product
    >>> exact = lambda x, w, a, s: (lambda: (jnp.round(x) + 5e-4, (w,)), True)  # its "integer" twin
    >>> f = lambda x: integer_forward(fake, exact, x, 2.0, None, None, True)
    >>> float(f(1.2)), float(jax.grad(f)(1.2))   # exact's value, fake's gradient (round: 0)
    (2.000999927520752, 0.0)
  """

  @jax.custom_vjp
  def forward(lhs, rhs, act_state, weight_state, enabled):
    value, ready = integer(lhs, rhs, act_state, weight_state)
    args = (lhs, rhs, act_state, weight_state, enabled)
    out = jax.eval_shape(product, *args)
    v_shape, factor_shapes = jax.eval_shape(value)

    def exact():  # computed in the branch: a value from outside would be copied (LM step: 3 ms)
      v, factors = value()
      return v.astype(out.dtype), tuple(factors)

    def fake():
      with jax.named_scope(AUXILIARY_SCOPE):  # not a site of its own (coverage)
        y = product(*args).reshape(v_shape.shape).astype(out.dtype)
      return y, tuple(jnp.ones(f.shape, f.dtype) for f in factor_shapes)

    v, factors = lax.cond(enabled & ready, exact, fake)
    return rescaled(v, factors).reshape(out.shape).astype(out.dtype)

  def forward_fwd(*args):
    value, backward = jax.vjp(product, *args)
    if not differentiated:
      return value, backward
    return forward(*args), backward  # the product's value is unused (compiled away)

  def forward_bwd(backward, cotangent):
    return backward(cotangent)

  forward.defvjp(forward_fwd, forward_bwd)
  return forward(lhs, rhs, act_state, weight_state, enabled)


FORWARD_MODES = ("auto", "integer", "fake_quant")
_FORWARD = contextvars.ContextVar("qatjax_qat_forward", default="auto")


@contextlib.contextmanager
def qat_forward(mode: str):
  """Chooses how quantized matmuls compute their training forward value (at trace time).

  * ``"auto"`` (default): the integer forward where it is faster or needed, else the
    fake-quantized float product. Integer: int4 groups with quantized activations (the
    converted model's grouped kernel rounds differently from one float dot), and on CPUs with
    bfloat16 matrix instructions every ``dot_general`` whose weight and activation are quantized
    (their int32 products computed exactly on those units, :mod:`qatjax.core.exact_dot`).
    Where a derivative is taken (``jax.grad``, ``jax.vjp``: a train step), int4 groups and
    attention's activation x activation products take the fake-quant product's value instead,
    which is faster there (:func:`integer_when_differentiated`); evaluation, perplexity and
    generation keep the integer value, the converted model's output.
  * ``"integer"``: every such ``dot_general`` computes its forward value as the converted
    model's integer kernel does (int8 products where bfloat16 ones are not exact or not fast).
  * ``"fake_quant"``: the fake-quantized float product everywhere.

  The gradients are the same in every mode: the straight-through estimators of the fake
  quantization (Esser et al. 2020 for learned steps); the integer forward value equals the
  fake-quant one up to float rounding, and the converted model's output exactly. Layers with a
  non-float32 ``dtype`` or their own ``dot_general``, convolutions and embedding lookups always
  use the fake-quant product. ``jax.jit`` caches what it traced: set the mode before the first
  call of a step.

  Args:
    mode: one of ``"auto"``, ``"integer"``, ``"fake_quant"``.

  Raises:
    ValueError: for any other mode.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import qatjax
    >>> layer = qatjax.QDense(4, config=qatjax.QuantConfig(8, 8, act_calibration="dynamic"))
    >>> x = jnp.ones((2, 8))
    >>> v = layer.init(jax.random.key(0), x)
    >>> with qatjax.qat_forward("integer"):
    ...   y_int = layer.apply(v, x)
    >>> with qatjax.qat_forward("fake_quant"):
    ...   y_fake = layer.apply(v, x)
    >>> bool(jnp.allclose(y_int, y_fake, atol=1e-5))
    True
  """
  if mode not in FORWARD_MODES:
    raise ValueError(f"qat_forward: mode must be one of {FORWARD_MODES}, got {mode!r}")
  token = _FORWARD.set(mode)
  try:
    yield
  finally:
    _FORWARD.reset(token)


def computes_in_float32(lhs, rhs, dtype) -> bool:
  """Whether a layer with computation ``dtype`` (``None``: promoted from the operands) multiplies
  ``lhs`` and ``rhs`` in float32, the integer kernels' output type: the integer forward's
  precondition."""
  f32 = jnp.dtype(jnp.float32)
  return jnp.result_type(lhs, rhs) == f32 and (dtype is None or jnp.dtype(dtype) == f32)


INTEGER_KERNELS = ("per_channel", "grouped", "act_x_act")


def _checked(kernel: str) -> str:
  if kernel not in INTEGER_KERNELS:
    raise ValueError(f"kernel must be one of {INTEGER_KERNELS}, got {kernel!r}")
  return kernel


def integer_unit(k: int, amax_lhs: int, amax_rhs: int, kernel: str) -> str | None:
  """The integer forward's matrix unit under the current :func:`qat_forward` mode: ``"bf16"``
  (exact bfloat16 products), ``"int8"``, or ``None`` (the fake-quant product) for an integer
  ``kernel`` in :data:`INTEGER_KERNELS` contracting ``k`` integers of magnitude at most
  ``amax_lhs`` / ``amax_rhs``."""
  grouped = _checked(kernel) == "grouped"
  mode = _FORWARD.get()
  if mode == "fake_quant":
    return None
  bf16 = bf16_matmul_fast() and exact_in_bf16(k, amax_lhs, amax_rhs)
  if mode == "integer" or grouped:
    return "bf16" if bf16 else "int8"
  return "bf16" if bf16 else None


def integer_when_differentiated(kernel: str) -> bool:
  """Whether a differentiated forward pass (training) takes the integer value too
  (:func:`integer_forward`'s ``differentiated``) under the current :func:`qat_forward` mode, for
  an integer ``kernel`` in :data:`INTEGER_KERNELS`: always in ``"integer"`` mode; in ``"auto"``
  mode for the per-channel kernel only (measured faster than the fake-quant product in an MLP
  train step); the grouped kernel and attention's activation x activation product are slower
  there than the fake-quant product's single float dot (LM W4A8 train step on a 2-core AVX-512
  CPU: 1.25x float with the grouped kernel in training, 1.15x without, 1.08x without the
  act x act one either).

  Example:
    >>> with qat_forward("auto"):
    ...   integer_when_differentiated("per_channel"), integer_when_differentiated("grouped")
    (True, False)
  """
  return _FORWARD.get() == "integer" or _checked(kernel) == "per_channel"
