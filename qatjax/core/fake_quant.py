"""Fake quantization (quantize, clip, dequantize) with straight-through estimators.

The ``custom_vjp`` kernels below work on a scale and zero point that already broadcast against
``x``; the public functions validate arguments and expand per-channel / per-group parameters
*outside* the kernels, so JAX's own autodiff sums the per-element scale and zero-point gradients
back to their shapes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qatjax.core.granularity import check_axis, check_group_size, expand_qparam
from qatjax.core.ranges import EPS, check_bits, check_qrange


def _round(v, noise, stochastic: bool):
  # jnp.round rounds half to even, as torch.round / nearbyint do.
  return jnp.floor(v + noise) if stochastic else jnp.round(v)


def _unbroadcast(g, shape):
  """Sums ``g`` down to ``shape`` (reverse of broadcasting ``shape`` to ``g.shape``)."""
  if g.shape == tuple(shape):
    return g
  lead = g.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
    lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1
  )
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


# Each kernel takes ``on``, a boolean scalar: where it is false the kernel is the identity (its
# forward returns x, dy passes to x unchanged, the parameters get no gradient). A layer's
# ``enabled`` flag gated outside (``where(enabled, fq(x), x)``) would cost the backward pass two
# selects and a sum over every element of x (LM W4A8 step: 1.5 ms of 37).


def _no_tangent(on):
  return np.zeros(np.shape(on), jax.dtypes.float0)


def _quantize_dequantize(x, scale, zero_point, noise, on, qmin, qmax, stochastic):
  q = _round(x * (1.0 / scale), noise, stochastic) + zero_point
  return jnp.where(on, (jnp.clip(q, qmin, qmax) - zero_point) * scale, x)


def _kernel(backward):
  """``_quantize_dequantize`` with the derivatives ``backward(qmin, qmax, stochastic, residuals,
  dy)`` gives, from the residuals ``(x, scale, zero_point, noise, on)``."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
  def kernel(x, scale, zero_point, noise, on, qmin, qmax, stochastic):
    return _quantize_dequantize(x, scale, zero_point, noise, on, qmin, qmax, stochastic)

  def forward(x, scale, zero_point, noise, on, qmin, qmax, stochastic):
    y = kernel(x, scale, zero_point, noise, on, qmin, qmax, stochastic)
    return y, (x, scale, zero_point, noise, on)

  kernel.defvjp(forward, backward)
  return kernel


# --- clipped STE: gradient to x only -------------------------------------------------------------


def _fq_ste_bwd(qmin, qmax, stochastic, res, g):
  x, scale, zero_point, noise, on = res
  q = _round(x * (1.0 / scale), noise, stochastic) + zero_point
  passes = ((q >= qmin) & (q <= qmax)) | ~on
  return (
    jnp.where(passes, g, jnp.zeros_like(g)),
    jnp.zeros_like(scale),
    jnp.zeros_like(zero_point),
    jnp.zeros_like(noise),
    _no_tangent(on),
  )


_fq_ste = _kernel(_fq_ste_bwd)


# --- unclipped STE: for a scale and zero point computed from x's own range -----------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fq_pass(x, scale, zero_point, on, qmin, qmax):
  noise = jnp.zeros((), x.dtype)
  return _quantize_dequantize(x, scale, zero_point, noise, on, qmin, qmax, False)


def _fq_pass_fwd(x, scale, zero_point, on, qmin, qmax):
  return _fq_pass(x, scale, zero_point, on, qmin, qmax), (scale, zero_point, on)


def _fq_pass_bwd(qmin, qmax, res, g):
  scale, zero_point, on = res
  return g, jnp.zeros_like(scale), jnp.zeros_like(zero_point), _no_tangent(on)


_fq_pass.defvjp(_fq_pass_fwd, _fq_pass_bwd)


# --- LSQ / LSQ+: gradients to x, scale and zero point ---------------------------------------------


