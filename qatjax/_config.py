"""``QuantConfig``: how one layer quantizes; ``QuantRules``: configs per module path."""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from qatjax._calibration import CALIBRATORS
from qatjax._ranges import check_bits, qrange

METHODS = ("observer", "lsq")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
WEIGHT_CALIBRATIONS = ("minmax", "mse")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How a layer quantizes its weights and its input activations.

  Weights are quantized symmetrically (zero point 0); activations (the layer's *input*) are
  quantized affinely by default, with an unsigned range and a zero point.

  Attributes:
    weight_bits: 2..8, or ``None`` to keep weights float.
    act_bits: 2..8, or ``None`` for weight-only quantization.
    method: ``"observer"``: scales from calibration state (weights: min/max of the current kernel
      per output channel; activations: an EMA of min/max in the ``quant_stats`` collection), with
      the clipped straight-through estimator. ``"lsq"``: learned step sizes in ``params``
      (Esser et al. 2020) for weights and activations, plus a learned offset (LSQ+, Bhalgat et al.
      2020) for affine activations; initialised from the first batch.
    weight_granularity: ``"per_channel"`` (one scale per output feature), ``"per_tensor"`` or
      ``"per_group"`` (blocks of ``weight_group_size`` input features per output feature).
    weight_group_size: group length for ``"per_group"``.
    weight_narrow_range: drop the most negative integer (``[-127, 127]`` at 8 bits). ``None``
      picks True for ``"observer"`` and False for ``"lsq"`` (LSQ uses the full ``[-2**(b-1),
      2**(b-1) - 1]``, which matters at 2 bits).
    weight_calibration: ``"minmax"`` or ``"mse"`` (MSE-optimal clipping search) for observer
      weights.
    act_symmetric: symmetric signed activations (zero point 0) instead of affine unsigned.
    act_calibration: one of ``"ema"``, ``"minmax"``, ``"percentile"``, ``"mse"`` (observer only).
    act_momentum: EMA momentum for the activation range (PyTorch's default is 0.01).
    pact: PACT activations (Choi et al. 2018): the input is clipped to a learned ``[0, alpha]``;
      use only where the input is non-negative (after a ReLU). Implies unsigned activations.
    pact_init: initial alpha.

  Example:
    >>> cfg = QuantConfig(weight_bits=4, act_bits=4, method="lsq")
    >>> cfg.weight_range, cfg.act_range
    ((-8, 7), (0, 15))
  """

  weight_bits: int | None = 8
  act_bits: int | None = 8
  method: str = "observer"
  weight_granularity: str = "per_channel"
  weight_group_size: int | None = None
  weight_narrow_range: bool | None = None
  weight_calibration: str = "minmax"
  act_symmetric: bool = False
  act_calibration: str = "ema"
  act_momentum: float = 0.01
  pact: bool = False
  pact_init: float = 6.0

  def __post_init__(self):
    if self.weight_bits is not None:
      check_bits(self.weight_bits, "weight_bits")
    if self.act_bits is not None:
      check_bits(self.act_bits, "act_bits")
    _check_choice("method", self.method, METHODS)
    _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
    _check_choice("weight_calibration", self.weight_calibration, WEIGHT_CALIBRATIONS)
    _check_choice("act_calibration", self.act_calibration, CALIBRATORS)
    if (self.weight_granularity == "per_group") != (self.weight_group_size is not None):
      raise ValueError("weight_group_size must be set exactly when weight_granularity='per_group'"
                       f", got weight_granularity={self.weight_granularity!r}, "
                       f"weight_group_size={self.weight_group_size!r}")
    if self.weight_group_size is not None and (not isinstance(self.weight_group_size, int)
                                               or self.weight_group_size < 1):
      raise ValueError(f"weight_group_size must be an int >= 1, got {self.weight_group_size!r}")
    if not 0.0 < self.act_momentum <= 1.0:
      raise ValueError(f"act_momentum must be in (0, 1], got {self.act_momentum!r}")
    if self.pact and self.act_bits is None:
      raise ValueError("pact=True needs act_bits, got act_bits=None")
    if self.pact and self.act_symmetric:
      raise ValueError("pact=True clips to [0, alpha] and cannot be act_symmetric=True")
    if self.pact and not self.pact_init > 0:
      raise ValueError(f"pact_init must be > 0, got {self.pact_init!r}")
    if self.method == "lsq" and self.weight_calibration != "minmax":
      raise ValueError("weight_calibration applies to method='observer' only, got "
                       f"weight_calibration={self.weight_calibration!r} with method='lsq'")
    if self.weight_bits is None and self.act_bits is None:
      raise ValueError("QuantConfig quantizes nothing (weight_bits=None and act_bits=None); "
                       "map the layer to None in the rules to keep it float")

  @property
  def narrow(self) -> bool:
    if self.weight_narrow_range is None:
      return self.method == "observer"
    return self.weight_narrow_range

  @property
  def weight_range(self) -> tuple[int, int] | None:
    """``(qmin, qmax)`` of the weights, or ``None``."""
    if self.weight_bits is None:
      return None
    return qrange(self.weight_bits, signed=True, narrow=self.narrow)

  @property
  def act_range(self) -> tuple[int, int] | None:
    """``(qmin, qmax)`` of the input activations, or ``None``."""
    if self.act_bits is None:
      return None
    return qrange(self.act_bits, signed=self.act_symmetric)


def _check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantRules:
  """Ordered ``(regex, config)`` pairs: a module path takes the config of the first match.

  Paths are module names joined by ``/`` (``"Conv_0"``, ``"encoder/Dense_1"``) and matched
  with ``re.search``. A config of ``None`` keeps the matched layers float; a path that matches no
  rule is also float.
  """

  patterns: tuple[tuple[str, QuantConfig | None], ...]

  def __post_init__(self):
    for pattern, cfg in self.patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"rule regex {pattern!r} does not compile: {e}") from None
      if cfg is not None and not isinstance(cfg, QuantConfig):
        raise ValueError(f"rule {pattern!r} must map to a QuantConfig or None, got {cfg!r}")

  def match(self, path: str) -> tuple[str | None, QuantConfig | None]:
    """Returns ``(pattern, config)`` of the first rule matching ``path``, else ``(None, None)``."""
    for pattern, cfg in self.patterns:
      if re.search(pattern, path):
        return pattern, cfg
    return None, None

  def lookup(self, path: str) -> QuantConfig | None:
    return self.match(path)[1]


def rules(mapping: Mapping[str, QuantConfig | None]) -> QuantRules:
  """Per-layer mixed precision: regular expressions over module paths to configs.

  The first matching entry (in insertion order) wins.

  Args:
    mapping: ``{regex: QuantConfig or None}``.

  Returns:
    A :class:`QuantRules`, usable wherever a layer takes ``config``.

  Raises:
    ValueError: a regex that does not compile, or a value that is not a config.

  Example:
    >>> r = rules({"Conv_0|Dense_1": QuantConfig(8, 8), ".*": QuantConfig(4, 4, method="lsq")})
    >>> r.lookup("Conv_0").weight_bits, r.lookup("Conv_1").weight_bits
    (8, 4)
  """
  if not isinstance(mapping, Mapping):
    raise ValueError(f"rules expects a mapping of regex -> QuantConfig, got {mapping!r}")
  return QuantRules(tuple(mapping.items()))


def resolve(config, path: str) -> QuantConfig | None:
  """The config a layer at ``path`` uses: ``config`` itself, or its rule for that path."""
  if config is None or isinstance(config, QuantConfig):
    return config
  if isinstance(config, QuantRules):
    return config.lookup(path)
  raise ValueError(f"config of layer {path!r} must be a QuantConfig, QuantRules or None, "
                   f"got {config!r}")
