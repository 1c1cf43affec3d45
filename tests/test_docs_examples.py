"""Every public symbol has a runnable example (the README's claim; pytest runs them as doctests).

Public: the names of ``qatjax.__all__``, ``qatjax.training.__all__``, ``qatjax.export.__all__``
and ``qatjax.calibration``'s functions, plus the methods and properties their classes define.
"""

import inspect

import pytest

import qatjax
import qatjax.calibration
import qatjax.export
import qatjax.training

# Members that are not qatjax's own API: Flax's ``setup`` hook; a method that needs a submodule
# bound inside ``QuantizedModel.run``.
EXEMPT = {"QEmbed.setup", "QuantizedModel.layer_path"}


def _has_example(obj) -> bool:
  doc = inspect.getdoc(obj) or ""
  return "Example" in doc and ">>>" in doc


def _members(cls):
  for name, value in vars(cls).items():
    if name.startswith("_") or f"{cls.__name__}.{name}" in EXEMPT:
      continue
    target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    target = getattr(target, "func", target)  # functools.cached_property
    if inspect.isfunction(target) and target.__module__.startswith("qatjax"):
      yield f"{cls.__name__}.{name}", target


def _public():
  for mod in (qatjax, qatjax.training, qatjax.export):
    for name in mod.__all__:
      obj = getattr(mod, name)
      if inspect.isclass(obj) or inspect.isfunction(obj):
        yield f"{mod.__name__}.{name}", obj
      if inspect.isclass(obj):
        for member, target in _members(obj):
          yield f"{mod.__name__}.{member}", target
  for name, fn in vars(qatjax.calibration).items():
    if inspect.isfunction(fn) and not name.startswith("_"):
      yield f"qatjax.calibration.{name}", fn


PUBLIC = dict(_public())


def test_the_public_api_is_found():
  for name in ("qatjax.rules_report", "qatjax.QuantConfig.narrow", "qatjax.SizeReport.table"):
    assert name in PUBLIC
  assert len(PUBLIC) > 80


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_symbol_has_a_runnable_example(name):
  assert _has_example(PUBLIC[name]), f"{name} has no 'Example:' doctest"
