"""Doctest namespace: every public qatjax name, plus jax and jnp, as a user would import them.

The examples' data loaders (``examples/image_data.py``) are importable by the tests.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import qatjax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "examples"))


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace.update({name: getattr(qatjax, name) for name in qatjax.__all__})
  doctest_namespace.update(jax=jax, jnp=jnp, qatjax=qatjax)
