"""Quantized ops: ``dot_general``, ``conv`` and the embedding lookup, each owning its fake-quant
forward, what ``convert`` records and its integer kernel; state through a ``QuantContext``."""
