"""Doctest namespace: every public qatjax name, plus jax and jnp, as a user would import them.

The examples' data loaders (``examples/image_data.py``) are importable by the tests, and XLA
compiles the tests' programs at a low optimization level (see below).
"""

import os
import pathlib
import sys

# The tests compile many small programs: compile them cheaply (LLVM at -O0, no expensive passes;
# XLA's own HLO passes, hence the numerics, are unchanged). Set before jax is imported; the
# benchmarks and examples never use these flags. QATJAX_TEST_FULL_OPT=1 turns this off.
if not os.environ.get("QATJAX_TEST_FULL_OPT"):
  os.environ["XLA_FLAGS"] = " ".join(
    [
      os.environ.get("XLA_FLAGS", ""),
      "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true",
    ]
  ).strip()

import jax
import jax.numpy as jnp
import pytest

import qatjax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "examples"))


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace.update({name: getattr(qatjax, name) for name in qatjax.__all__})
  doctest_namespace.update(jax=jax, jnp=jnp, qatjax=qatjax)


@pytest.fixture(autouse=True)
def _training_forward_as_without_bf16_units(monkeypatch):
  """Tests trace training programs as on a CPU without bfloat16 matrix units (where
  ``qat_forward("auto")`` keeps the fake-quant product for W8A8 dots and the integer forward for
  int4 groups), whatever the test machine has: the integer forward's programs are larger and
  compile 20-30% slower, and most tests are about something else. tests/test_integer_forward.py
  runs the integer forward on both units explicitly (its fixtures patch this back)."""
  from qatjax.ops import product

  monkeypatch.setattr(product, "bf16_matmul_fast", lambda: False)


def pytest_collection_modifyitems(config, items):
  """Tests marked ``slow`` (tens of seconds each) run first: with ``pytest -n 2 --dist
  worksteal`` the workers then end on short tests and finish together, instead of one waiting for
  the other's long test at the end. Otherwise collection order."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
