"""qatjax: quantization-aware training for JAX and Flax.

The public API is re-exported here; modules starting with ``_`` are private. Submodules with
extra dependencies are imported explicitly: ``qatjax.training`` (orbax, tqdm, matplotlib),
``qatjax.export`` (onnx, onnxruntime) and ``qatjax.datasets``.
"""

from qatjax import calibration
from qatjax._act import QAct
from qatjax._config import QuantConfig, QuantRules, rules
from qatjax._conv import QConv
from qatjax._conv_bn import QConvBN
from qatjax._convert import convert
from qatjax._dense import QDense, QDenseGeneral
from qatjax._embed import QEmbed
from qatjax._fake_quant import fake_quant, lsq_fake_quant, lsq_grad_scale, lsq_init_scale, pact
from qatjax._model import (QuantizedModel, from_float, quantize_model, rules_report,
                           set_quant_flags)
from qatjax._qarray import QArray, pack_int4, unpack_int4
from qatjax._quantize import dequantize, int_dtype, quantize
from qatjax._ranges import EPS, qrange, scale_zero_point
from qatjax._serialize import load_quantized, save_quantized
from qatjax._size import LayerSize, SizeReport, compare_sizes, model_size

__version__ = "0.1.0"

__all__ = [
    "EPS",
    "LayerSize",
    "QAct",
    "QArray",
    "QConv",
    "QConvBN",
    "QDense",
    "QDenseGeneral",
    "QEmbed",
    "QuantConfig",
    "QuantRules",
    "QuantizedModel",
    "SizeReport",
    "calibration",
    "compare_sizes",
    "convert",
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
