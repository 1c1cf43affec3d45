"""Converted models really compute integer products: the program of ``model.apply(qvars, x)``.

``convert`` promises that a converted layer multiplies int8 by int8 into int32 (Jacob et al.
2018). The agreement tests (test_layers_convert.py) cannot see *how* a value is computed: a float
matmul of the dequantized operands gives the same numbers. Here the jaxpr of
``model.apply(qvars, x)`` is read instead. Each serving path of the library is one entry of
``PATHS`` (a one-layer model and the kind of product it must run):

* ``"int8"``: every ``dot_general`` / ``conv_general_dilated`` has int8 operands and an int32
  accumulator (``preferred_element_type``), and there is at least one; or, on CPUs with fast
  bfloat16 products (``core.exact_dot``), bfloat16 operands converted straight from int8 and a
  float32 accumulator (the same int32 sums, exactly);
* ``"exact_f32"``: XLA:CPU's few-channel convolution (``int_conv``): a float32 conv at
  ``HIGHEST`` precision whose operands are the integers themselves (``qx - zx`` and ``qw``
  converted from int8, no scale), so every partial sum is an exact integer;
* ``"weight_only"``: no activation quantizer (by configuration, or ``QEmbed.attend``, whose query
  ``QEmbed`` does not quantize): a float product whose weight comes from the stored int8 values.

A new serving path (attention matmuls, an int8 ``Embed.attend``) is one more entry. Not listed:
per-group convolutions, which ``ops/conv.py`` serves as a float conv of the dequantized integers
by design (no single int32 zero-point correction exists for them).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.extend.core import jaxprs_in_params
from test_layers_helpers import JitApply, cheap_init, rand

from qatjax import QConv, QConvBN, QDense, QDenseGeneral, QEmbed, QuantConfig, convert

W8A8 = QuantConfig()
PRODUCTS = ("dot_general", "conv_general_dilated")


class One(nn.Module):
  """One quantized layer (``make()``), called as ``call(layer, x)``."""

  make: Callable
  call: Callable | None = None

  @nn.compact
  def __call__(self, x):
    layer = self.make()
    return layer(x) if self.call is None else self.call(layer, x)


def _stored_logically(qv):
  """The dense kernel re-stored in its logical ``(K, N)`` order (a QArray that ``convert`` did
  not write, e.g. loaded from an older file): served by the batched matmul, not the NK one."""
  p = qv["params"]["layer"]
  return {**qv, "params": {"layer": {**p, "kernel": p["kernel"].with_perm(None)}}}


def _dense(features, cfg):
  return lambda: QDense(features, config=cfg, kernel_init=cheap_init, name="layer")


def _conv(features, cfg):
  return lambda: QConv(features, (3, 3), config=cfg, kernel_init=cheap_init, name="layer")


FEW_CHANNELS_KIND = "exact_f32" if jax.default_backend() == "cpu" else "int8"

# name -> (model, float input shape, expected kind, transform of the converted variables)
PATHS = {
  "dense": (One(_dense(5, W8A8)), (3, 16), "int8", None),
  "dense_single_row": (One(_dense(5, W8A8)), (1, 16), "int8", None),
  "dense_many_rows": (One(_dense(5, W8A8)), (70, 16), "int8", None),
  "dense_int4_packed": (One(_dense(5, QuantConfig(4, 8))), (3, 16), "int8", None),
  "dense_per_group": (
    One(_dense(5, QuantConfig(4, 8, weight_granularity="per_group", weight_group_size=4))),
    (3, 16),
    "int8",
    None,
  ),
  "dense_stored_logical_order": (One(_dense(5, W8A8)), (3, 16), "int8", _stored_logically),
  "dense_general": (
    One(
      lambda: QDenseGeneral((2, 3), axis=(1, 2), config=W8A8, kernel_init=cheap_init, name="layer")
    ),
    (2, 3, 4, 5),
    "int8",
    None,
  ),
  "conv": (One(_conv(6, W8A8)), (2, 6, 6, 8), "int8", None),
  "conv_bn": (
    One(
      lambda: QConvBN(6, (3, 3), config=W8A8, kernel_init=cheap_init, name="layer"),
      lambda layer, x: layer(x, use_running_average=True),
    ),
    (2, 6, 6, 8),
    "int8",
    None,
  ),
  "conv_few_channels": (One(_conv(6, W8A8)), (2, 6, 6, 3), FEW_CHANNELS_KIND, None),
  "dense_weight_only": (One(_dense(5, QuantConfig(4, None))), (3, 16), "weight_only", None),
  "embed_attend": (
    One(
      lambda: QEmbed(11, 16, config=W8A8, embedding_init=cheap_init, name="layer"),
      lambda layer, x: layer.attend(x),
    ),
    (3, 16),
    "int8",  # attend quantizes its query with the activation settings: an int8 x int8 product
    None,
  ),
}


def _products(jaxpr):
  """Every product equation of ``jaxpr``, nested jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in PRODUCTS:
      yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from _products(sub)


