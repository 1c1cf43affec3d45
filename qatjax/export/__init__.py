"""Deployment exports of converted models: StableHLO (``jax.export``) and ONNX (QDQ graphs).

``export_onnx`` needs the optional ``onnx`` package (``pip install 'qatjax[export]'``); it is
imported lazily.
"""

from qatjax.export.onnx import export_onnx
from qatjax.export.stablehlo import export_stablehlo, load_stablehlo

__all__ = ["export_onnx", "export_stablehlo", "load_stablehlo"]
