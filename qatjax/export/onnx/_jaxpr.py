"""Walking the pass-2 jaxpr: each equation becomes ONNX nodes.

Values are numpy constants (folded with JAX as long as every input of an equation is one), graph
tensors, or lazy :class:`~qatjax.export.onnx._graph.Scaled` tensors. A ``LAYER`` equation goes to
its kind's emitter (:data:`~qatjax.export.onnx._layers.EMITTERS`), call-like primitives (``jit``,
``custom_jvp_call``, ...) are inlined, and every other primitive goes to its handler
(:data:`~qatjax.export.onnx._primitives.HANDLERS`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from qatjax.export.onnx._graph import Builder, Tensor
from qatjax.export.onnx._layers import EMITTERS
from qatjax.export.onnx._primitives import handler_for
from qatjax.export.onnx._record import LAYER, Layer

# Primitives that only call a sub-jaxpr: always inlined.
_CALLS = (
  "jit",
  "pjit",
  "closed_call",
  "core_call",
  "custom_jvp_call",
  "custom_vjp_call",
  "custom_vjp_call_jaxpr",
  "remat",
  "checkpoint",
  "named_call",
)


def _sub_jaxpr(params) -> jcore.ClosedJaxpr | None:
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub
    if isinstance(sub, jcore.Jaxpr):
      return jcore.ClosedJaxpr(sub, ())
  return None


def _is_const(v) -> bool:
  return isinstance(v, np.ndarray)


class JaxprToOnnx:
  """Translates a jaxpr with ``LAYER`` equations into the nodes of ``builder``."""

  def __init__(self, builder: Builder, layers: list[Layer]):
    self.b, self.layers = builder, layers

  def run(self, closed: jcore.ClosedJaxpr, args) -> list:
    """The values of ``closed``'s outputs for the values ``args`` of its inputs."""
    jaxpr = closed.jaxpr
    env = {var: np.asarray(val) for var, val in zip(jaxpr.constvars, closed.consts)}
    env.update(zip(jaxpr.invars, args))

    def read(a):
      return np.asarray(a.val) if isinstance(a, jcore.Literal) else env[a]

    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(a) for a in eqn.invars])
      if not eqn.primitive.multiple_results:
        outs = [outs]
      env.update((v, val) for v, val in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar))
    return [read(a) for a in jaxpr.outvars]

  def eqn(self, eqn, ins):
    """The output value(s) of one equation."""
    prim, params = eqn.primitive, eqn.params
    if prim is LAYER:
      layer, x = self.layers[params["index"]], ins[0]
      if _is_const(x):  # e.g. position embeddings of jnp.arange(length)
        x = Tensor(self.b.init(x, layer.path + ".input"), x.shape, False, x.dtype)
      return EMITTERS[layer.kind](self.b, layer, self.b.tensor(x))
    sub = _sub_jaxpr(params)
    if prim.name in _CALLS or (sub is not None and not all(_is_const(v) for v in ins)):
      if sub is None:
        raise ValueError(f"export_onnx: cannot inline primitive {prim.name!r}")
      return self.run(sub, ins)
    if all(_is_const(v) for v in ins):  # constant folding
      out = prim.bind(*[jnp.asarray(v) for v in ins], **params)
      return [np.asarray(o) for o in out] if prim.multiple_results else np.asarray(out)
    return handler_for(prim.name)(self.b, eqn, ins)
