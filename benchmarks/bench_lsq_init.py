"""How far ``from_float`` starts from the float model, by LSQ initialisation (``lsq_init``).

A float MLP 784-512-512-10 is trained briefly (Adam) on MNIST (``--data-dir``) or, without it, on
scikit-learn's digits scaled to 28x28; then, for each bit width (weights = activations), an LSQ
model is built from it with :func:`qatjax.from_float` (one calibration batch) under
``lsq_init="mse"`` (MSE-optimal steps, the default), ``"lsq"`` (Esser et al. 2020:
``2 * mean|w| / sqrt(qmax)``) and ``"minmax"``, next to an observer model (``method="observer"``)
for reference. Reported: the relative output error ``||y_q - y_f|| / ||y_f||`` of the logits on a
held-out batch, and its top-1 accuracy. Goals: ``"mse"`` <= 1.2% at 8 bits and no worse than
``"lsq"`` at 2-4 bits.

Usage: python benchmarks/bench_lsq_init.py [--data-dir DIR] [--steps N] [--bits 8,4,3,2]

Writes benchmarks/results/lsq_init.json and lsq_init.md (the README table).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the checkout's qatjax
sys.path.insert(0, str(ROOT / "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _peer_models import build  # noqa: E402
from _results import cpu_name, write_results  # noqa: E402
from image_data import load_digits, load_mnist  # noqa: E402

import qatjax  # noqa: E402

INITS = ("mse", "lsq", "minmax")
GOAL_8BIT = 0.012


def load(data_dir):
  """MNIST from ``data_dir``, else digits upsampled 3x and padded to 28x28 (784 inputs)."""
  if data_dir:
    return load_mnist(data_dir)
  d = load_digits()
  up = lambda x: np.pad(
    np.kron(x, np.ones((1, 3, 3, 1), np.float32)), ((0, 0), (2, 2), (2, 2), (0, 0))
  )
  return d._replace(x_train=up(d.x_train), x_test=up(d.x_test), name="digits (28x28)")


def train_float(data, steps, batch, seed=0):
  model = build("mlp")
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), jnp.asarray(data.x_train[:1]))
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      logits = model.apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    g = jax.grad(loss)(params)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    idx = rng.integers(0, len(data.x_train), batch)
    params, opt_state = step(params, opt_state, data.x_train[idx], data.y_train[idx])
  return model, params


def quantized(bits, method, lsq_init):
  kw = dict(method=method) if method == "observer" else dict(method=method, lsq_init=lsq_init)
  cfg = qatjax.QuantConfig(bits, bits, **kw)
  return build("mlp", functools.partial(qatjax.QDense, config=cfg))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: sklearn digits)")
  p.add_argument("--steps", type=int, default=400, help="float training steps (Adam 1e-3)")
  p.add_argument("--batch", type=int, default=256, help="training and calibration batch")
  p.add_argument("--eval", type=int, default=2000, help="held-out examples the error is taken on")
  p.add_argument("--bits", default="8,4,3,2", help="comma-separated bit widths")
  p.add_argument("--out", default=str(HERE / "results"), help="folder for the result files")
  args = p.parse_args()

  data = load(args.data_dir)
  model, fvars = train_float(data, args.steps, args.batch)
  x_cal = jnp.asarray(data.x_train[: args.batch])
  x_ev, y_ev = jnp.asarray(data.x_test[: args.eval]), data.y_test[: args.eval]
  y_f = np.asarray(jax.jit(model.apply)(fvars, x_ev))
  float_acc = float((y_f.argmax(-1) == y_ev).mean())

  rows = []
  for bits in [int(b) for b in args.bits.split(",")]:
    for method, init in [("lsq", i) for i in INITS] + [("observer", None)]:
      qmodel = quantized(bits, method, init)
      qvars = qatjax.from_float(qmodel, fvars, x_cal)
      y_q = np.asarray(jax.jit(qmodel.apply)(qvars, x_ev))
      rel = float(np.linalg.norm(y_q - y_f) / np.linalg.norm(y_f))
      acc = float((y_q.argmax(-1) == y_ev).mean())
      rows.append(dict(bits=bits, method=method, lsq_init=init, rel_error=rel, accuracy=acc))
      print(f"W{bits}A{bits} {method:<8} {init or '-':<7} rel error {rel:8.4%}  top-1 {acc:.4f}")

  def rel(bits, method, init=None):
    return next(
      r["rel_error"]
      for r in rows
      if (r["bits"], r["method"], r["lsq_init"]) == (bits, method, init)
    )

  all_bits = sorted({r["bits"] for r in rows}, reverse=True)
  goals = {}
  if 8 in all_bits:
    goals["mse <= 1.2% at 8 bits"] = rel(8, "lsq", "mse") <= GOAL_8BIT
  low = [b for b in all_bits if 2 <= b <= 4]
  if low:
    goals["mse <= lsq at 2-4 bits"] = all(rel(b, "lsq", "mse") <= rel(b, "lsq", "lsq") for b in low)
  for goal, met in goals.items():
    print(f"goal {goal}: {'met' if met else 'NOT met'}")

  meta = dict(
    model="MLP 784-512-512-10",
    dataset=data.name,
    float_steps=args.steps,
    batch=args.batch,
    eval_examples=len(y_ev),
    float_accuracy=float_acc,
    jax=jax.__version__,
    backend=jax.default_backend(),
    cpu=cpu_name(),
    goals=goals,
  )
  md = [
    f"`from_float` of an MLP 784-512-512-10 trained {args.steps} Adam steps on {data.name} (float "
    f"top-1 {float_acc:.2%}): relative output error `||y_q - y_f|| / ||y_f||` of the logits on "
    f"{len(y_ev)} held-out examples (top-1 in brackets), weights and activations at the same bits, "
    f"LSQ steps initialised from one batch of {args.batch}. Goals: `mse` <= 1.2% at 8 bits and "
    "no worse than `lsq` (Esser et al. 2020's rule) at 2-4 bits: "
    + ", ".join(f"{g}: {'met' if m else 'not met'}" for g, m in goals.items())
    + ".",
    "",
    '| bits | lsq_init="mse" (default) | lsq_init="lsq" | lsq_init="minmax" | observer |',
    "|---|---|---|---|---|",
  ]
  for bits in all_bits:
    cells = [
      next(r for r in rows if (r["bits"], r["method"], r["lsq_init"]) == (bits, m, i))
      for m, i in [("lsq", i) for i in INITS] + [("observer", None)]
    ]
    md.append(
      f"| W{bits}A{bits} | "
      + " | ".join(f"{c['rel_error']:.2%} ({c['accuracy']:.2%})" for c in cells)
      + " |"
    )
  write_results(args.out, "lsq_init", dict(meta=meta, results=rows), "\n".join(md))


if __name__ == "__main__":
  main()
