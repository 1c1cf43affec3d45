"""``QuantConfig(lsq_init=...)``: LSQ's initial steps against an independent numpy search.

* ``"mse"`` weights: per scale (per tensor, per channel, per group, short last group included),
  the step with the smallest fake-quant MSE among ``ratio * max|w| / ((qmax - qmin) / 2)``,
  ``ratio`` in ``linspace(0.2, 1, 64)``, keeping only steps that do not shrink the weights
  (``sum((w_q - w) * w) >= 0``);
* ``"mse"`` activations: the first batch's MSE-optimal range (affine and symmetric);
* ``"minmax"``: the min/max range; ``"lsq"`` is covered by ``test_layers_lsq.py``;
* ordering: a small MLP's ``from_float`` output error is smaller with ``"mse"`` than with LSQ's
  rule at 2, 3, 4 and 8 bits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qatjax import EPS, QConv, QDense, QuantConfig, from_float

RATIOS = np.linspace(0.2, 1.0, 64, dtype=np.float32)


def np_fq(x, s, z, qmin, qmax):
  x, s = np.float32(x), np.float32(s)
  return ((np.clip(np.round(x * (np.float32(1) / s)) + z, qmin, qmax) - z) * s).astype(np.float32)


def np_weight_steps(w, qmin, qmax):
  """Every candidate step for the elements ``w`` of one scale, with its MSE and shrink term."""
  m = np.abs(w).max()
  steps = np.maximum(RATIOS * m / np.float32((qmax - qmin) / 2), np.float32(EPS))
  errs = np.array([np.mean((np_fq(w, s, 0, qmin, qmax) - w) ** 2) for s in steps])
  cross = np.array([np.sum((np_fq(w, s, 0, qmin, qmax) - w) * w) for s in steps])
  return steps, errs, cross


def scale_elements(w, bshape, group_axis, group_size):
  """``(index into bshape, the elements of w that share that scale)``, by slicing ``w``."""
  for idx in np.ndindex(*bshape):
    sl = tuple(
      slice(i * group_size, (i + 1) * group_size)
      if a == group_axis
      else slice(None)
      if b == 1
      else slice(i, i + 1)
      for a, (i, b) in enumerate(zip(idx, bshape))
    )
    yield idx, w[sl].ravel()


def _kernel_init(key, shape, dtype=jnp.float32):
  rng = np.random.default_rng(int(np.prod(shape)))
  w = rng.standard_t(4, size=shape) * np.linspace(0.3, 2.0, shape[-1])  # heavy tails
  return jnp.asarray(w, dtype)


def _dense(c):
  return QDense(6, config=c, kernel_init=_kernel_init)


def _conv(c):
  return QConv(4, (3, 2), config=c, kernel_init=_kernel_init)


# (layer, input shape, granularity, group axis of the kernel) per layout; uneven last groups.
LAYOUTS = {
  "dense_per_tensor": (_dense, (5, 40), dict(weight_granularity="per_tensor"), None),
  "dense_per_channel": (_dense, (5, 40), dict(weight_granularity="per_channel"), None),
  "dense_per_group": (
    _dense,
    (5, 40),
    dict(weight_granularity="per_group", weight_group_size=16),
    0,
  ),
  "conv_per_group": (
    _conv,
    (2, 5, 5, 7),
    dict(weight_granularity="per_group", weight_group_size=3),
    2,
  ),
}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mse_weight_init_is_the_numpy_search_optimum(layout, bits):
  make, shape, granularity, group_axis = LAYOUTS[layout]
  # Narrow range: with the full signed range the max |w| lands on +-(qmax - qmin) / 2, half-way
  # between two integers at ratio 1, and one ulp of the step decides how it rounds.
  cfg = QuantConfig(bits, None, method="lsq", weight_narrow_range=True, **granularity)
  assert cfg.lsq_init == "mse"  # the default
  x = jnp.ones(shape, jnp.float32)
  p = jax.jit(make(cfg).init)(jax.random.key(0), x)["params"]
  w, s = np.asarray(p["kernel"]), np.asarray(p["kernel_scale"])
  qmin, qmax = cfg.weight_range
  n_out = w.shape[-1]
  if cfg.weight_granularity == "per_tensor":
    bshape = (1,) * w.ndim
  elif cfg.weight_granularity == "per_channel":
    bshape = (1,) * (w.ndim - 1) + (n_out,)
  else:
    g = cfg.weight_group_size
    bshape = tuple(
      -(-w.shape[a] // g) if a == group_axis else n_out if a == w.ndim - 1 else 1
      for a in range(w.ndim)
    )
  s = s.reshape(bshape)
  shrinking = 0
  for idx, elems in scale_elements(w, bshape, group_axis, cfg.weight_group_size):
    steps, errs, cross = np_weight_steps(elems, qmin, qmax)
    feasible = cross >= 0
    if feasible.any():
      want = errs[feasible].min()
    else:
      want = errs[np.argmax(cross)]
    got = np.mean((np_fq(elems, s[idx], 0, qmin, qmax) - elems) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"scale {idx}")
    assert np.min(np.abs(steps / s[idx] - 1)) < 1e-5, (idx, s[idx], steps)  # a candidate
    shrinking += int(not feasible[np.argmin(errs)])
  if bits == 2:  # the constraint matters: the plain MSE optimum shrinks some scales
    assert shrinking > 0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("init", ["mse", "minmax"])
def test_activation_init_from_first_batch(init, symmetric):
  cfg = QuantConfig(8, 3, method="lsq", act_symmetric=symmetric, lsq_init=init)
  x = jnp.asarray(np.random.default_rng(0).standard_t(3, size=(16, 12)) + 0.5, jnp.float32)
  p = jax.jit(QDense(4, config=cfg).init)(jax.random.key(0), x)["params"]
  xs = np.asarray(x).ravel()
  qmin, qmax = cfg.act_range

  def range_params(lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
      return np.float32(max(-lo, hi) / ((qmax - qmin) / 2)), 0.0
    s = np.float32((hi - lo) / (qmax - qmin))
    return s, float(np.clip(qmin - np.round(lo / s), qmin, qmax))

  ratios = RATIOS if init == "mse" else np.ones(1, np.float32)
  cands = [range_params(r * xs.min(), r * xs.max()) for r in ratios]
  errs = [np.mean((np_fq(xs, s, z, qmin, qmax) - xs) ** 2) for s, z in cands]
  s_want, z_want = cands[int(np.argmin(errs))]
  np.testing.assert_allclose(p["input_scale"], s_want, rtol=1e-5)
  if symmetric:
    assert "input_zero_point" not in p
  else:
    assert float(p["input_zero_point"]) == z_want
  if init == "mse":  # clipping pays off on this heavy-tailed batch
    assert float(p["input_scale"]) < cands[-1][0] * 0.9


def test_minmax_weight_init():
  cfg = QuantConfig(4, None, method="lsq", lsq_init="minmax")
  p = QDense(6, config=cfg, kernel_init=_kernel_init).init(jax.random.key(0), jnp.ones((2, 40)))
  w = np.asarray(p["params"]["kernel"])
  want = np.abs(w).max(axis=0) / np.float32(7.5)  # (qmax - qmin) / 2 for [-8, 7]
  np.testing.assert_allclose(p["params"]["kernel_scale"], want, rtol=1e-6)


class _MLP(nn.Module):
  config: QuantConfig | None = None

  @nn.compact
  def __call__(self, x):
    if self.config is None:
      dense = functools.partial(nn.Dense, kernel_init=_kernel_init)
    else:
      dense = functools.partial(QDense, config=self.config)
    x = nn.relu(dense(48, name="d0")(x))
    x = nn.relu(dense(48, name="d1")(x))
    return dense(10, name="d2")(x)


def test_mse_init_starts_closer_to_float_than_lsq_rule():
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.abs(rng.normal(size=(256, 32))), jnp.float32)
  fvars = _MLP().init(jax.random.key(0), x)
  y_f = np.asarray(_MLP().apply(fvars, x))
  errors = {}
  for bits in (2, 3, 4, 8):
    for init in ("mse", "lsq"):
      model = _MLP(QuantConfig(bits, bits, method="lsq", lsq_init=init))
      y_q = np.asarray(jax.jit(model.apply)(from_float(model, fvars, x), x))
      errors[bits, init] = np.linalg.norm(y_q - y_f) / np.linalg.norm(y_f)
  for bits in (2, 3, 4, 8):
    assert errors[bits, "mse"] < errors[bits, "lsq"], errors
