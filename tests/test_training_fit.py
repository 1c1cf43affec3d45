"""qatjax.training.fit: epochs, shuffling, one compilation, metrics, progress bar and plots."""

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from image_data import load_digits

from qatjax import QConvBN, QDense, QuantConfig
from qatjax.training import (
  QATSchedule,
  create_train_state,
  cross_entropy,
  evaluate,
  fit,
  make_eval_step,
  make_train_step,
)


class DigitsNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(
      QConvBN(8, (3, 3), strides=2, config=QuantConfig())(x, use_running_average=not train)
    )
    x = nn.relu(QDense(32, config=QuantConfig(method="lsq"))(x.reshape(x.shape[0], -1)))
    return QDense(10, config=QuantConfig())(x)


def test_fit_digits_reports_metrics_and_writes_plots(tmp_path, capsys):
  d = load_digits()
  x_tr, y_tr, x_te, y_te = d.x_train[:512], d.y_train[:512], d.x_test[:200], d.y_test[:200]
  state = create_train_state(DigitsNet(), optax.adam(3e-3), jax.random.key(0), x_tr[:1])
  train_step = make_train_step(
    schedule=QATSchedule(float_steps=8, freeze_bn_step=40), apply_kwargs={"train": True}
  )
  eval_step = make_eval_step(apply_kwargs={"train": False})
  state, hist = fit(
    state,
    (x_tr, y_tr),
    epochs=4,
    batch_size=64,
    train_step=train_step,
    eval_step=eval_step,
    eval_data=(x_te, y_te),
    rng=jax.random.key(1),
    progress=True,
    plot_dir=str(tmp_path / "plots"),
  )
  assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and int(state.step) == 32
  assert {"train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "seconds", "step"} <= set(
    hist[0]
  )
  assert hist[-1]["train_loss"] < hist[0]["train_loss"]
  assert hist[-1]["eval_accuracy"] > 0.5
  ev = evaluate(state, (x_te, y_te), batch_size=64, eval_step=eval_step)
  assert ev["count"] == 200 and abs(ev["accuracy"] - hist[-1]["eval_accuracy"]) < 1e-6
  # Not a terminal (captured): one plain line per epoch with its mean metrics, no bar updates.
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3", "epoch 4"]
  assert lines[-1].startswith("epoch 4: 8 steps, ") and "train_loss" in lines[-1]
  assert f"eval_accuracy {hist[-1]['eval_accuracy']:.4f}" in lines[-1]
  assert "\r" not in out + err and "step/s" not in err
  for name in ("loss.png", "accuracy.png", "weight_scales.png", "quant_error.png"):
    path = tmp_path / "plots" / name
    assert path.is_file() and path.stat().st_size > 1000, name
    assert path.read_bytes()[:4] == b"\x89PNG"
  assert train_step.jitted._cache_size() == 1 and eval_step.jitted._cache_size() == 1


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return QDense(2, config=QuantConfig())(x)


def tiny_data(n=50):
  x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
  return x, (x[:, 0] > 0).astype(np.int32)


def test_drops_last_batch_compiles_once_and_shuffles():
  x, y = tiny_data(50)
  calls, seen = [], []

  def loss(out, labels):
    calls.append(1)
    return cross_entropy(out, labels)

  step = make_train_step(loss)

  def recording_step(state, batch):
    seen.append(batch[1].copy())
    return step(state, batch)

  state = create_train_state(Tiny(), optax.sgd(0.1), 0, x[:1])
  state, hist = fit(
    state,
    (x, y),
    epochs=2,
    batch_size=16,
    train_step=recording_step,
    rng=jax.random.key(0),
    progress=False,
  )
  assert len(calls) == 1 and int(state.step) == 6 and len(hist) == 2
  assert all(len(b) == 16 for b in seen)
  first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:])
  assert not np.array_equal(first, second)  # reshuffled each epoch
  assert not np.array_equal(first, y[:48])


