"""Training plots (matplotlib Agg, no pyplot): metric curves, per-layer quantization histograms."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qatjax.core.qarray import QArray
from qatjax.ops.registry import RECORD

BN_EPSILON = 1e-5  # QConvBN's default epsilon, used to fold BN into the kernel for the error plot


def _figure(nrows=1, ncols=1, size=(5.0, 3.5)):
  from matplotlib.figure import Figure  # optional dependency; Figure renders with Agg

  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes.ravel()


def plot_history(history: Sequence[Mapping[str, Any]], plot_dir: str) -> list[str]:
  """Writes ``loss.png`` and ``accuracy.png`` (train / eval curves per epoch) to ``plot_dir``.

  Args:
    history: :func:`fit`'s per-epoch dicts (``epoch``, ``train_loss``, ``eval_loss``, ...).
    plot_dir: output directory (created if needed).

  Returns:
    The paths written (``accuracy.png`` only when the history has accuracies).

  Example:
    >>> import os, tempfile
    >>> from qatjax.training import plot_history
    >>> d = tempfile.mkdtemp()
    >>> paths = plot_history([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": .5}], d)
    >>> [os.path.basename(p) for p in paths]
    ['loss.png']
  """
  os.makedirs(plot_dir, exist_ok=True)
  written = []
  epochs = [h["epoch"] for h in history]
  for metric in ("loss", "accuracy"):
    series = {
      split: [h.get(f"{split}_{metric}", np.nan) for h in history] for split in ("train", "eval")
    }
    series = {k: v for k, v in series.items() if not all(np.isnan(x) for x in v)}
    if not series:
      continue
    fig, (ax,) = _figure()
    for split, values in series.items():
      ax.plot(epochs, values, marker="o", label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(plot_dir, f"{metric}.png")
    fig.savefig(path, dpi=80)
    written.append(path)
  return written


def quantization_summary(state, example_input, apply_kwargs: Mapping[str, Any] | None = None):
  """``{layer: {"weight_scale", "weight_error", "input_scale"}}`` from what ``convert`` records.

  Runs the model once on ``example_input`` with the ``quant_record`` collection mutable (as
  :func:`qatjax.convert` does): ``weight_scale`` are the kernel's quantization scales,
  ``weight_error`` the element-wise ``kernel - dequantize(quantize(kernel))`` (for ``QConvBN``
  the BN-folded kernel, with epsilon 1e-5), ``input_scale`` the activation scale (or ``None``).

  Example:
    >>> import optax
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import create_train_state, quantization_summary
    >>> x = jnp.ones((2, 3))
    >>> s = create_train_state(QDense(4, config=QuantConfig()), optax.sgd(0.1),
    ...                        jax.random.key(0), x)
    >>> info = quantization_summary(s, x)["<root>"]
    >>> info["weight_scale"].shape, info["weight_error"].shape
    ((4,), (12,))
  """
  kwargs = dict(apply_kwargs or {})
  export_fn = jax.jit(lambda v, x: state.apply_fn(v, x, mutable=[RECORD], **kwargs)[1])
  cols = export_fn(state.variables, example_input)
  export = traverse_util.flatten_dict(jax.device_get(cols.get(RECORD, {})), sep="/")
  params = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  stats = traverse_util.flatten_dict(jax.device_get(state.batch_stats or {}), sep="/")
  out = {}
  for key, qa in export.items():
    layer, _, name = key.rpartition("/")
    if not isinstance(qa, QArray):
      continue
    prefix = f"{layer}/" if layer else ""
    entry = {
      "weight_scale": np.ravel(np.asarray(qa.scale)),
      "weight_error": None,
      "input_scale": export.get(f"{prefix}input_scale"),
    }
    w = params.get(f"{prefix}{name}")
    if w is not None:
      w = np.asarray(w, np.float32)
      gamma, var = params.get(f"{prefix}bn_scale"), stats.get(f"{prefix}var")
      if gamma is not None and var is not None:
        w = w * (np.asarray(gamma) / np.sqrt(np.asarray(var) + BN_EPSILON))
      deq = np.asarray(qa.dequantize())
      if deq.shape == w.shape:
        entry["weight_error"] = np.ravel(w - deq)
    out[layer or "<root>"] = entry
  return out


def _grid(n):
  ncols = min(n, 3)
  return math.ceil(n / ncols), ncols


def plot_quantization(
  state, example_input, plot_dir: str, apply_kwargs: Mapping[str, Any] | None = None
) -> list[str]:
  """Writes ``weight_scales.png`` and ``quant_error.png``: one histogram per quantized layer.

  See :func:`quantization_summary` for the values. Nothing is written for a model without
  quantized kernels.

  Example:
    >>> import os, tempfile, optax
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import create_train_state, plot_quantization
    >>> x = jnp.ones((2, 3))
    >>> s = create_train_state(QDense(4, config=QuantConfig()), optax.sgd(0.1),
    ...                        jax.random.key(0), x)
    >>> [os.path.basename(p) for p in plot_quantization(s, x, tempfile.mkdtemp())]
    ['weight_scales.png', 'quant_error.png']
  """
  summary = quantization_summary(state, jnp.asarray(example_input), apply_kwargs)
  if not summary:
    return []
  os.makedirs(plot_dir, exist_ok=True)
  written = []
  for fname, field, xlabel in (
    ("weight_scales.png", "weight_scale", "weight scale"),
    ("quant_error.png", "weight_error", "w - dequant(quant(w))"),
  ):
    layers = [(k, v) for k, v in summary.items() if v[field] is not None]
    if not layers:
      continue
    fig, axes = _figure(*_grid(len(layers)), size=(4.0, 3.0))
    for ax, (layer, entry) in zip(axes, layers):
      values = entry[field]
      ax.hist(values, bins=min(50, max(5, values.size // 4)))
      title = layer
      if field == "weight_scale" and entry["input_scale"] is not None:
        title += f"\ninput scale {float(entry['input_scale']):.3g}"
      elif field == "weight_error":
        title += f"\nRMS {float(np.sqrt(np.mean(values**2))):.3g}"
      ax.set_title(title, fontsize=9)
      ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[len(layers) :]:
      ax.set_visible(False)
    path = os.path.join(plot_dir, fname)
    fig.savefig(path, dpi=80)
    written.append(path)
  return written