def _fq_lsq_bwd(qmin, qmax, stochastic, res, g):
  x, scale, zero_point, noise, on = res
  v = x * (1.0 / scale)
  r = _round(v, noise, stochastic)
  q = r + zero_point
  below, above = q < qmin, q > qmax
  in_range = (q >= qmin) & (q <= qmax)  # False for NaN: NaN inputs get no gradient at all.
  zero = jnp.zeros_like(g)
  dx = jnp.where(in_range | ~on, g, zero)
  ds = g * jnp.where(
    below, qmin - zero_point, jnp.where(above, qmax - zero_point, jnp.where(in_range, r - v, zero))
  )
  dz = jnp.where(below | above, -g * scale, zero)
  # Gated after the sums: a select on the (small) parameter gradients, not on every element.
  ds = jnp.where(on, _unbroadcast(ds, scale.shape), 0.0)
  dz = jnp.where(on, _unbroadcast(dz, zero_point.shape), 0.0)
  return dx, ds, dz, jnp.zeros_like(noise), _no_tangent(on)


_fq_lsq = _kernel(_fq_lsq_bwd)


@jax.custom_vjp
def _scale_grad(p, factor):
  return p


def _scale_grad_fwd(p, factor):
  return p, factor


def _scale_grad_bwd(factor, g):
  return g * factor, jnp.zeros_like(factor)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _round_ste(p, lo, hi):
  """``clip(round(p), lo, hi)`` forward, identity gradient (PyTorch's learnable fake quant does
  not mask the zero-point gradient; a clip with its own gradient would halve it at ``z == lo``)."""
  return p + jax.lax.stop_gradient(jnp.clip(jnp.round(p), lo, hi) - p)


# --- public API ----------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _clamp_ste(scale, eps):
  return jnp.maximum(scale, eps)


@_clamp_ste.defjvp
def _clamp_ste_jvp(eps, primals, tangents):
  (scale,), (ds,) = primals, tangents
  return _clamp_ste(scale, eps), ds


def clamp_scale(scale, eps: float = EPS):
  """``max(scale, eps)`` forward with a straight-through gradient (``d/ds = 1`` everywhere).

  A zero or negative scale never divides by zero, and a *learned* scale (LSQ's step, PACT's
  alpha) that an optimizer update pushed to or below ``eps`` still gets the gradient it would get
  at ``eps``, so it can climb back: with ``jnp.maximum`` its gradient would be exactly 0 there and
  the quantizer would stay dead for the rest of training. PyTorch gets the same effect by clamping
  ``scale.data`` in place and keeping the gradient. Scales that carry no gradient (observer
  ranges, :func:`fake_quant`'s clipped STE, :func:`quantize`) see only the forward.

  Example:
    >>> clamp_scale(jnp.float32(-0.01)) == EPS
    Array(True, dtype=bool)
    >>> jax.grad(lambda s: clamp_scale(s) * 3.0)(jnp.float32(-0.01))
    Array(3., dtype=float32)
  """
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    scale = scale.astype(jnp.float32)
  return _clamp_ste(scale, eps)


def _prepare(x, scale, zero_point, qmin, qmax, axis, group_size, key, eps):
  check_qrange(qmin, qmax)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
  axis = check_axis(axis, x.ndim)
  if group_size is not None:
    check_group_size(group_size)
  if zero_point is None:
    zero_point = jnp.zeros_like(jnp.asarray(scale, jnp.float32))
  s = expand_qparam(scale, x.shape, axis, group_size, "scale")
  z = expand_qparam(zero_point, x.shape, axis, group_size, "zero_point")
  s = clamp_scale(s, eps)
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xc = x.astype(compute)
  if key is None:
    noise = jnp.zeros((), compute)
  else:
    noise = jax.random.uniform(key, x.shape, compute)
  return x.dtype, xc, s.astype(compute), z.astype(compute), noise, key is not None


