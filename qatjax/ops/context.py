"""``QuantContext``: the state interface every quantized op reads and writes through.

A quantized op (:mod:`qatjax.ops.dot_general`, :mod:`~qatjax.ops.conv`,
:mod:`~qatjax.ops.embed`) never touches a framework directly. It asks its context for

* learned quantizer parameters (LSQ steps and offsets, PACT clip levels), trained with the
  weights: :meth:`QuantContext.param`;
* observer statistics and the per-layer switches (``enabled``, ``observe``), which are not
  trained: :meth:`QuantContext.stat`, updated only while :attr:`QuantContext.observing`;
* what :func:`qatjax.convert` collects from the op: :meth:`QuantContext.record`, active only while
  :attr:`QuantContext.recording`;
* the values ``convert`` stored for integer serving: :meth:`QuantContext.converted`.

The Linen implementation is :class:`qatjax.linen.context.LinenContext` (one bound module); an NNX
implementation maps the same names to the attributes of an ``nnx.Module``. Names are plain leaf
names (``"kernel_scale"``, ``"input_min"``); their kinds are listed in :mod:`qatjax.ops.registry`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Protocol

import jax.numpy as jnp


class Ref(Protocol):
  """A mutable state cell: ``ref.value`` reads, ``ref.value = v`` writes."""

  value: Any


class QuantContext(abc.ABC):
  """Where one quantized layer keeps its quantizer state (see the module docstring)."""

  @property
  @abc.abstractmethod
  def path(self) -> str:
    """The layer's path (``"block/Dense_0"``), for error messages and rules."""

  @abc.abstractmethod
  def param(self, name: str, init: Callable[[], Any]) -> Any:
    """The learned quantizer parameter ``name``, created as ``init()`` on first use."""

  @abc.abstractmethod
  def stat(self, name: str, init: Callable[[], Any]) -> Ref:
    """The statistic or switch ``name`` (not trained), created as ``init()`` on first use."""

  @property
  @abc.abstractmethod
  def observing(self) -> bool:
    """Whether statistics may be written now (training with mutable statistics)."""

  @property
  @abc.abstractmethod
  def recording(self) -> bool:
    """Whether :func:`qatjax.convert` is collecting the integer deployment now."""

  @abc.abstractmethod
  def record(self, name: str, value: Any) -> None:
    """Stores ``value`` as the converted variable ``name`` (only while :attr:`recording`)."""

  @abc.abstractmethod
  def converted(self, name: str) -> Any | None:
    """The converted variable ``name`` that ``convert`` stored, or ``None``."""


def flags(ctx: QuantContext):
  """The layer's ``(enabled, observe)`` switches (boolean scalars, created on).

  ``enabled=False`` makes every quantizer of the layer an identity (float warm-up);
  ``observe=False`` freezes its observers. :func:`qatjax.set_quant_flags` and the QAT schedule set
  them, traced, without recompiling.
  """
  on = lambda: jnp.ones((), jnp.bool_)
  return ctx.stat("enabled", on).value, ctx.stat("observe", on).value
