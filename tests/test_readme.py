"""The README's Python snippets run as written and end in an integer model."""

import pathlib
import re
import warnings

import jax
import pytest

import qatjax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
  namespace = {}
  with warnings.catch_warnings():
    # The snippets train as the README teaches: every observer sees the data.
    warnings.filterwarnings("error", message=".*seen no batch since from_float")
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
  leaves = jax.tree.leaves(namespace["qvars"], is_leaf=lambda x: isinstance(x, qatjax.QArray))
  kernels = [leaf for leaf in leaves if isinstance(leaf, qatjax.QArray)]
  assert kernels and all(k.values.dtype.name in ("int8", "uint8") for k in kernels)
