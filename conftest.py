"""Doctest namespace: every public qatjax name, plus jax and jnp, as a user would import them."""

import jax
import jax.numpy as jnp
import pytest

import qatjax


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace.update({name: getattr(qatjax, name) for name in qatjax.__all__})
  doctest_namespace.update(jax=jax, jnp=jnp, qatjax=qatjax)
