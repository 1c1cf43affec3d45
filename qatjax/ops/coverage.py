"""What the quantized ops leave in a traced program, so that no matmul stays float silently.

Every quantized op runs its work inside ``jax.named_scope("qatjax[<spec>]")`` (see
:func:`op_scope`). Tracing a model with ``jax.make_jaxpr`` then shows, for each ``dot_general``,
convolution and table lookup (``gather``), the module path it ran in (Flax names a scope per
module) and whether a quantized op produced it, with which spec. :func:`scan_jaxpr` lists them;
the framework's ``coverage`` (``qatjax.coverage`` for Linen) adds why each float one is float.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
from jax.extend import core as jcore

from qatjax.core.config import ActQuant, WeightQuant

# Primitives that count as a matmul / convolution / embedding lookup.
MATMUL_PRIMITIVES = {
  "dot_general": "dot_general",
  "conv_general_dilated": "conv",
  "gather": "gather",
}
_SCOPE = "qatjax["
# Ops a quantized op runs besides its product are not sites of their own: the fallback for a
# disabled layer (the fake-quant product next to the integer forward,
# qatjax.ops.product.integer_forward) and the integer forward's zero-point column sums.
AUXILIARY_SCOPE = "qatjax_auxiliary"


def describe(weight_q: WeightQuant | None, act_q: ActQuant | None, integer: bool = False) -> str:
  """A short name of how an op is quantized: ``"W4g32 A8 dynamic per-token"``, ``"int W8 A8"``.

  Example:
    >>> from qatjax.ops.coverage import describe
    >>> describe(QuantConfig(4, 8).weight_quant, QuantConfig(4, 8).act_quant)
    'W4 A8'
  """
  parts = []
  if weight_q is not None:
    group = f"g{weight_q.group_size}" if weight_q.group_size else ""
    parts.append(f"W{weight_q.bits}{group}")
  if act_q is not None:
    per = act_q.granularity.replace("_", "-")  # no "/": it separates name-stack scopes
    kind = {
      "dynamic": f" dynamic {per}",
      "lsq": " lsq",
      "pact": " pact",
    }
    parts.append(f"A{act_q.bits}{kind.get(act_q.method, '')}")
  return ("int " if integer else "") + " ".join(parts)


@contextlib.contextmanager
def op_scope(description: str):
  """The named scope a quantized op runs in (``"qatjax[<description>]"``)."""
  with jax.named_scope(f"{_SCOPE}{description}]"):
    yield


@dataclasses.dataclass(frozen=True)
class OpSite:
  """One matmul, convolution or table lookup of a traced program.

  Attributes:
    path: the module path it ran in (names joined by ``/``; ``"<root>"`` for the model itself).
    op: ``"dot_general"``, ``"conv"`` or ``"gather"``.
    shapes: the operand shapes.
    config: how a quantized op ran it (:func:`describe`), or ``None`` when it ran in float.
    reason: why it is float (filled in by the framework's ``coverage``), else ``None``.
    requested: whether a rule or config asked for this layer to be quantized (a float site with
      ``requested`` is one the user may not expect).
  """

  path: str
  op: str
  shapes: tuple[tuple[int, ...], ...]
  config: str | None
  reason: str | None = None
  requested: bool = False


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jcore.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jcore.Jaxpr):
        yield v


def scan_jaxpr(jaxpr, module_paths, resolve: Callable[[list[str]], str] | None = None):
  """Every matmul / convolution / table lookup of ``jaxpr``, in program order (``OpSite`` s).

  ``module_paths`` are the paths of the modules that ran while tracing (``"block/Dense_0"``);
  each op is attributed to the deepest of them its name stack leads to (``"<root>"`` if none).
  ``resolve`` replaces that rule: it maps the scope names around an op to its module path (for
  frameworks that name their scopes otherwise). Gathers count when they read a 2-D table
  (embedding lookups), not other indexing.
  """
  if isinstance(jaxpr, jcore.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  known = {tuple(p.split("/")) for p in module_paths if p != "<root>"}
  sites: list[OpSite] = []

  def walk(j, prefix):
    for eqn in j.eqns:
      stack = prefix + [x for x in str(eqn.source_info.name_stack).split("/") if x]
      if AUXILIARY_SCOPE in stack:
        continue
      op = MATMUL_PRIMITIVES.get(eqn.primitive.name)
      if op is not None:
        shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
        if op != "gather" or len(shapes[0]) == 2:  # a gather from a table, not indexing
          config, names = _split(stack)
          if resolve is not None:
            path = resolve(names)
          else:
            path = "/".join(_module_path(names, known)) or "<root>"
          sites.append(OpSite(path, op, shapes if op != "gather" else shapes[:1], config))
      for sub in _sub_jaxprs(eqn.params):
        walk(sub, stack)

  walk(jaxpr, [])
  return sites


def _split(stack):
  """``(config, module names)`` of a name stack: the quantized op's scope, if any, and the
  scope names before it, as Flax names module calls (``Name`` or ``Name.method``)."""
  names, config = [], None
  for entry in stack:
    if entry.startswith(_SCOPE):
      config = entry[len(_SCOPE) : -1]
      break
    name = entry.split(".")[0]
    if name.isidentifier() and (not names or names[-1] != name):
      names.append(name)
  return config, names


def _module_path(names, known):
  """The longest run of ``names`` that is a known module path (leading root names skipped)."""
  for start in range(len(names)):
    best = ()
    for end in range(start + 1, len(names) + 1):
      if tuple(names[start:end]) in known:
        best = tuple(names[start:end])
    if best:
      return best
  return ()


@dataclasses.dataclass(frozen=True)
class CoverageReport:
  """Every matmul, convolution and table lookup of a model, quantized or not, and why not.

  ``str(report)`` is a table; :attr:`float_sites` lists what stays float.

  Attributes:
    sites: the :class:`OpSite` s in program order.
  """

  sites: tuple[OpSite, ...]

  @property
  def quantized(self) -> tuple[OpSite, ...]:
    """The sites a quantized op runs."""
    return tuple(s for s in self.sites if s.config is not None)

  @property
  def float_sites(self) -> tuple[OpSite, ...]:
    """The sites that run in float."""
    return tuple(s for s in self.sites if s.config is None)

  @property
  def fraction(self) -> float:
    """The quantized share of the sites (1.0 for a model without any)."""
    return len(self.quantized) / len(self.sites) if self.sites else 1.0

  def table(self) -> str:
    """One row per site: path, op, operand shapes, and its config or ``float: <why>``."""
    rows = [
      (s.path, s.op, " x ".join(str(sh) for sh in s.shapes), s.config or f"float: {s.reason}")
      for s in self.sites
    ]
    head = ("path", "op", "shapes", "quantization")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(self.quantized)} of {len(self.sites)} quantized ({self.fraction:.0%})")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()