def _producers(jaxpr):
  return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}


def _made_from_int8(var, producers):
  """Whether ``var`` is an int8 value converted to float with nothing else in between."""
  eqn = producers.get(var)
  return (
    eqn is not None
    and eqn.primitive.name == "convert_element_type"
    and eqn.invars[0].aval.dtype == jnp.int8
  )


def _int8_ancestor(var, producers):
  """Whether an int8 value (a stored integer tensor) is among ``var``'s ancestors."""
  seen, todo = set(), [var]
  while todo:
    v = todo.pop()
    if v in seen or not hasattr(v, "aval"):
      continue
    seen.add(v)
    if v.aval.dtype == jnp.int8:
      return True
    if v in producers:
      todo.extend(producers[v].invars)
  return False


@pytest.fixture(scope="module", params=sorted(PATHS))
def served(request):
  model, shape, kind, transform = PATHS[request.param]
  x = rand(shape, 0)

  @jax.jit
  def calibrated(x):
    v = model.init(jax.random.key(0), x)
    _, stats = model.apply(v, x, mutable=["quant_stats"])
    return {**v, **stats}

  qv = convert(JitApply(model), calibrated(x), x)
  if transform is not None:
    qv = transform(qv)
  return request.param, kind, jax.make_jaxpr(model.apply)(qv, x).jaxpr


def test_converted_layer_runs_its_integer_product(served):
  name, kind, jaxpr = served
  products = list(_products(jaxpr))
  assert products, f"{name}: no product in the served program"
  signature = [
    (e.primitive.name, *(v.aval.dtype.name for v in e.invars), e.params["preferred_element_type"])
    for e in products
  ]
  if kind == "int8":
    producers = _producers(jaxpr)
    for e, sig in zip(products, signature):
      if all(v.aval.dtype == jnp.bfloat16 for v in e.invars):  # exact bfloat16 products
        assert all(_made_from_int8(v, producers) for v in e.invars), (name, signature)
        assert e.params["preferred_element_type"] == jnp.float32, (name, sig)
        continue
      assert [v.aval.dtype for v in e.invars] == [jnp.int8, jnp.int8], (name, signature)
      assert e.params["preferred_element_type"] == jnp.int32, (name, sig)
    return
  # Float products: no int8 product may be left, and each reads the stored integers.
  assert all(v.aval.dtype == jnp.float32 for e in products for v in e.invars), (name, signature)
  producers = _producers(jaxpr)
  top = [e for e in jaxpr.eqns if e.primitive.name in PRODUCTS]
  assert top == products, f"{name}: the product is expected at the top level of the program"
  for e in products:
    lhs, rhs = e.invars
    if kind == "weight_only":
      assert _int8_ancestor(rhs, producers), f"{name}: the weight is not read from int8 values"
      continue
    assert kind == "exact_f32", kind
    assert e.params["precision"] == (lax.Precision.HIGHEST, lax.Precision.HIGHEST), name
    assert _made_from_int8(rhs, producers), f"{name}: the kernel is not the int8 values"
    sub = producers[lhs]  # qx - zx, both converted from integers
    assert sub.primitive.name == "sub" and _made_from_int8(sub.invars[0], producers), name
