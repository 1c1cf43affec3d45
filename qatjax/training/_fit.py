"""``fit``: the epoch loop for examples (shuffling, progress bar, evaluation, metrics, plots)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from qatjax.training._data import check_arrays, iterate_batches
from qatjax.training._evaluate import evaluate
from qatjax.training._plots import plot_history, plot_quantization
from qatjax.training._progress import epoch_progress
from qatjax.training._resume import check_checkpointing, maybe_save, resume


def _is_arrays(data) -> bool:
  return (
    isinstance(data, (tuple, list))
    and len(data) > 0
    and all(isinstance(a, (np.ndarray, jax.Array)) for a in data)
  )


def _batch_len(batch) -> int | None:
  leaves = jax.tree_util.tree_leaves(batch[0] if isinstance(batch, (tuple, list)) else batch)
  return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else None


def _mean_metrics(collected: list[dict]) -> dict[str, float]:
  if not collected:
    return {}
  host = jax.device_get(collected)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def fit(
  state,
  train_data,
  *,
  epochs: int,
  batch_size: int,
  train_step: Callable,
  eval_step: Callable | None = None,
  eval_data=None,
  rng,
  progress: bool = True,
  plot_dir: str | None = None,
  checkpoint_dir: str | None = None,
  checkpoint_every: int | None = None,
) -> tuple[Any, list[dict[str, float]]]:
  """Trains ``state`` for ``epochs`` epochs; returns ``(state, history)``.

  Every batch has exactly ``batch_size`` rows (the last incomplete one is dropped), so the train
  step compiles once. With numpy arrays the rows are shuffled each epoch with
  ``fold_in(rng, epoch)`` and step ``t`` trains on batch ``t % steps_per_epoch`` of epoch
  ``t // steps_per_epoch``: the run covers steps ``state.step`` to ``state.step + epochs *
  steps_per_epoch``, and a run resumed from any step sees the same batches as an uninterrupted
  one.

  With ``checkpoint_dir`` the run survives being killed: the whole state is saved there with
  orbax every ``checkpoint_every`` steps and at the end, and a call that finds a complete
  checkpoint there resumes from the latest one (placed as ``train_step`` keeps its state) instead
  of ``state``. Calling ``fit`` again with the same arguments after a crash finishes the same run,
  bitwise equal to an uninterrupted one (data order from the step, dropout keys from
  ``state.step``; the same mesh is needed for bitwise equality). A write that was interrupted is
  never restored: the previous complete checkpoint is used, with a warning naming it.

  Args:
    state: a :class:`TrainState`, or an ``nnx.ModelAndOptimizer`` (trained in place).
    train_data: ``(x, y)`` numpy arrays; or an iterable of ``(x, y)`` batches (a list is reused
      every epoch; a one-shot iterator only allows ``epochs=1``); or ``epoch -> iterable``.
    epochs: number of epochs to run in this call.
    batch_size: rows per batch.
    train_step: from :func:`make_train_step` (``mode="ptq"`` calibrates instead of training).
    eval_step: from :func:`make_eval_step`; required with ``eval_data``.
    eval_data: ``(x, y)`` numpy arrays evaluated after every epoch (every example counts).
    rng: PRNG key (or int seed) for shuffling; ``None``: no shuffling.
    progress: show a tqdm progress bar with the running loss / accuracy when stderr is a
      terminal (or a Jupyter kernel), else print one line per epoch with its mean metrics (a log
      gets no bar updates). ``False``: silent, and tqdm is not needed.
    plot_dir: if set, write ``loss.png``, ``accuracy.png`` (metric curves) and, for a quantized
      Linen model, ``weight_scales.png`` and ``quant_error.png`` (per-layer histograms) there.
    checkpoint_dir: save checkpoints here and resume from the latest one (needs ``(x, y)``
      arrays as ``train_data``).
    checkpoint_every: steps between checkpoints (default: one epoch).

  Returns:
    ``(state, history)``: ``history`` has one dict per epoch (part of an epoch when the run
    starts or ends inside one) trained in this call: ``epoch`` (1-based, from the step),
    ``step``, ``seconds``, ``train_loss``, ``train_accuracy`` and, with ``eval_data``,
    ``eval_loss``, ``eval_accuracy``.

  Raises:
    ValueError: bad ``epochs`` / ``batch_size``, fewer rows than ``batch_size``, ``eval_data``
      without ``eval_step``, a one-shot iterator with ``epochs > 1``, an epoch with no full batch;
      bad checkpoint options, or a checkpoint in ``checkpoint_dir`` of another state tree, mesh
      layout or past this run's end (before the first step; nothing is written).

  Example:
    >>> import os, numpy as np, optax
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import create_train_state, fit, make_train_step
    >>> x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> s = create_train_state(QDense(2, config=QuantConfig()), optax.adam(1e-2),
    ...                        jax.random.key(0), x[:1])
    >>> s, hist = fit(s, (x, y), epochs=2, batch_size=8, train_step=make_train_step(),
    ...               rng=jax.random.key(1), progress=False)
    >>> [h["epoch"] for h in hist], int(s.step)
    ([1, 2], 8)

    Checkpointed every 3 steps; a second call finds the finished run and trains nothing:

    >>> import tempfile
    >>> d, s0 = tempfile.mkdtemp(), create_train_state(QDense(2, config=QuantConfig()),
    ...                                                optax.adam(1e-2), jax.random.key(0), x[:1])
    >>> kw = dict(epochs=2, batch_size=8, train_step=make_train_step(), rng=1, progress=False)
    >>> s, _ = fit(s0, (x, y), checkpoint_dir=d, checkpoint_every=3, **kw)
    >>> sorted(os.listdir(d), key=int)
    ['3', '6', '8']
    >>> s2, hist = fit(s0, (x, y), checkpoint_dir=d, checkpoint_every=3, **kw)
    >>> int(s2.step), hist
    (8, [])
  """
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
    raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if eval_data is not None and eval_step is None:
    raise ValueError("eval_data needs an eval_step (make_eval_step())")
  if eval_data is not None:
    check_arrays(eval_data, "eval_data")
  rng = jax.random.key(rng) if isinstance(rng, int) else rng

  arrays, steps_per_epoch, source = None, None, None
  if _is_arrays(train_data):
    arrays = check_arrays(train_data, "train_data")
    steps_per_epoch = arrays[0].shape[0] // batch_size
    if steps_per_epoch == 0:
      raise ValueError(
        f"train_data has {arrays[0].shape[0]} rows, fewer than batch_size={batch_size}"
      )
  elif callable(train_data):
    source = train_data
  elif isinstance(train_data, Iterable):
    if iter(train_data) is train_data and epochs > 1:
      raise ValueError(
        "train_data is a one-shot iterator: pass a list, a callable "
        "epoch -> iterable, or (x, y) arrays to train more than one epoch"
      )
    source = lambda epoch: train_data
  else:
    raise ValueError(
      f"train_data must be (x, y) arrays, an iterable of batches or a callable, "
      f"got {type(train_data).__name__}"
    )

  check_checkpointing(checkpoint_dir, checkpoint_every, arrays)
  if arrays is not None:  # step t: batch t % steps_per_epoch of epoch t // steps_per_epoch
    first = int(jax.device_get(state.step))
    last = first + epochs * steps_per_epoch
    if checkpoint_dir is not None:
      state = resume(checkpoint_dir, state, train_step, last)
      first = int(jax.device_get(state.step))
    spans = [
      (e, max(first, e * steps_per_epoch), min(last, (e + 1) * steps_per_epoch))
      for e in range(first // steps_per_epoch, -(-last // steps_per_epoch))
    ]
    spans = [(e, lo, hi) for e, lo, hi in spans if hi > lo]
  else:
    spans = [(e, None, None) for e in range(epochs)]
  every = checkpoint_every or steps_per_epoch
  history: list[dict[str, float]] = []
  example = None
  for epoch, lo, hi in spans:
    if arrays is not None:
      key = None if rng is None else jax.random.fold_in(rng, epoch)
      start = epoch * steps_per_epoch
      batches = itertools.islice(
        iterate_batches(arrays, batch_size, rng=key), lo - start, hi - start
      )
    else:
      batches = source(epoch)
    total = None if arrays is None else hi - lo
    show_every = max(1, (total or 200) // 20)
    t0 = time.perf_counter()
    collected = []
    with epoch_progress(progress, total, f"epoch {epoch + 1}") as bar:
      for batch in batches:
        if _batch_len(batch) != batch_size:
          continue  # incomplete (last) batch: a new shape would compile the step again
        if example is None:
          example = batch[0]
        state, metrics = train_step(state, batch)
        collected.append(metrics)
        if arrays is not None:
          maybe_save(checkpoint_dir, state, lo + len(collected), every, last)
        bar.update(1)
        if progress and len(collected) % show_every == 0:
          bar.set_postfix({k: f"{float(v):.4f}" for k, v in metrics.items()})
      if not collected:
        raise ValueError(
          f"epoch {epoch + 1}: train_data yielded no batch of batch_size={batch_size} rows"
        )
      entry = {"epoch": epoch + 1, "step": int(jax.device_get(state.step))}
      entry.update({f"train_{k}": v for k, v in _mean_metrics(collected).items()})
      if eval_data is not None:
        scores = evaluate(state, eval_data, batch_size=batch_size, eval_step=eval_step)
        entry.update({f"eval_{k}": v for k, v in scores.items() if k != "count"})
      entry["seconds"] = time.perf_counter() - t0
      if progress:
        bar.set_postfix(
          {k: f"{v:.4f}" for k, v in entry.items() if k.startswith(("train_", "eval_"))}
        )
    history.append(entry)

  if plot_dir is not None:
    plot_history(history, plot_dir)
    if getattr(state, "quant_stats", None) and example is not None:  # a Linen TrainState
      kwargs = getattr(eval_step if eval_step is not None else train_step, "apply_kwargs", None)
      plot_quantization(state, example, plot_dir, apply_kwargs=kwargs)
  return state, history
