"""Whole-model functions on variables: ``convert``, ``from_float``, ``set_quant_flags``,
``model_size`` and ``save_quantized`` / ``load_quantized``."""