def _learned(xc, s, z, noise, qmin, qmax, stochastic, grad_scale, learn_zp, on=True):
  """The LSQ kernel on broadcast parameters: rounded zero point, scaled parameter gradients."""
  z = _round_ste(z, qmin, qmax)
  gf = jnp.asarray(grad_scale, xc.dtype)
  s = _scale_grad(s, gf)
  z = _scale_grad(z, gf)
  if not learn_zp:
    z = jax.lax.stop_gradient(z)
  return _fq_lsq(xc, s, z, noise, jnp.asarray(on, bool), qmin, qmax, stochastic)


def broadcast_fake_quant(
  x,
  scale,
  zero_point,
  qmin: int,
  qmax: int,
  *,
  learned: bool = False,
  grad_scale=1.0,
  eps: float = EPS,
  covers_range: bool = False,
  enabled=True,
):
  """:func:`fake_quant` (or, ``learned=True``, :func:`lsq_fake_quant`) for parameters that already
  broadcast against ``x``, of any shape (e.g. one scale per output element of an N-D kernel).

  No validation: the quantized ops call it with shapes they built. ``zero_point=None`` is a
  fixed 0 (no gradient). ``covers_range=True`` (not learned) says that the scale and zero point
  were computed from ``x``'s own range (a weight's ``max |w| / qmax``, a dynamic activation's
  per-token or per-tensor min and max), so that no element lies outside the quantization range:
  the backward pass then passes ``dy`` to every element without an in-range mask. (With an
  affine range the zero point is rounded, which at a half-way tie can put an extreme of ``x``
  one step past ``qmin`` / ``qmax``: the forward clips it, as the integer model does, and its
  gradient still flows, as qwix's; torchao's per-token fake quant masks it.)

  ``enabled``: a boolean (traced or not); where false the result is ``x`` itself, its gradient
  passes unchanged and the parameters get none (a layer whose quantization is off), decided
  inside the straight-through estimator rather than by a select around it.
  """
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xc = x.astype(compute)
  s = clamp_scale(jnp.asarray(scale, jnp.float32), eps).astype(compute)
  learn_zp = zero_point is not None
  z = jnp.zeros_like(s) if zero_point is None else jnp.asarray(zero_point, compute)
  noise = jnp.zeros((), compute)
  on = jnp.asarray(enabled, bool)
  if learned:
    y = _learned(xc, s, z, noise, qmin, qmax, False, grad_scale, learn_zp, on)
  elif covers_range:
    y = _fq_pass(xc, s, z, on, qmin, qmax)
  else:
    y = _fq_ste(xc, s, z, noise, on, qmin, qmax, False)
  return y.astype(x.dtype)


