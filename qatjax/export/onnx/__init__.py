"""ONNX export of converted models as QDQ graphs (QuantizeLinear / DequantizeLinear).

The exporter is split by job:

* :mod:`~qatjax.export.onnx._record`: recording the model. Pass 1 runs it once under a Flax method
  interceptor and records every layer call (its registry kind and concrete converted variables);
  pass 2 traces it with :func:`jax.make_jaxpr`, every layer call replaced by one opaque primitive.
* :mod:`~qatjax.export.onnx._graph`: building the graph (nodes, initializers, tensors and the
  NHWC <-> NCHW layout); :mod:`~qatjax.export.onnx._qdq`: the QDQ nodes of inputs and weights.
* :mod:`~qatjax.export.onnx._layers`: one emitter per layer kind (``EMITTERS``).
* :mod:`~qatjax.export.onnx._primitives`: one handler per JAX primitive of the glue between
  layers (``HANDLERS``); :mod:`~qatjax.export.onnx._jaxpr` walks the jaxpr and dispatches.
* :mod:`~qatjax.export.onnx._exporter`: :func:`export_onnx`.

Graph. A layer's input is ``QuantizeLinear -> DequantizeLinear`` with its frozen scale and zero
point (``uint8``, or ``int8`` for symmetric activations; narrower ranges such as 4-bit activations
are clipped with a ``Clip`` first). Its weight is an integer initializer with a per-channel
``DequantizeLinear`` (``axis`` = output channel), per-tensor, or blocked (``block_size``) for
per-group weights. Dense layers are ``MatMul`` (+ ``Add`` of the float bias; ``Gemm`` for 2-D
inputs): a ``QDenseGeneral``'s N-D kernel is stored as the ``(K, N)`` matrix of its contracted
and output axes, its input's contracted axes moved last and merged. Convolutions are ``Conv`` in
NCHW: the (NHWC) input is transposed once before the first conv, and back only where a
layout-sensitive op (reshape / flatten, dense, reductions) needs it. An embedding lookup is
``Gather`` of the dequantized integer table (one scale per row) at the graph's integer input.

Weights of 2..4 bits are stored as ``INT4`` initializers (opset 21, two values per byte, packed by
:func:`qatjax.pack_int4`; pass ``int4=False`` for ``INT8`` storage, which onnxruntime fuses into
integer kernels). 5..8-bit weights are ``INT8``.

Accuracy: onnxruntime computes the same integers as ``model.apply(qvars, x)`` (it fuses
``DQ -> MatMul`` into ``MatMulIntegerToFloat`` / ``QLinearConv``, or runs the dequantized float op
on the same integer values). Differences come from float rounding (about 1e-6 relative) and from
inputs that sit exactly on a rounding boundary (``x / s`` in ONNX, ``x * (1 / s)`` in qatjax): those
move one activation by one step, which changes the output by at most a few output quantization
steps. Weight-only layers (no activation quantizer) are the exception: onnxruntime's extended
optimisations rewrite ``DQ -> MatMul`` into ``MatMulNBits``, which quantizes the float input on the
fly (about 1e-2 relative error); use ``GraphOptimizationLevel.ORT_ENABLE_BASIC`` for those.
"""

from qatjax.export.onnx._exporter import export_onnx

__all__ = ["export_onnx"]
