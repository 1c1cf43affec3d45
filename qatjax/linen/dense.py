"""``QDense`` and ``QDenseGeneral``: drop-ins for ``nn.Dense`` / ``nn.DenseGeneral``, thin users
of the quantized ``dot_general``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qatjax.core.config import QuantConfig
from qatjax.core.rules import QuantRules, resolve
from qatjax.linen.context import LinenContext, module_path, weight_param
from qatjax.ops import dot_general as dot

default_kernel_init = nn.initializers.lecun_normal()


def _specs(cfg: QuantConfig | None):
  return (None, None) if cfg is None else (cfg.weight_quant, cfg.act_quant)


def _shape_check(module, inputs_part, what):
  """A check for a stored kernel: its leading dims must equal ``inputs_part``."""

  def check(stored):
    expects = tuple(stored[: len(inputs_part)])
    if expects != tuple(inputs_part):
      raise ValueError(
        f"layer {module_path(module)}: {what} {tuple(inputs_part)} does not match "
        f"its kernel, which expects {expects}"
      )

  return check


def float_dot(m):
  """The ``dot_general`` a Flax layer's fields ask for (``dot_general_cls`` / ``dot_general``),
  or ``None`` (``lax.dot_general``): it multiplies the fake-quantized operands."""
  cls = getattr(m, "dot_general_cls", None)
  return cls() if cls is not None else getattr(m, "dot_general", None)


def _add_bias(y, bias):
  return y if bias is None else y + jnp.asarray(bias, y.dtype)


def dense_call(m, inputs, cfg: QuantConfig | None):
  """``nn.Dense.__call__`` with quantization, on any bound module with Dense's fields."""
  k_in = jnp.shape(inputs)[-1]
  kernel = weight_param(
    m,
    "kernel",
    m.kernel_init,
    (k_in, m.features),
    m.param_dtype,
    check=_shape_check(m, (k_in,), "input feature size"),
  )
  bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  y = dot.dot_general(
    LinenContext(m),
    inputs,
    kernel,
    (((inputs.ndim - 1,), (0,)), ((), ())),
    *_specs(cfg),
    precision=m.precision,
    dtype=m.dtype,
    float_dot=float_dot(m),
  )
  return _add_bias(y, bias)


def _canon_axes(axes, ndim):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))  # sorted, as nn.DenseGeneral (_normalize_axes)


def dense_general_call(m, inputs, cfg: QuantConfig | None):
  """``nn.DenseGeneral.__call__`` with quantization, on any module with DenseGeneral's fields.

  The kernel ``batch_shape + in_shape + features`` keeps its shape; ``batch_dims`` (leading,
  consecutive, as Flax requires) are ``dot_general`` batch dimensions.
  """
  features = (m.features,) if isinstance(m.features, int) else tuple(m.features)
  batch_dims = _canon_axes(getattr(m, "batch_dims", ()), inputs.ndim)
  if batch_dims != tuple(range(len(batch_dims))):
    raise ValueError(
      f"layer {module_path(m)}: batch_dims {m.batch_dims!r} must be consecutive leading "
      "dimensions starting from 0"
    )
  axis = _canon_axes(m.axis, inputs.ndim)
  nb, na = len(batch_dims), len(axis)
  batch_shape = tuple(inputs.shape[a] for a in batch_dims)
  in_shape = tuple(inputs.shape[a] for a in axis)
  k_in, k_out = math.prod(batch_shape) * math.prod(in_shape), math.prod(features)

  def kernel_init(rng, shape, dtype):
    return m.kernel_init(rng, (k_in, k_out), dtype).reshape(shape)

  def bias_init(rng, shape, dtype):
    return m.bias_init(rng, (math.prod(shape),), dtype).reshape(shape)

  kernel = weight_param(
    m,
    "kernel",
    kernel_init,
    batch_shape + in_shape + features,
    m.param_dtype,
    check=_shape_check(m, batch_shape + in_shape, "input shape"),
  )
  bias = m.param("bias", bias_init, batch_shape + features, m.param_dtype) if m.use_bias else None
  dims = ((axis, tuple(range(nb, nb + na))), (batch_dims, tuple(range(nb))))
  y = dot.dot_general(
    LinenContext(m),
    inputs,
    kernel,
    dims,
    *_specs(cfg),
    precision=m.precision,
    dtype=m.dtype,
    float_dot=float_dot(m),
  )
  if bias is not None and nb:  # broadcast over the free input dims: batch first, as dot_general
    free = [inputs.shape[a] if a in batch_dims else 1 for a in range(inputs.ndim) if a not in axis]
    bias = jnp.reshape(bias, tuple(free) + features)
  return _add_bias(y, bias)


class QDense(nn.Module):
  """A quantized ``nn.Dense``: same fields, same ``kernel`` / ``bias`` parameters.

  The input is fake-quantized with the activation quantizer and the kernel with the weight
  quantizer of ``config``; after :func:`qatjax.convert` the same module runs an int8 x int8 ->
  int32 matmul. With ``config=None`` (or a rule mapping this path to ``None``) it is exactly
  ``nn.Dense``.

  Attributes:
    features: number of output features.
    config: a :class:`QuantConfig`, a :class:`QuantRules` (looked up by this module's path), or
      ``None``.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.Dense``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QDense(4, config=QuantConfig(weight_bits=8, act_bits=8))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> sorted(variables["params"])
    ['bias', 'kernel']
    >>> sorted(variables["quant_stats"])
    ['enabled', 'input_count', 'input_count_from_float', 'input_max', 'input_min', 'observe']
    >>> y, updates = layer.apply(variables, jnp.ones((2, 3)), mutable=["quant_stats"])
    >>> y.shape
    (2, 4)
  """

  features: int
  config: QuantConfig | QuantRules | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs):
    """Applies the (quantized) linear transformation to the last axis of ``inputs``."""
    return dense_call(self, inputs, resolve(self.config, module_path(self)))


class QDenseGeneral(nn.Module):
  """A quantized ``nn.DenseGeneral`` (e.g. attention projections to ``(heads, head_dim)``).

  The kernel keeps its shape (``in_shape + features``) in training and after
  :func:`qatjax.convert`. Weights get one scale per output element of ``features`` (per-channel)
  or one per tensor; per-group scales run along the last contracted input axis (any number of
  contracted axes).

  Attributes:
    features: int or tuple of output feature dims.
    axis: int or tuple of input axes to contract.
    batch_dims: leading input axes the kernel has one slice per (as ``nn.DenseGeneral``).
    config: a :class:`QuantConfig`, :class:`QuantRules` or ``None``.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as ``nn.DenseGeneral``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QDenseGeneral((2, 4), config=QuantConfig())
    >>> v = layer.init(jax.random.key(0), jnp.ones((3, 8)))
    >>> v["params"]["kernel"].shape, layer.apply(v, jnp.ones((3, 8))).shape
    ((8, 2, 4), (3, 2, 4))
  """

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  batch_dims: Sequence[int] = ()
  config: QuantConfig | QuantRules | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs):
    """Contracts ``axis`` of ``inputs`` with the (quantized) kernel."""
    return dense_general_call(self, inputs, resolve(self.config, module_path(self)))
