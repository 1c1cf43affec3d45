"""qatjax: quantization-aware training for JAX and Flax.

The public API is re-exported here (``__all__``). Submodules with extra dependencies load on
first use: ``qatjax.training`` (orbax, tqdm, matplotlib), ``qatjax.export`` (onnx) and
``qatjax.nnx`` (Flax NNX). The
packages ``core``, ``ops``, ``linen`` and ``model`` hold the implementation (see
``docs/architecture.md``).
"""

import importlib

from qatjax import calibration
from qatjax.core.config import QuantConfig
from qatjax.core.fake_quant import fake_quant, lsq_fake_quant, lsq_grad_scale, lsq_init_scale, pact
from qatjax.core.qarray import QArray, pack_int4, unpack_int4
from qatjax.core.quantize import dequantize, int_dtype, quantize
from qatjax.core.ranges import EPS, qrange, scale_zero_point
from qatjax.core.rules import QuantRules, rules
from qatjax.linen.act import QAct
from qatjax.linen.conv import QConv
from qatjax.linen.conv_bn import QConvBN
from qatjax.linen.coverage import coverage
from qatjax.linen.dense import QDense, QDenseGeneral
from qatjax.linen.einsum import QEinsum
from qatjax.linen.embed import QEmbed
from qatjax.linen.quantize_model import QuantizedModel, quantize_model, rules_report
from qatjax.model.convert import convert
from qatjax.model.flags import set_quant_flags
from qatjax.model.from_float import from_float
from qatjax.model.serialize import load_quantized, save_quantized
from qatjax.model.size import LayerSize, SizeReport, compare_sizes, model_size
from qatjax.ops.product import qat_forward

__version__ = "0.1.0"

# Loaded on first attribute access (PEP 562): their optional dependencies stay optional.
_LAZY_SUBMODULES = ("training", "export", "nnx")


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"qatjax.{name}")
  raise AttributeError(f"module 'qatjax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
  "EPS",
  "LayerSize",
  "QAct",
  "QArray",
  "QConv",
  "QConvBN",
  "QDense",
  "QDenseGeneral",
  "QEinsum",
  "QEmbed",
  "QuantConfig",
  "QuantRules",
  "QuantizedModel",
  "SizeReport",
  "calibration",
  "compare_sizes",
  "convert",
  "coverage",
  "dequantize",
  "fake_quant",
  "from_float",
  "int_dtype",
  "load_quantized",
  "lsq_fake_quant",
  "lsq_grad_scale",
  "lsq_init_scale",
  "model_size",
  "pack_int4",
  "pact",
  "qat_forward",
  "qrange",
  "quantize",
  "quantize_model",
  "rules",
  "rules_report",
  "save_quantized",
  "scale_zero_point",
  "set_quant_flags",
  "unpack_int4",
]
