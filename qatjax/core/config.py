"""``QuantConfig``: how one layer quantizes; resolved once into :class:`WeightQuant` /
:class:`ActQuant`, the per-tensor specs the quantized ops read."""

from __future__ import annotations

import dataclasses
import functools

from qatjax.core import calibration as cal
from qatjax.core.ranges import check_bits, qrange

METHODS = ("observer", "lsq")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
WEIGHT_CALIBRATIONS = ("minmax", "mse")
ACT_CALIBRATIONS = (*cal.CALIBRATORS, "dynamic")
ACT_GRANULARITIES = ("per_tensor", "per_token")
DEFAULT_ACT_MOMENTUM = 0.01
SCALE_DTYPES = ("float32", "float16", "bfloat16")
LSQ_INITS = ("mse", "minmax", "lsq")


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
    act_calibration: one of ``"ema"``, ``"minmax"``, ``"percentile"``, ``"mse"`` (observer
      statistics in ``quant_stats``), or ``"dynamic"``: the scale (and zero point) is computed
      from the current tensor on the fly, in training and in the integer model alike, with no
      state (the LLM recipe; W4A8 = ``QuantConfig(4, 8, act_calibration="dynamic",
      act_granularity="per_token", ...)``).
    act_momentum: EMA momentum for the activation range (PyTorch's default is 0.01).
    act_percentile: with ``act_calibration="percentile"``, the percentile (in percent, in
      ``(50, 100]``) of each batch taken as the range's upper end; ``100 - act_percentile`` is
      the lower end.
    pact: PACT activations (Choi et al. 2018): the input is clipped to a learned ``[0, alpha]``;
      use only where the input is non-negative (after a ReLU). Implies unsigned activations.
    pact_init: initial alpha.
    act_granularity: ``"per_tensor"``, or ``"per_token"`` (dynamic only): one scale per row of
      the activation, i.e. per index of the axes the op does not contract.
    attention_matmuls: for attention modules matched by a rule (``quantize_model``): ``None``
      (default) quantizes their two activation x activation matmuls (``q.k`` and ``p.v``, both
      operands with the activation settings) when ``act_bits`` is set; ``False`` keeps them
      float; ``True`` marks an attention-only rule: it must match attention modules only.
    fold_batch_norm: for a conv that ``quantize_model`` finds feeding a ``nn.BatchNorm``
      directly: fold the BatchNorm into it, in QAT and in ``convert``, as ``QConvBN`` does
      (default); ``False`` keeps the BatchNorm float.
    weight_scale_dtype: ``"float32"``, or ``"float16"`` / ``"bfloat16"``: weight scales are
      rounded to it in training (so the integer model computes the same values) and stored in
      it after ``convert`` (int4 in groups of 32 with float16 scales is GGML's Q4_0 layout,
      4.5 bits per weight).
    lsq_init: how ``method="lsq"`` sets its initial steps, per scale for the weights and per
      tensor from the first batch for the activations: ``"mse"`` (default) the step whose
      fake-quant error is smallest among shrunken min/max ranges (the MSE-optimal
      initialisation LSQ+ recommends, Bhalgat et al. 2020; see
      :func:`~qatjax.core.calibration.batch_mse_range`), for weights among the steps that do not
      shrink them (``no_shrink``); ``"minmax"`` the full min/max range; ``"lsq"`` LSQ's
      ``2 * mean(|x|) / sqrt(qmax)`` (Esser et al. 2020), several times too coarse at 8 bits,
      with affine activations taking the batch's min/max range (LSQ+). Affine activations get
      the zero point of the chosen range.

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
  act_percentile: float = 99.99
  pact: bool = False
  pact_init: float = 6.0
  act_granularity: str = "per_tensor"
  attention_matmuls: bool | None = None
  fold_batch_norm: bool = True
  weight_scale_dtype: str = "float32"
  lsq_init: str = "mse"

  def __post_init__(self):
    if self.weight_bits is not None:
      check_bits(self.weight_bits, "weight_bits")
    if self.act_bits is not None:
      check_bits(self.act_bits, "act_bits")
    _check_choice("method", self.method, METHODS)
    _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
    _check_choice("weight_calibration", self.weight_calibration, WEIGHT_CALIBRATIONS)
    _check_choice("act_calibration", self.act_calibration, ACT_CALIBRATIONS)
    _check_choice("act_granularity", self.act_granularity, ACT_GRANULARITIES)
    _check_choice("weight_scale_dtype", self.weight_scale_dtype, SCALE_DTYPES)
    _check_choice("lsq_init", self.lsq_init, LSQ_INITS)
    self._check_dynamic()
    if (self.weight_granularity == "per_group") != (self.weight_group_size is not None):
      raise ValueError(
        "weight_group_size must be set exactly when weight_granularity='per_group'"
        f", got weight_granularity={self.weight_granularity!r}, "
        f"weight_group_size={self.weight_group_size!r}"
      )
    if self.weight_group_size is not None and (
      not isinstance(self.weight_group_size, int) or self.weight_group_size < 1
    ):
      raise ValueError(f"weight_group_size must be an int >= 1, got {self.weight_group_size!r}")
    if not 0.0 < self.act_momentum <= 1.0:
      raise ValueError(f"act_momentum must be in (0, 1], got {self.act_momentum!r}")
    _check_percentile(self.act_percentile, self.act_calibration)
    if self.pact and self.act_bits is None:
      raise ValueError("pact=True needs act_bits, got act_bits=None")
    if self.pact and self.act_symmetric:
      raise ValueError("pact=True clips to [0, alpha] and cannot be act_symmetric=True")
    if self.pact and not self.pact_init > 0:
      raise ValueError(f"pact_init must be > 0, got {self.pact_init!r}")
    if self.method == "lsq" and self.weight_calibration != "minmax":
      raise ValueError(
        "weight_calibration applies to method='observer' only, got "
        f"weight_calibration={self.weight_calibration!r} with method='lsq'"
      )
    if self.method != "lsq" and self.lsq_init != "mse":
      raise ValueError(
        f"lsq_init applies to method='lsq' only, got lsq_init={self.lsq_init!r} "
        f"with method={self.method!r}"
      )
    if self.weight_bits is None and self.act_bits is None:
      raise ValueError(
        "QuantConfig quantizes nothing (weight_bits=None and act_bits=None); "
        "map the layer to None in the rules to keep it float"
      )

  def _check_dynamic(self):
    if self.act_calibration != "dynamic":
      if self.act_granularity != "per_tensor":
        raise ValueError(
          f"act_granularity={self.act_granularity!r} needs act_calibration='dynamic' (static "
          f"activation scales are per tensor), got act_calibration={self.act_calibration!r}"
        )
      return
    observer_only = {"pact": self.pact, "act_momentum": self.act_momentum != DEFAULT_ACT_MOMENTUM}
    bad = [name for name, is_set in observer_only.items() if is_set]
    if bad:
      raise ValueError(
        f"act_calibration='dynamic' computes scales from each tensor and cannot be combined with "
        f"{bad[0]}={getattr(self, bad[0])!r} (a setting of calibrated or learned activations)"
      )

  @property
  def narrow(self) -> bool:
    """Whether the weight range drops its most negative integer (see ``weight_narrow_range``).

    Example:
      >>> QuantConfig().narrow, QuantConfig(method="lsq").narrow   # observer: [-127, 127]
      (True, False)
    """
    if self.weight_narrow_range is None:
      return self.method == "observer"
    return self.weight_narrow_range

  @property
  def weight_range(self) -> tuple[int, int] | None:
    """``(qmin, qmax)`` of the weights, or ``None``.

    Example:
      >>> QuantConfig(weight_bits=2).weight_range, QuantConfig(2, method="lsq").weight_range
      ((-1, 1), (-2, 1))
    """
    if self.weight_bits is None:
      return None
    return qrange(self.weight_bits, signed=True, narrow=self.narrow)

  @property
  def act_range(self) -> tuple[int, int] | None:
    """``(qmin, qmax)`` of the input activations, or ``None``.

    Example:
      >>> QuantConfig(act_bits=4).act_range, QuantConfig(act_bits=4, act_symmetric=True).act_range
      ((0, 15), (-8, 7))
    """
    if self.act_bits is None:
      return None
    return qrange(self.act_bits, signed=self.act_symmetric)

  @property
  def bits_label(self) -> str:
    """The bit widths in short: ``"W4A8"``, ``"W4 (float act)"``, ``"A8 (float weights)"``.

    Example:
      >>> QuantConfig(4, 8).bits_label, QuantConfig(weight_bits=4, act_bits=None).bits_label
      ('W4A8', 'W4 (float act)')
    """
    if self.act_bits is None:
      return f"W{self.weight_bits} (float act)"
    if self.weight_bits is None:
      return f"A{self.act_bits} (float weights)"
    return f"W{self.weight_bits}A{self.act_bits}"

  @functools.cached_property
  def weight_quant(self) -> WeightQuant | None:
    """The weights' resolved spec (``None``: float weights).

    Example:
      >>> QuantConfig(weight_bits=4, method="lsq").weight_quant.qmax
      7
    """
    if self.weight_bits is None:
      return None
    qmin, qmax = self.weight_range
    return WeightQuant(
      self.weight_bits,
      qmin,
      qmax,
      self.method,
      self.weight_granularity,
      self.weight_group_size,
      self.weight_calibration,
      self.weight_scale_dtype,
      self.lsq_init,
    )

  @functools.cached_property
  def act_quant(self) -> ActQuant | None:
    """The input activations' resolved spec (``None``: float activations).

    Example:
      >>> QuantConfig(act_bits=8, pact=True).act_quant.method
      'pact'
    """
    if self.act_bits is None:
      return None
    qmin, qmax = self.act_range
    method = "pact" if self.pact else self.method
    if self.act_calibration == "dynamic":
      method = "dynamic"
    calibrator = _act_calibrator(self, qmin, qmax) if method == "observer" else None
    return ActQuant(
      self.act_bits,
      qmin,
      qmax,
      self.act_symmetric,
      method,
      calibrator,
      self.pact_init,
      self.act_granularity,
      self.lsq_init,
    )


def _check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_percentile(p, calibration):
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < p <= 100.0:
    raise ValueError(f"act_percentile must be a number in (50, 100], got {p!r}")
  default = QuantConfig.__dataclass_fields__["act_percentile"].default
  if p != default and calibration != "percentile":
    raise ValueError(
      f"act_percentile applies to act_calibration='percentile' only, got act_percentile={p!r} "
      f"with act_calibration={calibration!r}"
    )


def _act_calibrator(cfg: QuantConfig, qmin: int, qmax: int) -> cal.Calibrator:
  kind = cfg.act_calibration
  if kind == "ema":
    return cal.ema_minmax(cfg.act_momentum)
  if kind == "minmax":
    return cal.minmax()
  if kind == "percentile":
    # Rounded so that the default 99.99 gives exactly the calibrator's 0.01 lower percentile.
    lower = round(100.0 - cfg.act_percentile, 10)
    return cal.percentile(lower, float(cfg.act_percentile), momentum=cfg.act_momentum)
  return cal.mse(qmin, qmax, symmetric=cfg.act_symmetric, momentum=cfg.act_momentum)


@dataclasses.dataclass(frozen=True)
class WeightQuant:
  """How one weight tensor is quantized, resolved from a :class:`QuantConfig`.

  Symmetric (zero point 0). The op that owns the tensor supplies the layout: which axes are
  contracted (a scale is shared along them) and along which the groups run.

  Attributes:
    bits: 2..8.
    qmin: smallest integer.
    qmax: largest integer.
    method: ``"observer"`` (scale from the current weights) or ``"lsq"`` (learned step).
    granularity: ``"per_tensor"``, ``"per_channel"`` or ``"per_group"``.
    group_size: group length along the contraction (``"per_group"``), else ``None``.
    scale_dtype: the dtype the scales are rounded to and stored in after ``convert``.
    calibration: ``"minmax"`` or ``"mse"`` (observer weights).
    lsq_init: ``"mse"``, ``"minmax"`` or ``"lsq"``: the initial learned step (``method="lsq"``).
  """

  bits: int
  qmin: int
  qmax: int
  method: str
  granularity: str
  group_size: int | None
  calibration: str
  scale_dtype: str = "float32"
  lsq_init: str = "mse"


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """How one activation tensor (an op's input) is quantized, resolved from a
  :class:`QuantConfig`.

  Attributes:
    bits: 2..8.
    qmin: smallest integer.
    qmax: largest integer.
    symmetric: zero point fixed (0 for a signed range).
    method: ``"observer"`` (calibrated range state), ``"lsq"`` (learned step and offset),
      ``"pact"`` (learned clipping level) or ``"dynamic"`` (from each tensor, no state).
    calibrator: the observer's range tracker (``method="observer"``), else ``None``.
    pact_init: PACT's initial clipping level.
    granularity: ``"per_tensor"`` or ``"per_token"`` (one scale per row; dynamic only).
    lsq_init: ``"mse"``, ``"minmax"`` or ``"lsq"``: the first batch's initial step and offset
      (``method="lsq"``).
  """

  bits: int
  qmin: int
  qmax: int
  symmetric: bool
  method: str
  calibrator: cal.Calibrator | None = dataclasses.field(compare=False, repr=False)
  pact_init: float
  granularity: str = "per_tensor"
  lsq_init: str = "mse"