def fake_quant(
  x,
  scale,
  zero_point,
  qmin: int,
  qmax: int,
  *,
  axis: int | None = None,
  group_size: int | None = None,
  key=None,
  eps: float = EPS,
):
  """Quantize-dequantize with a clipped straight-through estimator.

  Forward (PyTorch's ``fake_quantize_per_tensor_affine`` / ``_per_channel_affine``)::

    q = round_half_to_even(x * (1 / scale)) + zero_point
    y = (clip(q, qmin, qmax) - zero_point) * scale

  Backward: ``dy`` where ``qmin <= q <= qmax`` (on the rounded, unclipped ``q``), 0 elsewhere; no
  gradient to ``scale`` or ``zero_point`` (use :func:`lsq_fake_quant` to learn them).

  Granularity:
    * ``axis=None``: per-tensor, scalar ``scale`` / ``zero_point``.
    * ``axis=k``: per-channel, 1-D parameters of length ``x.shape[k]``.
    * ``axis=k, group_size=g``: per-group, blocks of ``g`` consecutive elements along ``k``;
      parameters of shape ``x.shape`` with dim ``k`` replaced by ``ceil(x.shape[k] / g)`` (other
      dims may be 1), or 1-D of length ``ceil(x.shape[k] / g)``. A short last group works.

  Special values: ``scale <= eps`` is clamped to ``eps`` (never NaN); NaN inputs give NaN outputs
  and zero gradient; ``+inf`` / ``-inf`` saturate to the ends of the range with zero gradient.

  Args:
    x: floating-point array.
    scale: step size(s).
    zero_point: integer-valued zero point(s) (float or int dtype); ``None`` means 0.
    qmin: smallest integer, a Python int.
    qmax: largest integer, a Python int (``qmin < qmax``).
    axis: channel / group axis, or ``None`` for per-tensor.
    group_size: group length along ``axis`` for per-group quantization.
    key: a ``jax.random`` key for stochastic rounding (``floor(v + U[0, 1))``); ``None`` rounds
      to nearest, ties to even.
    eps: smallest scale.

  Returns:
    Array of ``x``'s shape and dtype whose values lie on the grid ``(k - zero_point) * scale``.

  Raises:
    ValueError: ``qmin >= qmax``, ``axis`` out of range, a parameter shape that does not match the
      granularity, or ``group_size < 1``.

  Example:
    >>> x = jnp.array([-1.3, 0.26, 0.5, 9.0])
    >>> fake_quant(x, 0.5, 0, -4, 3)
    Array([-1.5,  0.5,  0.5,  1.5], dtype=float32)
  """
  dtype, xc, s, z, noise, stochastic = _prepare(
    x, scale, zero_point, qmin, qmax, axis, group_size, key, eps
  )
  return _fq_ste(xc, s, z, noise, jnp.bool_(True), qmin, qmax, stochastic).astype(dtype)


def lsq_fake_quant(
  x,
  scale,
  zero_point,
  qmin: int,
  qmax: int,
  *,
  axis: int | None = None,
  group_size: int | None = None,
  grad_scale=1.0,
  key=None,
  eps: float = EPS,
):
  """Fake quantization with a learned step size (LSQ) and learned offset (LSQ+).

  Esser et al. 2020, "Learned Step Size Quantization" (ICLR); Bhalgat et al. 2020, "LSQ+:
  Improving low-bit quantization through learnable offsets and better initialization" (CVPRW).

  Forward as :func:`fake_quant`, after rounding the zero point to an integer and clipping it into
  ``[qmin, qmax]`` (straight-through). Gradients match PyTorch's
  ``_fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine`` with
  ``grad_factor=grad_scale`` for integer zero points::

    dx = dy * [qmin <= q <= qmax]
    ds = grad_scale * sum(dy * (qmin - z     if q < qmin
                                qmax - z     if q > qmax
                                round(v) - v otherwise)),   v = x / s
    dz = grad_scale * sum(dy * (-s if q out of range else 0))

  summed over every axis the parameter does not have. ``grad_scale`` never scales ``dx``.

  Args:
    x: floating-point array.
    scale: learned step size(s), shaped as for :func:`fake_quant`.
    zero_point: learned offset(s), or ``None`` for a fixed 0 (symmetric LSQ).
    qmin: smallest integer.
    qmax: largest integer.
    axis: channel / group axis, or ``None``.
    group_size: group length for per-group scales.
    grad_scale: gradient factor for scale and zero point; :func:`lsq_grad_scale` gives LSQ's.
    key: PRNG key for stochastic rounding, or ``None``.
    eps: smallest scale. The clamp is straight-through (:func:`clamp_scale`): a step at or below
      ``eps`` is used as ``eps`` in the forward and still gets the gradient, so it can recover.

  Returns:
    The fake-quantized array.

  Example:
    >>> x = jnp.array([-5.0, 0.3, 0.8, 5.0])
    >>> lsq_fake_quant(x, 1.0, None, -4, 3)
    Array([-4.,  0.,  1.,  3.], dtype=float32)
    >>> ds = jax.grad(lambda s: lsq_fake_quant(x, s, None, -4, 3).sum())(1.0)
    >>> round(float(ds), 4)  # qmin + (round(0.3) - 0.3) + (round(0.8) - 0.8) + qmax
    -1.1
  """
  learn_zp = zero_point is not None
  if not learn_zp:
    zero_point = jnp.zeros_like(jnp.asarray(scale, jnp.float32))
  dtype, xc, s, z, noise, stochastic = _prepare(
    x, scale, zero_point, qmin, qmax, axis, group_size, key, eps
  )
  return _learned(xc, s, z, noise, qmin, qmax, stochastic, grad_scale, learn_zp).astype(dtype)