def test_iterables_of_batches():
  x, y = tiny_data(48)
  batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)] + [(x[:5], y[:5])]
  step = make_train_step()
  state = create_train_state(Tiny(), optax.sgd(0.1), 0, x[:1])
  state, hist = fit(
    state, batches, epochs=2, batch_size=16, train_step=step, rng=None, progress=False
  )
  assert int(state.step) == 6 and len(hist) == 2  # a list is reused; the short batch dropped
  state, _ = fit(
    state,
    lambda epoch: iter(batches),
    epochs=1,
    batch_size=16,
    train_step=step,
    rng=None,
    progress=False,
  )
  assert int(state.step) == 9
  state, _ = fit(
    state, iter(batches), epochs=1, batch_size=16, train_step=step, rng=None, progress=False
  )
  assert int(state.step) == 12
  with pytest.raises(ValueError, match="one-shot iterator"):
    fit(state, iter(batches), epochs=2, batch_size=16, train_step=step, rng=None)


def test_fit_errors():
  x, y = tiny_data(8)
  state = create_train_state(Tiny(), optax.sgd(0.1), 0, x[:1])
  step = make_train_step()
  kw = dict(train_step=step, rng=0, progress=False)
  with pytest.raises(ValueError, match="fewer than batch_size=16"):
    fit(state, (x, y), epochs=1, batch_size=16, **kw)
  with pytest.raises(ValueError, match="batch_size"):
    fit(state, (x, y), epochs=1, batch_size=0, **kw)
  with pytest.raises(ValueError, match="epochs"):
    fit(state, (x, y), epochs=-1, batch_size=4, **kw)
  with pytest.raises(ValueError, match="eval_step"):
    fit(state, (x, y), epochs=1, batch_size=4, eval_data=(x, y), **kw)
  with pytest.raises(ValueError, match="share their length"):
    fit(state, (x, y[:5]), epochs=1, batch_size=4, **kw)
  with pytest.raises(ValueError, match="no batch of batch_size=4"):
    fit(state, [(x[:3], y[:3])], epochs=1, batch_size=4, **kw)


class _Terminal:
  """A stderr that says it is a terminal."""

  def __init__(self):
    self.text = ""

  def isatty(self):
    return True

  def write(self, text):
    self.text += text

  def flush(self):
    pass


def test_fit_on_a_terminal_shows_a_bar(monkeypatch, capsys):
  x, y = tiny_data(32)
  state = create_train_state(Tiny(), optax.sgd(0.1), jax.random.key(0), x[:1])
  terminal = _Terminal()
  monkeypatch.setattr("sys.stderr", terminal)
  fit(state, (x, y), epochs=2, batch_size=8, train_step=make_train_step(), rng=0, progress=True)
  assert "epoch 2" in terminal.text and "\r" in terminal.text  # tqdm redraws in place
  assert capsys.readouterr().out == ""


def test_fit_trains_without_tqdm(tmp_path):
  """The base install has no tqdm: ``progress=False`` (and a log's plain lines) do not need it."""
  script = tmp_path / "no_tqdm.py"
  script.write_text(
    "import sys\n"
    "sys.modules['tqdm'] = None  # any import of tqdm now fails\n"
    "import jax, numpy as np, optax\n"
    "from qatjax import QDense, QuantConfig\n"
    "from qatjax.training import create_train_state, fit, make_train_step\n"
    "x = np.ones((16, 3), np.float32); y = np.zeros(16, np.int32)\n"
    "s = create_train_state(QDense(2, config=QuantConfig()), optax.sgd(0.1), 0, x[:1])\n"
    "for progress in (False, True):\n"
    "  s, h = fit(s, (x, y), epochs=1, batch_size=8, train_step=make_train_step(), rng=0,\n"
    "             progress=progress)\n"
    "print('trained', int(s.step))\n"
  )
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()  # progress=False: nothing; progress=True in a pipe: one line
  assert len(lines) == 2 and lines[0].startswith("epoch 2: 2 steps, "), lines
  assert "train_loss" in lines[0]
  assert lines[1] == "trained 4"
