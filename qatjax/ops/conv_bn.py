"""BatchNorm folded into a quantized convolution: the math every ``QConvBN`` (Linen, NNX) runs.

Jacob et al. 2018 (section 3.2) and Krishnamoorthi 2018; the "approximate" path of PyTorch's
``ConvBn2d``. With ``f = gamma / sqrt(running_var + eps)`` (:func:`fold_factor`) the layer
fake-quantizes the kernel ``W * f``, divides the conv output by ``f`` and adds the conv bias,
``y = conv(x, fq(W f)) / f + b``; :func:`normalize` then applies BatchNorm to ``y``: with batch
statistics while training, with running statistics in evaluation or once ``bn_frozen`` is set.
In running mode the output is ``conv(x, fq(W f)) + beta - f * (mean - b)``, which is what the
converted integer layer computes with the kernel ``W f`` and :func:`folded_bias`. The frameworks
only keep the variables (``bn_scale``, ``bn_bias``, running ``mean`` / ``var``, ``bn_frozen``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fold_factor(gamma, running_var, epsilon: float):
  """``(f, f_safe)``: the per-channel fold factor and ``f`` with zeros replaced by 1 (the
  divisor of the conv output, so ``gamma = 0`` gives no NaN).

  Example:
    >>> from qatjax.ops.conv_bn import fold_factor
    >>> f, f_safe = fold_factor(jnp.array([2.0, 0.0]), jnp.array([3.0, 1.0]), 1.0)
    >>> f.tolist(), f_safe.tolist()
    ([1.0, 0.0], [1.0, 1.0])
  """
  f = gamma / jnp.sqrt(running_var + epsilon)
  return f, jnp.where(f == 0, 1.0, f)


def normalize(
  y,
  gamma,
  beta,
  running_mean,
  running_var,
  frozen,
  f,
  *,
  use_running_average: bool,
  momentum: float,
  epsilon: float,
):
  """BatchNorm of the folded conv's output ``y`` (channels last).

  Returns ``(out, running)``: ``running`` is ``None`` with ``use_running_average``, else the
  updated ``(mean, var)`` (unchanged where ``frozen``; ``momentum`` as ``nn.BatchNorm``'s). While
  ``frozen`` the output is the running-statistics one in training too.

  Example:
    >>> from qatjax.ops.conv_bn import normalize
    >>> y = jnp.array([[1.0], [3.0]])
    >>> one, zero = jnp.ones(1), jnp.zeros(1)
    >>> out, (mean, var) = normalize(y, one, zero, zero, one, jnp.bool_(False), one,
    ...                              use_running_average=False, momentum=0.5, epsilon=0.0)
    >>> out.ravel().tolist(), mean.tolist(), var.tolist()
    ([-1.0, 1.0], [1.0], [1.0])
  """
  running = (y - running_mean) * f + beta
  if use_running_average:
    return running, None
  axes = tuple(range(y.ndim - 1))
  mean = jnp.mean(y, axes)
  var = jnp.mean(jnp.square(y - mean), axes)
  batch = (y - mean) * (gamma * jax.lax.rsqrt(var + epsilon)) + beta
  m = momentum
  new_mean = jnp.where(frozen, running_mean, m * running_mean + (1 - m) * mean)
  new_var = jnp.where(frozen, running_var, m * running_var + (1 - m) * var)
  return jnp.where(frozen, running, batch), (new_mean, new_var)


def folded_bias(beta, conv_bias, running_mean, f):
  """The converted layer's bias: ``beta + (b - mean) * f``.

  Example:
    >>> from qatjax.ops.conv_bn import folded_bias
    >>> folded_bias(jnp.array([1.0]), jnp.array([0.5]), jnp.array([2.5]), jnp.array([2.0]))
    Array([-3.], dtype=float32)
  """
  return beta + (conv_bias - running_mean) * f
