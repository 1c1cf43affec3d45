"""Models and library adapters for ``bench_peers.py`` (qatjax vs google/qwix vs google/aqt).

One Flax model definition per architecture; each library plugs in by the layer factories it is
given (``dense(features, name=...)``, ``conv(features, kernel_size, strides, name=...)``), so
every variant has the same parameter paths (``dense0``, ``conv0``, ...) and the same float
parameters can start every library's QAT. qwix instead wraps the float model (``quantize_model``
intercepts ``lax.dot_general`` / ``conv_general_dilated``), which keeps the tree as well.

A :class:`Variant` bundles what the shared train step needs: the module, which collections the
step updates (``quant_stats``), and whether ``apply`` needs a ``params`` RNG (AQT does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import qatjax


class MLP(nn.Module):
  """784-512-512-10 (any input shape; flattened)."""

  dense: Callable[..., nn.Module] = nn.Dense
  hidden: int = 512

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(self.dense(self.hidden, name="dense0")(x))
    x = nn.relu(self.dense(self.hidden, name="dense1")(x))
    return self.dense(10, name="dense2")(x)


class CNN(nn.Module):
  """Conv 32 3x3 s1, relu, Conv 64 3x3 s2, relu, flatten, Dense 10 (NHWC input)."""

  dense: Callable[..., nn.Module] = nn.Dense
  conv: Callable[..., nn.Module] = nn.Conv

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.conv(32, (3, 3), strides=(1, 1), name="conv0")(x))
    x = nn.relu(self.conv(64, (3, 3), strides=(2, 2), name="conv1")(x))
    x = x.reshape((x.shape[0], -1))
    return self.dense(10, name="dense0")(x)


def build(arch: str, dense=nn.Dense, conv=nn.Conv) -> nn.Module:
  if arch == "mlp":
    return MLP(dense=dense)
  if arch == "cnn":
    return CNN(dense=dense, conv=conv)
  raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")


@dataclasses.dataclass
class Variant:
  """One library's model plus how the shared train / eval step must call it.

  Attributes:
    name: row label.
    lib: "flax", "qatjax", "qwix" or "aqt".
    model: the Flax module.
    mutable: collections the train step updates (e.g. ``("quant_stats",)``).
    needs_rng: ``apply`` needs ``rngs={"params": key}`` (AQT).
    note: caveat shown in the tables.
    from_float: ``(float_variables, example_batch) -> variables`` to start QAT from float
      weights; default: the float variables as they are (same tree).
    jit_from_float: ``from_float`` may run under ``jax.jit`` (much faster to compile once than
      to run eagerly on a first call).
  """

  name: str
  lib: str
  model: nn.Module
  mutable: tuple[str, ...] = ()
  needs_rng: bool = False
  note: str = ""
  from_float: Callable[[dict, Any], dict] | None = None
  jit_from_float: bool = True

  def init_from_float(self, float_variables, example):
    if self.from_float is None:
      return float_variables
    fn = jax.jit(self.from_float) if self.jit_from_float else self.from_float
    return fn(float_variables, example)


def float_variant(arch: str) -> Variant:
  return Variant("float", "flax", build(arch))


def qatjax_variant(arch: str, bits: int, method: str) -> Variant:
  cfg = qatjax.QuantConfig(bits, bits, method=method)
  model = build(
    arch, functools.partial(qatjax.QDense, config=cfg), functools.partial(qatjax.QConv, config=cfg)
  )
  return Variant(
    f"qatjax W{bits}A{bits} {method}",
    "qatjax",
    model,
    ("quant_stats",),
    from_float=lambda fv, x: qatjax.from_float(model, fv, x),
  )


def _qwix_qtype(bits: int) -> str:
  return {8: "int8", 4: "int4", 2: "int2"}[bits]


def qwix_variant(
  arch: str,
  bits: int,
  *,
  static: bool = True,
  act_bits: int | None = None,
  disable_jit: bool = False,
) -> Variant:
  """qwix QAT (``QtProvider``) on the unmodified float model; ``static``: static-range
  activation scales kept in ``quant_stats`` (else per-example dynamic scales)."""
  import qwix  # optional peer

  act_bits = bits if act_bits is None else act_bits
  rule = qwix.QtRule(
    module_path=".*",
    weight_qtype=_qwix_qtype(bits),
    act_qtype=_qwix_qtype(act_bits),
    act_static_scale=static,
  )
  model = qwix.quantize_model(build(arch), qwix.QtProvider([rule], disable_jit=disable_jit))
  kind = "static" if static else "dynamic"
  name = f"qwix W{bits}A{act_bits}" + ("" if static else f" ({kind} act)")

  def init_from_float(fv, x):
    # params: the float model's (same tree). quant_stats: what init creates, all zeros (count 0,
    # sums 0; the first training batch then sets the scale). jax.jit(model.init) of a qwix conv
    # with static activation scales raises UnexpectedTracerError (the variable is created inside
    # conv_general_qt's custom_vjp) and an eager init is slow, so build them from eval_shape.
    ref = jax.eval_shape(model.init, jax.random.key(0), x)
    out = {
      k: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
      for k, t in ref.items()
      if k != "params"
    }
    out["params"] = fv["params"]
    return out

  return Variant(
    name,
    "qwix",
    model,
    ("quant_stats",) if static else (),
    note=f"{kind} act scale",
    from_float=init_from_float,
    jit_from_float=False,
  )


def aqt_variant(arch: str, bits: int, *, conv: str = "unsupported") -> Variant:
  """AQT ``config_v4`` int-``bits`` forward (backward float) on every ``nn.Dense``.

  ``conv``: ``"unsupported"`` raises for the CNN (AQT conv has no QAT: zero kernel gradient);
  ``"float"`` leaves the convs float (Dense only quantized); ``"forward"`` uses
  ``AqtConvGeneralDilated`` (quantized forward, frozen conv kernels).
  """
  from aqt.jax.v2 import config as aqt_config  # optional peer
  from aqt.jax.v2.flax import aqt_flax

  cfg = aqt_config.config_v4(
    fwd_bits=bits, dlhs_bits=None, drhs_bits=None, fwd_accumulator_dtype=jnp.int32
  )
  dg = functools.partial(
    aqt_flax.AqtDotGeneral,
    cfg,
    lhs_quant_mode=aqt_flax.QuantMode.TRAIN,
    rhs_quant_mode=aqt_flax.QuantMode.TRAIN,
    rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
    use_legacy_freezer=False,
  )
  dense = functools.partial(nn.Dense, dot_general_cls=dg)
  note = "fwd int, bwd float"
  conv_factory = nn.Conv
  name = f"AQT W{bits}A{bits}"
  if arch == "cnn":
    if conv == "unsupported":
      raise NotImplementedError(
        "AQT conv has no QAT: AqtConvGeneralDilated quantizes the forward "
        "pass only and gives the kernel a zero gradient"
      )
    if conv == "forward":
      from aqt.jax.v2 import aqt_conv_general

      conv_cfg = aqt_config.default_unquantized_config()
      conv_cfg.fwd = aqt_conv_general.conv_general_dilated_make(2, bits, bits)
      cg = functools.partial(
        aqt_flax.AqtConvGeneralDilated,
        conv_cfg,
        lhs_quant_mode=aqt_flax.QuantMode.TRAIN,
        rhs_quant_mode=aqt_flax.QuantMode.TRAIN,
      )
      conv_factory = functools.partial(nn.Conv, conv_general_dilated_cls=cg)
      note = "conv: int fwd, zero kernel grad (frozen); dense: fwd int, bwd float"
      name += " (conv fwd-only)"
    else:
      note = "convs float, dense quantized"
      name += " (dense only)"
  model = build(arch, dense, conv_factory)

  def init_from_float(fv, x):
    ref = model.init(jax.random.key(0), x)
    out = {k: v for k, v in ref.items() if k != "params"}
    out["params"] = fv["params"]
    return out

  return Variant(name, "aqt", model, needs_rng=True, note=note, from_float=init_from_float)
