"""``export_onnx``: the two recording passes, the graph walk, and the checked ``ModelProto``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qatjax.export.onnx._graph import Builder, Tensor
from qatjax.export.onnx._jaxpr import JaxprToOnnx
from qatjax.export.onnx._record import record_layers, trace_glue
from qatjax.linen.quantize_model import QuantizedModel


def _example(example_input):
  """The example input as float32 (float inputs) or as it is (integer ids)."""
  x = jnp.asarray(example_input)
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  elif not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(
      f"export_onnx: example_input must be a float array or integer ids, got {x.dtype}"
    )
  if x.ndim == 0:
    raise ValueError("export_onnx: example_input must have a batch dimension, got a scalar")
  return x


def export_onnx(
  model,
  qvars,
  example_input,
  path=None,
  *,
  opset: int = 21,
  dynamic_batch: bool = True,
  int4: bool = True,
  input_name: str = "input",
  output_name: str = "output",
  apply_kwargs: dict | None = None,
):
  """Exports a converted model to an ONNX QDQ graph.

  Supported models call, in any order, ``QDense`` / ``QDenseGeneral`` / ``QConv`` / ``QConvBN``
  / ``QEmbed`` (lookup and ``attend``; converted with :func:`qatjax.convert`), ``QAct``, and float
  ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` / ``nn.Embed`` (also through
  :func:`qatjax.quantize_model`), with elementwise ops (``nn.relu``, ``jnp.tanh``, adds of tensors
  or constants, ...), ``nn.max_pool`` / ``nn.avg_pool``, reshape / flatten, transpose, reductions
  and ``log_softmax`` between them. The graph input is ``example_input``'s dtype (float32, or
  integer token ids for models that start with an embedding lookup) and layout (channels-last);
  convolutions run in NCHW inside the graph. See :mod:`qatjax.export.onnx` for the graph layout
  and the expected agreement with ``model.apply(qvars, x)``.

  Args:
    model: the (QAT) Flax model.
    qvars: its converted variables (:func:`qatjax.convert`).
    example_input: one input array (float, or integer ids); fixes every dimension but the batch.
    path: optional file to write the model to.
    opset: ONNX opset (>= 21 for ``INT4`` weights and per-group ``block_size``; >= 13 otherwise).
    dynamic_batch: leading dimension symbolic (``"batch"``) instead of ``example_input``'s.
    int4: store weights of 4 bits or fewer as ``INT4`` (else as ``INT8``).
    input_name, output_name: graph input and output names (several outputs get ``_i``).
    apply_kwargs: keyword arguments for ``model.apply`` (e.g. ``{"train": False}``).

  Returns:
    The ``onnx.ModelProto`` (checked with ``onnx.checker.check_model``).

  Raises:
    ValueError: naming an unsupported layer or operation, or an unconverted layer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> cfg = QuantConfig()
    >>> model = nn.Sequential([QDense(8, config=cfg), nn.relu, QDense(3, config=cfg)])
    >>> x = jax.random.normal(jax.random.key(0), (4, 5))
    >>> v = model.init(jax.random.key(1), x)
    >>> _, stats = model.apply(v, x, mutable=["quant_stats"])
    >>> qv = convert(model, {**v, **stats}, x)
    >>> proto = qatjax.export.export_onnx(model, qv, x)
    >>> [n.op_type for n in proto.graph.node][:4]
    ['QuantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'Gemm']

    Token ids make an integer graph input (``6``: ``INT32``), looked up with ``Gather``:

    >>> emb = QEmbed(10, 4, config=QuantConfig(weight_bits=4))
    >>> ids = jnp.array([[1, 2, 3]])
    >>> qv = convert(emb, emb.init(jax.random.key(0), ids), ids)
    >>> proto = qatjax.export.export_onnx(emb, qv, ids)
    >>> [n.op_type for n in proto.graph.node], proto.graph.input[0].type.tensor_type.elem_type
    (['DequantizeLinear', 'Gather', 'Identity'], 6)
  """
  apply_kwargs = dict(apply_kwargs or {})
  if int4 and opset < 21:
    int4 = False
  rules = None
  if isinstance(model, QuantizedModel):
    rules, model = model.rules, model.model
  x = _example(example_input)
  layers = record_layers(model, qvars, x, rules, apply_kwargs)
  closed = trace_glue(model, qvars, x, layers, apply_kwargs)
  b = Builder(int(x.shape[0]), dynamic_batch, int4)
  onnx = b.onnx
  outs = JaxprToOnnx(b, layers).run(closed, [Tensor(input_name, tuple(x.shape), False, x.dtype)])
  graph_outputs = []
  for i, (v, var) in enumerate(zip(outs, closed.jaxpr.outvars)):
    oname = output_name if len(outs) == 1 else f"{output_name}_{i}"
    if isinstance(v, np.ndarray):
      raise ValueError(f"export_onnx: output {i} does not depend on the input")
    t = b.plain(b.tensor(v))
    b.nodes.append(onnx.helper.make_node("Identity", [t.name], [oname], name=b.fresh("n.out")))
    graph_outputs.append(_value_info(b, oname, var.aval.shape, var.aval.dtype))
  graph = onnx.helper.make_graph(
    b.nodes,
    type(model).__name__,
    [_value_info(b, input_name, x.shape, x.dtype)],
    graph_outputs,
    b.inits,
  )
  proto = onnx.helper.make_model(
    graph, opset_imports=[onnx.helper.make_opsetid("", opset)], producer_name="qatjax"
  )
  # The oldest IR version that has this opset: loadable by the widest range of runtimes.
  proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import))
  onnx.checker.check_model(proto)
  if path is not None:
    onnx.save(proto, str(path))
  return proto


def _value_info(b: Builder, name: str, shape, dtype):
  """A graph input / output of ``shape`` and ``dtype`` (leading dim ``"batch"`` if dynamic)."""
  dims = list(shape)
  if b.dynamic and dims and dims[0] == b.batch:
    dims[0] = "batch"
  elem = b.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
  return b.onnx.helper.make_tensor_value_info(name, elem, dims)
