"""``QuantRules``: per-layer configs chosen by regular expressions over module paths."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from qatjax.core.config import QuantConfig


@dataclasses.dataclass(frozen=True)
class QuantRules:
  """Ordered ``(regex, config)`` pairs: a module path takes the config of the first match.

  Paths are module names joined by ``/`` (``"Conv_0"``, ``"encoder/Dense_1"``); a rule matches
  a path only if its regex matches the *whole* path (``re.fullmatch``): ``"Dense_1"`` matches
  ``Dense_1`` but not ``Dense_10`` or ``block/Dense_1`` (write ``".*Dense_1"`` for the latter). A
  config of ``None`` keeps the matched layers float; a path that matches no rule is also float.

  Its ``repr`` is one line per rule (the configs' non-default fields, and their bit widths),
  and evaluates back to equal rules.

  Example:
    >>> r = rules({"head": None, ".*": QuantConfig(4, 4, method="lsq")})
    >>> r
    rules({
      'head': None,  # float
      '.*': QuantConfig(weight_bits=4, act_bits=4, method='lsq'),  # W4A4
    })
    >>> eval(repr(r)) == r
    True
  """

  patterns: tuple[tuple[str, QuantConfig | None], ...]

  def __repr__(self) -> str:
    lines = [
      f"  {pattern!r}: {_config_repr(cfg)},  # {'float' if cfg is None else cfg.bits_label}"
      for pattern, cfg in self.patterns
    ]
    return "\n".join(["rules({", *lines, "})"]) if lines else "rules({})"

  def __post_init__(self):
    for pattern, cfg in self.patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"rule regex {pattern!r} does not compile: {e}") from None
      if cfg is not None and not isinstance(cfg, QuantConfig):
        raise ValueError(f"rule {pattern!r} must map to a QuantConfig or None, got {cfg!r}")

  def match(self, path: str) -> tuple[str | None, QuantConfig | None]:
    """Returns ``(pattern, config)`` of the first rule matching ``path``, else ``(None, None)``.

    Example:
      >>> rules({"Dense_.*": None}).match("Dense_3"), rules({"Dense_.*": None}).match("Conv_0")
      (('Dense_.*', None), (None, None))
    """
    for pattern, cfg in self.patterns:
      if re.fullmatch(pattern, path):
        return pattern, cfg
    return None, None

  def lookup(self, path: str) -> QuantConfig | None:
    """The config of the first rule matching the whole ``path`` (``None``: keep it float).

    Example:
      >>> rules({"Conv_.*": QuantConfig(4, 4)}).lookup("Conv_1").weight_bits
      4
    """
    return self.match(path)[1]


def _config_repr(cfg: QuantConfig | None) -> str:
  """``QuantConfig(...)`` with only the fields that differ from their defaults."""
  if cfg is None:
    return "None"
  changed = [
    f"{f.name}={getattr(cfg, f.name)!r}"
    for f in dataclasses.fields(cfg)
    if getattr(cfg, f.name) != f.default
  ]
  return f"QuantConfig({', '.join(changed)})"


def rules(mapping: Mapping[str, QuantConfig | None]) -> QuantRules:
  """Per-layer mixed precision: regular expressions over module paths to configs.

  A module path is its names joined by ``/`` (``"Conv_0"``, ``"encoder/layers_1/Dense_0"``). Each
  regex must match the *whole* path (``re.fullmatch``), so ``"Dense_1"`` does not catch
  ``Dense_10`` or ``block/Dense_1``; use ``".*"`` to match any prefix. The first matching entry (in
  insertion order) wins.

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
    >>> r.match("Dense_10")[0]    # whole-path matching: "Dense_1" does not catch Dense_10
    '.*'
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
  raise ValueError(
    f"config of layer {path!r} must be a QuantConfig, QuantRules or None, got {config!r}"
  )
