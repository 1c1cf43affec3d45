"""Losses and metrics of the train and eval steps: softmax cross-entropy (class ids or one-hot /
soft targets), accuracy, and the per-batch reduction with an optional padding mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy (the default ``loss_fn``).

  ``labels`` are integer class ids shaped ``logits.shape[:-1]``, or targets shaped like
  ``logits``: one-hot rows or soft distributions (distillation, mixup, label smoothing).

  Raises:
    ValueError: ``labels`` of any other shape (or float labels shaped like class ids), naming
      both shapes and the two allowed ones.

  Example:
    >>> from qatjax.training import cross_entropy
    >>> [round(float(v), 4) for v in cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))]
    [1.3863, 1.3863]
    >>> soft = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    >>> [round(float(v), 4) for v in cross_entropy(jnp.zeros((2, 4)), soft)]
    [1.3863, 1.3863]
  """
  labels = jnp.asarray(labels)
  shape = jnp.shape(logits)
  if labels.shape == shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if labels.shape == shape:
    return optax.softmax_cross_entropy(logits, labels.astype(jnp.result_type(logits)))
  raise ValueError(
    f"cross_entropy: labels of shape {labels.shape} and dtype {labels.dtype} do not fit logits "
    f"of shape {shape}: pass integer class ids of shape {shape[:-1]} or one-hot / soft targets "
    f"of shape {shape}"
  )


def _per_example(values, n):
  values = jnp.asarray(values, jnp.float32)
  return values.reshape(n, -1).mean(axis=-1) if values.ndim > 1 else values


def _accuracy(out, labels):
  """Per-example accuracy, or ``None`` when the outputs / labels are not a classification."""
  if not isinstance(out, jax.Array) or out.ndim < 1:
    return None
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.integer) and out.ndim == labels.ndim + 1:
    return jnp.argmax(out, axis=-1) == labels
  if labels.shape == out.shape and jnp.issubdtype(labels.dtype, jnp.floating):  # one-hot
    return jnp.argmax(out, axis=-1) == jnp.argmax(labels, axis=-1)
  return None


def loss_and_metrics(loss_fn, out, labels, mask=None):
  """``(loss, {"loss", "accuracy"})``; ``mask`` (per example, 0 = padding) weights the means."""
  n = jnp.shape(labels)[0]
  w = jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  total = jnp.maximum(jnp.sum(w), 1.0)
  per = jnp.asarray(loss_fn(out, labels), jnp.float32)
  loss = per if per.ndim == 0 else jnp.sum(_per_example(per, n) * w) / total
  metrics = {"loss": loss}
  acc = _accuracy(out, labels)
  if acc is not None:
    metrics["accuracy"] = jnp.sum(_per_example(acc, n) * w) / total
  return loss, metrics


def _count(labels, mask):
  """The number of real examples of a batch (``mask``: 1 = real, 0 = padding)."""
  if mask is None:
    return jnp.float32(jnp.shape(labels)[0])
  return jnp.sum(jnp.asarray(mask, jnp.float32))
