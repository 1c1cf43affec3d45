"""qatjax: quantization-aware training for JAX and Flax.

The public API is re-exported here; modules starting with ``_`` are private.
"""

from qatjax import calibration
from qatjax._fake_quant import fake_quant, lsq_fake_quant, lsq_grad_scale, lsq_init_scale, pact
from qatjax._quantize import dequantize, int_dtype, quantize
from qatjax._ranges import EPS, qrange, scale_zero_point

__version__ = "0.1.0"

__all__ = [
    "EPS",
    "calibration",
    "dequantize",
    "fake_quant",
    "int_dtype",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "lsq_init_scale",
    "pact",
    "qrange",
    "quantize",
    "scale_zero_point",
]
