"""Shared helpers of the ``test_layers_*`` files (imported as ``test_layers_helpers``), and their
own tests.

Compilation dominates the layer tests on CPU. Flax's default ``lecun_normal`` compiles a
truncated-normal sampler for every new kernel shape (about a second each), so the layer tests use
``cheap_init`` instead: an integer hash that compiles in milliseconds.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZER_LEAVES = frozenset(
  {"kernel_scale", "embedding_scale", "input_scale", "input_zero_point", "input_alpha"}
)


def cheap_init(key, shape, dtype=jnp.float32):
  """Key-dependent pseudo-random LeCun-uniform values (variance ``1 / fan_in``).

  Integer arithmetic, so the values are bit-identical whichever fusion XLA puts the init in (an
  init inside a jitted test equals the init it returns), and there is no coarse value grid (no
  rounding ties in quantization tests).
  """
  k = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
  h = jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(2654435761)
  h = h + k[0] * jnp.uint32(40503) + k[-1]
  h = (h ^ (h >> 16)) * jnp.uint32(2246822519)
  h = (h ^ (h >> 13)) * jnp.uint32(3266489917)
  u = ((h ^ (h >> 16)) >> 8).astype(jnp.float32) * 2.0**-24 - 0.5  # exact, in [-0.5, 0.5)
  fan_in = max(math.prod(shape[:-1]), 1)
  return (u * math.sqrt(12.0 / fan_in)).reshape(shape).astype(dtype)


class JitApply:
  """Duck-types the one method :func:`qatjax.convert` calls on a model, ``apply``, jitted (one
  compile instead of convert's op-by-op run, which test_layers_convert.py exercises once)."""

  def __init__(self, model):
    self._apply = jax.jit(
      model.apply, static_argnames=("mutable", "train", "use_running_average", "method")
    )

  def apply(self, variables, *args, mutable, **kwargs):
    return self._apply(variables, *args, mutable=tuple(mutable), **kwargs)


def np_fake_quant(x, s, z, qmin, qmax):
  """The library's quantization formula in numpy, float32:
  ``(clip(round(x * (1 / s)) + z, qmin, qmax) - z) * s`` (numpy rounds half to even)."""
  q = np.clip(np.round(np.asarray(x, np.float32) * (np.float32(1) / s)) + z, qmin, qmax)
  return ((q - z) * s).astype(np.float32)


def rand(shape, seed, scale=1.0, shift=0.0):
  """Normal float32 data from numpy (no per-shape sampler compile)."""
  return jnp.asarray(shift + scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_cheap_init_is_deterministic_key_dependent_and_lecun_scaled():
  a = np.asarray(cheap_init(jax.random.key(0), (200, 50)))
  np.testing.assert_array_equal(
    a, np.asarray(jax.jit(cheap_init, static_argnums=1)(jax.random.key(0), (200, 50)))
  )
  b = np.asarray(cheap_init(jax.random.key(1), (200, 50)))
  assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.05
  np.testing.assert_allclose(a.std(), 1 / math.sqrt(200), rtol=0.05)
  assert abs(a.mean()) < 0.1 / math.sqrt(200)
  assert len(np.unique(a)) > 0.99 * a.size  # 24-bit values: a few birthday collisions
