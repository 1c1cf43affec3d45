"""Flax Linen modules (``QDense``, ``QConv``, ...) and ``quantize_model``: thin users of the
quantized ops through ``LinenContext``."""
