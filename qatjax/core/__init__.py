"""Pure JAX: integer ranges, granularity, fake quantization (straight-through estimators),
quantize / dequantize, calibration, ``QArray`` and the integer kernels. No Flax state."""
