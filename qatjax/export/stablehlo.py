"""``export_stablehlo``: the integer inference function as a serialized ``jax.export`` artifact."""

from __future__ import annotations

import jax
from jax import export as jax_export


def export_stablehlo(
  model,
  qvars,
  example_input,
  *,
  dynamic_batch: bool = False,
  platforms=None,
  apply_kwargs: dict | None = None,
) -> bytes:
  """Serializes ``x -> model.apply(qvars, x)`` (StableHLO via :mod:`jax.export`).

  The converted variables are closed over: they are stored in the artifact as constants (int8 /
  packed int4 kernels, float32 scales), so the loader needs neither the model's Python code nor
  its variables, only JAX::

    import jax, numpy as np
    fn = jax.export.deserialize(open("model.stablehlo", "rb").read())
    y = fn.call(np.load("x.npy"))          # == model.apply(qvars, x)

  Args:
    model: the Flax model, or a (converted, :func:`qatjax.nnx.convert`) NNX model, whose
      variables are then closed over the same way.
    qvars: its converted variables (:func:`qatjax.convert`); float variables work too. ``None``
      for an NNX model.
    example_input: an input array (or ``jax.ShapeDtypeStruct``) fixing the shape and dtype.
    dynamic_batch: export the leading dimension as a symbolic ``batch`` dimension, so the
      artifact accepts any batch size (the model must be shape-polymorphic in it, e.g. flatten
      with ``x.reshape(x.shape[0], -1)``).
    platforms: e.g. ``("cpu", "cuda")``; default: the current JAX backend.
    apply_kwargs: keyword arguments for ``model.apply`` (e.g. ``{"train": False}``), or of an
      NNX model's call.

  Returns:
    The serialized ``jax.export.Exported`` as ``bytes``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = QDense(3, config=QuantConfig())
    >>> x = jnp.ones((2, 4))
    >>> v = layer.init(jax.random.key(0), x)
    >>> _, stats = layer.apply(v, x, mutable=["quant_stats"])
    >>> qv = convert(layer, {**v, **stats}, x)
    >>> blob = qatjax.export.export_stablehlo(layer, qv, x)
    >>> bool(jnp.allclose(jax.export.deserialize(blob).call(x), layer.apply(qv, x)))
    True
  """
  kwargs = dict(apply_kwargs or {})
  shape, dtype = tuple(example_input.shape), example_input.dtype
  if not shape:
    raise ValueError(
      "export_stablehlo: example_input must have at least one dimension, got a scalar"
    )
  if dynamic_batch:
    spec = "batch" + "".join(f", {d}" for d in shape[1:])
    shape = jax_export.symbolic_shape(spec)
  fn = jax.jit(_inference_fn(model, qvars, kwargs))
  exported = jax_export.export(fn, platforms=platforms)(jax.ShapeDtypeStruct(shape, dtype))
  return bytes(exported.serialize())


def _inference_fn(model, qvars, kwargs):
  """``x -> outputs`` of a Linen model with ``qvars``, or of an NNX model with its own state."""
  if qvars is None:
    from flax import nnx

    if not isinstance(model, nnx.Module):
      raise ValueError("export_stablehlo: qvars is required for a Linen model")
    graphdef, state = nnx.split(model)
    return lambda x: nnx.merge(graphdef, state)(x, **kwargs)
  return lambda x: model.apply(qvars, x, **kwargs)


def load_stablehlo(blob: bytes):
  """Deserializes :func:`export_stablehlo`'s bytes; call the result's ``.call(x)``.

  This is ``jax.export.deserialize``: it needs only JAX, not qatjax.

  Example:
    >>> import jax.numpy as jnp
    >>> blob = qatjax.export.export_stablehlo(QDense(2), {"params": {
    ...     "kernel": jnp.eye(2), "bias": jnp.zeros(2)}}, jnp.ones((1, 2)))
    >>> qatjax.export.load_stablehlo(blob).call(jnp.ones((1, 2)))
    Array([[1., 1.]], dtype=float32)
  """
  if not isinstance(blob, (bytes, bytearray, memoryview)):
    raise ValueError(f"load_stablehlo: expected bytes, got {type(blob).__name__}")
  return jax_export.deserialize(bytearray(blob))
