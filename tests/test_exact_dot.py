"""When the integer kernels take exact bfloat16 products: measured, or set by the environment.

The instruction set alone does not tell (an Intel Xeon with ``avx512_bf16`` ran a bfloat16
product 1.7x slower than the float32 one, an AMD EPYC 0.6x), so ``bf16_matmul_fast`` times the
two; ``QATJAX_BF16_MATMUL`` overrides the timing.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qatjax.core import exact_dot


@pytest.fixture
def cpu_with_bf16(monkeypatch):
  monkeypatch.delenv(exact_dot.BF16_MATMUL_ENV, raising=False)
  monkeypatch.setattr(exact_dot.jax, "default_backend", lambda: "cpu")
  monkeypatch.setattr(exact_dot, "_cpu_has_bf16_matmul", lambda: True)


@pytest.mark.parametrize("ratio, fast", [(0.6, True), (exact_dot.FAST_RATIO, True), (0.81, False)])
def test_fast_only_where_bf16_products_measure_faster(cpu_with_bf16, monkeypatch, ratio, fast):
  monkeypatch.setattr(exact_dot, "bf16_over_f32_time", lambda: ratio)
  assert exact_dot.bf16_matmul_fast() is fast


def _not_timed():
  raise AssertionError("timed where the answer was already known")


@pytest.mark.parametrize("has_flag, backend", [(False, "cpu"), (True, "gpu")])
def test_no_bf16_instructions_or_not_a_cpu_is_never_fast(monkeypatch, has_flag, backend):
  monkeypatch.delenv(exact_dot.BF16_MATMUL_ENV, raising=False)
  monkeypatch.setattr(exact_dot.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(exact_dot, "_cpu_has_bf16_matmul", lambda: has_flag)
  monkeypatch.setattr(exact_dot, "bf16_over_f32_time", _not_timed)
  assert exact_dot.bf16_matmul_fast() is False


@pytest.mark.parametrize("value, fast", [("1", True), ("0", False)])
def test_environment_overrides_the_timing(cpu_with_bf16, monkeypatch, value, fast):
  monkeypatch.setenv(exact_dot.BF16_MATMUL_ENV, value)
  monkeypatch.setattr(exact_dot, "bf16_over_f32_time", _not_timed)
  monkeypatch.setattr(exact_dot, "_cpu_has_bf16_matmul", lambda: not fast)  # ignored too
  assert exact_dot.bf16_matmul_fast() is fast


def test_bad_environment_value_raises(monkeypatch):
  monkeypatch.setenv(exact_dot.BF16_MATMUL_ENV, "yes")
  with pytest.raises(ValueError, match=r"QATJAX_BF16_MATMUL must be '0' or '1'.*'yes'"):
    exact_dot.bf16_matmul_fast()


def test_best_time_ratio_compares_the_two_functions():
  ratio = exact_dot.best_time_ratio(lambda: time.sleep(0.006), lambda: time.sleep(0.002), rounds=4)
  assert 1.5 < ratio < 6, ratio  # 3x by their sleeps; best of 4 absorbs scheduling noise
  flipped = exact_dot.best_time_ratio(
    lambda: time.sleep(0.002), lambda: time.sleep(0.006), rounds=4
  )
  assert flipped < 1 / 1.5, flipped


def test_timing_runs_while_a_function_is_traced_and_once_per_process(monkeypatch):
  exact_dot.bf16_over_f32_time.cache_clear()
  seen = []

  @jax.jit
  def f(x):
    seen.append(exact_dot.bf16_over_f32_time())  # trace time: must not stage the timing
    return x + 1

  np.testing.assert_array_equal(f(jnp.zeros(2)), [1, 1])
  calls = []
  monkeypatch.setattr(exact_dot, "best_time_ratio", lambda *a, **k: calls.append(1) or 1.0)
  assert exact_dot.bf16_over_f32_time() == seen[0]  # cached: not timed again
  assert not calls and np.isfinite(seen[0]) and seen[0] > 0


def test_timing_puts_the_bfloat16_product_over_the_float32_one(monkeypatch):
  exact_dot.bf16_over_f32_time.cache_clear()
  dtypes = []

  def record(run_a, run_b, **_):
    for run in (run_a, run_b):
      _, a, b = run.__defaults__  # (compiled product, lhs, rhs)
      dtypes.append((a.dtype, b.dtype))
      assert run().dtype == jnp.float32  # float32 accumulation on both
    return 0.5

  monkeypatch.setattr(exact_dot, "best_time_ratio", record)
  try:
    assert exact_dot.bf16_over_f32_time() == 0.5
  finally:
    exact_dot.bf16_over_f32_time.cache_clear()
  assert dtypes == [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32)]
