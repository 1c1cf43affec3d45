"""A two-operand ``einsum`` of an activation and a weight, as the quantized ``dot_general``.

The equation is turned into ``dot_general`` dimension numbers plus one output transpose, so an
``nn.Einsum`` / ``nnx.Einsum`` layer is quantized, converted and served by exactly the code that
serves ``Dense`` (per-channel scales over the weight's output indices, groups along its last
contracted index). Equations the op cannot serve raise a ``ValueError`` before anything runs.
"""

from __future__ import annotations

import dataclasses
import string

from jax import lax

from qatjax.core.config import ActQuant, WeightQuant
from qatjax.ops import dot_general as dot
from qatjax.ops.context import QuantContext


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
  """``lhs, rhs -> out`` as ``dot_general(lhs, rhs, dimension_numbers)`` then ``out_perm``.

  Attributes:
    dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.
    out_perm: the transpose from ``dot_general``'s output order (batch, lhs free, rhs free) to
      the equation's output order (``None``: already in order).
    rhs_out_axes: for each output axis, the weight axis it comes from, or ``None`` (the bias
      shape of ``nn.Einsum``).
  """

  dimension_numbers: tuple
  out_perm: tuple[int, ...] | None
  rhs_out_axes: tuple[int | None, ...]


def _ellipsis_letters(spec: str, ndim: int, fill: str, where: str) -> str:
  """The letters an activation's ``...`` stands for (``""`` when it has none)."""
  if "..." not in spec:
    return ""
  if spec.count("...") > 1:
    raise ValueError(f"{where}: {spec!r} has more than one '...'")
  n = ndim - (len(spec) - 3)
  if n < 0:
    raise ValueError(f"{where}: {spec!r} has more indices than the operand's {ndim} dims")
  return fill[:n]


def plan_einsum(
  equation: str, lhs_shape, rhs_shape, path: str = "<einsum>", rhs_ellipsis: bool = False
) -> EinsumPlan:
  """The :class:`EinsumPlan` of ``equation`` for operands of these shapes.

  Supported: explicit output (``->``), exactly two operands, each index at most once per operand,
  every index of an operand either in the output or in the other operand (no summed-out index),
  ``...`` in the activation and the output (and, with ``rhs_ellipsis``, the right-aligned same
  dims in the second operand, for an activation x activation product such as attention's).

  Raises:
    ValueError: naming ``path`` and the equation when it is not of that form, or when the shapes
      do not fit it.

  Example:
    >>> from qatjax.ops.einsum import plan_einsum
    >>> p = plan_einsum("btd,dnh->btnh", (2, 5, 8), (8, 4, 2))
    >>> p.dimension_numbers, p.out_perm
    ((((2,), (0,)), ((), ())), None)
  """
  eq = equation.replace(" ", "")
  if "->" not in eq or eq.count("->") != 1:
    raise ValueError(f"layer {path}: einsum equation {equation!r} must be explicit (one '->')")
  ins, out = eq.split("->")
  if ins.count(",") != 1:
    raise ValueError(
      f"layer {path}: einsum equation {equation!r} must have exactly two operands "
      f"(activation, weight), got {ins.count(',') + 1}"
    )
  lhs, rhs = ins.split(",")
  used = set(eq) - set(".,->")
  free = "".join(c for c in string.ascii_letters if c not in used)
  if "..." in rhs and not rhs_ellipsis:
    raise ValueError(f"layer {path}: einsum {equation!r}: '...' in the weight is not supported")
  dots = _ellipsis_letters(lhs, len(lhs_shape), free, f"layer {path}: einsum activation")
  if ("..." in out) != bool("..." in lhs) or ("..." in rhs and "..." not in lhs):
    raise ValueError(
      f"layer {path}: einsum {equation!r}: '...' must be in the activation and the output, or "
      "in neither"
    )
  rhs_dots = _ellipsis_letters(rhs, len(rhs_shape), free, f"layer {path}: einsum operand")
  if rhs_dots and rhs_dots != dots[len(dots) - len(rhs_dots) :]:
    raise ValueError(f"layer {path}: einsum {equation!r}: the operands' '...' differ in rank")
  lhs, out = lhs.replace("...", dots), out.replace("...", dots)
  rhs = rhs.replace("...", dots[len(dots) - len(rhs_dots) :] if rhs_dots else "")
  for name, spec, shape in (("activation", lhs, lhs_shape), ("weight", rhs, rhs_shape)):
    bad = [c for c in spec if not c.isalpha()]
    if bad or len(set(spec)) != len(spec):
      raise ValueError(
        f"layer {path}: einsum {equation!r}: the {name} indices {spec!r} must be "
        "distinct letters (no repeated index / diagonal)"
      )
    if len(spec) != len(shape):
      raise ValueError(
        f"layer {path}: einsum {equation!r}: the {name} has {len(shape)} dims "
        f"{tuple(shape)}, the equation gives it {len(spec)} ({spec!r})"
      )
  if len(set(out)) != len(out) or any(c not in lhs + rhs for c in out):
    raise ValueError(
      f"layer {path}: einsum {equation!r}: every output index must appear once "
      "and come from an operand"
    )
  summed = [c for c in lhs + rhs if c not in out and not (c in lhs and c in rhs)]
  if summed:
    raise ValueError(
      f"layer {path}: einsum {equation!r}: index {summed[0]!r} is summed within "
      "one operand, which the quantized einsum cannot serve"
    )
  size = {}
  for spec, shape in ((lhs, lhs_shape), (rhs, rhs_shape)):
    for c, d in zip(spec, shape):
      if size.setdefault(c, d) != d:
        raise ValueError(
          f"layer {path}: einsum {equation!r}: index {c!r} has size {size[c]} "
          f"in the activation and {d} in the weight"
        )
  batch = [c for c in lhs if c in rhs and c in out]
  contract = [c for c in lhs if c in rhs and c not in out]
  lhs_free = [c for c in lhs if c not in rhs]
  rhs_free = [c for c in rhs if c not in lhs]
  dims = (
    (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
    (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
  )
  produced = batch + lhs_free + rhs_free
  perm = tuple(produced.index(c) for c in out)
  return EinsumPlan(
    dims,
    None if perm == tuple(range(len(perm))) else perm,
    tuple(rhs.index(c) if c in rhs else None for c in out),
  )


def einsum(
  ctx: QuantContext,
  equation: str,
  lhs,
  rhs,
  weight_q: WeightQuant | None,
  act_q: ActQuant | None,
  *,
  precision=None,
  dtype=None,
):
  """Quantized ``jnp.einsum(equation, lhs, rhs)`` of an activation and a weight (or the
  ``QArray`` ``convert`` stored), through :func:`qatjax.ops.dot_general.dot_general`."""
  plan = plan_einsum(equation, lhs.shape, rhs.shape, ctx.path)
  y = dot.dot_general(
    ctx, lhs, rhs, plan.dimension_numbers, weight_q, act_q, precision=precision, dtype=dtype
  )
  return y if plan.out_perm is None else lax.transpose(y, plan.out_perm)