def lsq_grad_scale(numel: int, qmax: int) -> float:
  """LSQ's gradient scale ``1 / sqrt(numel * qmax)`` (Esser et al. 2020, section 2.2).

  ``numel`` is the number of elements that share one step size: the weight tensor's size for a
  per-tensor weight scale (PyTorch uses the whole tensor even per channel), the features per
  example for an activation.

  Example:
    >>> round(lsq_grad_scale(100, 127), 6)
    0.008874
  """
  return 1.0 / math.sqrt(max(int(numel), 1) * max(int(qmax), 1))


def lsq_init_scale(x, qmax: int, *, axis: int | None = None, eps: float = EPS):
  """LSQ's initial step size ``2 * mean(|x|) / sqrt(qmax)`` (Esser et al. 2020).

  Args:
    x: the tensor (weights, or a first batch of activations).
    qmax: largest integer of the range.
    axis: keep one step per index of this axis (per channel), or ``None`` for one scalar.
    eps: smallest result.

  Example:
    >>> float(lsq_init_scale(jnp.array([1.0, -3.0]), 4))
    2.0
  """
  x = jnp.asarray(x, jnp.float32)
  axis = check_axis(axis, x.ndim)
  axes = None if axis is None else tuple(d for d in range(x.ndim) if d != axis)
  return clamp_scale(2.0 * jnp.mean(jnp.abs(x), axis=axes) / math.sqrt(qmax), eps)


def pact(x, alpha, bits: int, *, eps: float = EPS):
  """PACT: clip activations to a learned ``[0, alpha]`` and quantize unsigned.

  Choi et al. 2018, "PACT: Parameterized Clipping Activation for Quantized Neural Networks".
  ``y = round(clip(x, 0, alpha) / s) * s`` with ``s = alpha / (2**bits - 1)``. Gradients follow the
  paper's straight-through estimator: ``dx = dy`` for ``0 <= x < alpha`` (else 0) and
  ``dalpha = sum(dy where x >= alpha)``.

  Args:
    x: pre-activation array (PACT replaces the ReLU).
    alpha: learned clipping level, a scalar (or broadcastable) array; clamped to at least ``eps``
      in the forward, straight-through in the backward (:func:`clamp_scale`), so an alpha pushed
      below ``eps`` still gets ``dalpha`` and can recover.
    bits: 2..8.
    eps: smallest alpha.

  Example:
    >>> pact(jnp.array([-1.0, 0.2, 5.0]), jnp.float32(1.0), 2)
    Array([0.        , 0.33333334, 1.        ], dtype=float32)
  """

  check_bits(bits)
  qmax = 2**bits - 1
  alpha = clamp_scale(jnp.asarray(alpha, jnp.float32), eps)
  x = jnp.asarray(x)
  # where(x >= 0, x, 0), not maximum(x, 0): maximum splits the gradient 0.5/0.5 at x == 0.
  y = jnp.where(x < alpha, jnp.where(x >= 0, x, jnp.zeros_like(x)), alpha.astype(x.dtype))
  s = jax.lax.stop_gradient(alpha / qmax)
  yq = jnp.round(y / s) * s
  return y + jax.lax.stop_gradient(yq - y)
