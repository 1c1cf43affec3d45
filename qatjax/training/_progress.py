"""``epoch_progress``: how :func:`fit` shows an epoch's progress.

A tqdm bar where someone watches it live (a terminal, a Jupyter kernel); one plain line per epoch
where the output goes to a log or a pipe (a bar would write a carriage-return update per refresh
into it); nothing with ``progress=False``. tqdm is imported only for a live bar, so the base
install (no tqdm) trains.
"""

from __future__ import annotations

import sys


def is_live(stream) -> bool:
  """Whether ``stream`` shows a progress bar live: a terminal, or a Jupyter kernel's output.

  Example:
    >>> import io
    >>> from qatjax.training._progress import is_live
    >>> is_live(io.StringIO())
    False
  """
  isatty = getattr(stream, "isatty", None)
  return bool(isatty is not None and isatty()) or "ipykernel" in sys.modules


class EpochLine:
  """Counts an epoch's steps and, when the ``with`` block ends, prints one line to ``stream``:
  ``epoch 3: 16 steps, train_loss 0.1234, ...`` (the last :meth:`set_postfix` values).

  Example:
    >>> import sys
    >>> from qatjax.training._progress import EpochLine
    >>> with EpochLine("epoch 1", sys.stdout) as line:
    ...   line.update(1)
    ...   line.update(1)
    ...   line.set_postfix({"train_loss": "0.6931"})
    epoch 1: 2 steps, train_loss 0.6931
  """

  def __init__(self, desc: str, stream):
    self.desc, self.stream = desc, stream
    self.steps, self.postfix = 0, {}

  def update(self, n: int = 1) -> None:
    self.steps += n

  def set_postfix(self, values) -> None:
    self.postfix = dict(values)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      items = "".join(f", {k} {v}" for k, v in self.postfix.items())
      print(f"{self.desc}: {self.steps} steps{items}", file=self.stream, flush=True)


class _Silent(EpochLine):
  """Shows nothing (``progress=False``)."""

  def __exit__(self, exc_type, exc, tb):
    return None


def epoch_progress(progress: bool, total: int | None, desc: str):
  """The context manager :func:`fit` counts an epoch's steps with (``update``, ``set_postfix``):
  a tqdm bar on a live stderr, else one :class:`EpochLine` on stdout, or nothing.

  Example:
    >>> from qatjax.training._progress import epoch_progress
    >>> with epoch_progress(False, 10, "epoch 1") as bar:
    ...   bar.update(1)
  """
  if not progress:
    return _Silent(desc, None)
  if is_live(sys.stderr):
    from tqdm.auto import tqdm  # optional dependency, only for a live bar

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
  return EpochLine(desc, sys.stdout)
