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
