"""tools/mutants.py (``make mutants``): the data file parses, and a mutant is classified caught /
missed / not found / error on a tiny stand-alone repository (the real run is on demand)."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutants():
  spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["mutants"] = mod  # dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


def test_data_file_parses(mutants):
  ms = mutants.load()
  assert len(ms) >= 28 and len({m.id for m in ms}) == len(ms)  # issue 15's 28, then later ones
  assert all(m.tests and m.old != m.new and m.description for m in ms)
  root = pathlib.Path(__file__).resolve().parents[1]
  stale = [m.id for m in ms if (root / m.file).read_text().count(m.old) != 1]
  assert not stale, f"snippets not found exactly once (the code moved): {stale}"


def test_run_mutant_classifies(mutants, tmp_path, monkeypatch):
  monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # a bare pytest starts faster
  (tmp_path / "mini.py").write_text("def double(x):\n  return 2 * x  # doubles\n")
  (tmp_path / "test_mini.py").write_text(
    "from mini import double\n\n\ndef test_double():\n  assert double(3) == 6\n"
  )
  original = (tmp_path / "mini.py").read_text()

  def run(old, new):
    m = mutants.Mutant("m", "mini.py", old, new, ("test_mini.py",), "a mutant")
    return mutants.run_mutant(m, tmp_path, timeout=120)

  caught = run("2 * x", "3 * x")
  assert caught.status == "caught" and caught.detail == "test_mini.py::test_double"
  assert run("2 * x", "x + x").status == "missed"  # an equivalent mutant
  assert run("4 * x", "5 * x").status == "not found"
  error = run("2 * x", "2 *")
  assert error.status == "error" and "compile" in error.detail
  assert (tmp_path / "mini.py").read_text() == original  # restored every time


def test_locate_needs_exactly_one_occurrence(mutants, tmp_path):
  (tmp_path / "a.py").write_text("x = 1\nx = 1\ny = 2\n")
  m = lambda old: mutants.Mutant("m", "a.py", old, "z = 0\n", ("t",), "d")
  assert mutants.locate(m("y = 2\n"), tmp_path) is None
  assert "2 times" in mutants.locate(m("x = 1\n"), tmp_path)
  assert "does not exist" in mutants.locate(
    mutants.Mutant("m", "b.py", "x", "y", ("t",), "d"), tmp_path
  )
