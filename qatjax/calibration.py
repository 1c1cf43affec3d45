"""Calibrators: pure functions that track the float range of a tensor (see ``_calibration``)."""

from qatjax.core.calibration import (
  CALIBRATORS,
  Calibrator,
  RangeState,
  batch_minmax,
  batch_mse_range,
  batch_percentile,
  ema_minmax,
  minmax,
  mse,
  percentile,
)

__all__ = [
  "CALIBRATORS",
  "Calibrator",
  "RangeState",
  "batch_minmax",
  "batch_mse_range",
  "batch_percentile",
  "ema_minmax",
  "minmax",
  "mse",
  "percentile",
]
