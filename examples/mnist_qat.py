"""End-to-end QAT on MNIST (or scikit-learn's digits): float -> PTQ / QAT -> integers.

For a small CNN (conv-BN-relu, conv-BN-relu, dense) this script

1. trains a float32 baseline (``QConvBN`` / ``QDense`` with ``config=None``: exactly conv -> BN
   and dense);
2. for every precision: post-training quantization (observers calibrated on a few training
   batches, no gradient step) and quantization-aware fine-tuning started from the float weights
   with :func:`qatjax.from_float` (observers at 8 bits; LSQ/LSQ+ learned step sizes below);
3. converts each model to integers with :func:`qatjax.convert`, evaluates the integer model
   (int8 x int8 -> int32 compute) and its agreement with the fake-quant model;
4. prints one table (accuracy float / PTQ / QAT / integer, bytes, train time), plots accuracy
   against bits and writes ``mnist_qat.json`` / ``mnist_qat.md`` to ``--out-dir``.

``--api nnx`` runs the same pipeline with Flax NNX (``qatjax.nnx.quantize_model`` in place,
``nnx.ModelAndOptimizer`` with the same ``qatjax.training`` steps, ``qatjax.nnx.convert``) from
the same initial weights; both APIs are in ``qat_pipelines.py`` and give the same table.

Usage::

    python examples/mnist_qat.py                        # digits (bundled with scikit-learn)
    python examples/mnist_qat.py --api nnx              # the same with Flax NNX
    python examples/mnist_qat.py --data-dir DIR         # MNIST: the four IDX .gz files in DIR
    python examples/mnist_qat.py --data-dir DIR --out-dir benchmarks/results   # README table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import numpy as np
import optax
from image_data import load_digits, load_mnist
from qat_pipelines import PIPELINES

import qatjax
from qatjax import QuantConfig
from qatjax.training import QATSchedule, make_optimizer


def precisions(names):
  """(label, bits, QAT config, PTQ config) for each requested precision.

  8 bits: observers (per-channel min/max weights, EMA affine activations). Fewer bits: LSQ
  weights and LSQ+ activations for QAT; PTQ uses MSE-optimal clipping for weights and
  activations. A name ending in ``m`` keeps the first conv and the last dense at 8 bits
  (mixed precision via :func:`qatjax.rules`), as the LSQ paper does.
  """
  out = []
  for name in names:
    mixed = name.endswith("m")
    bits = int(name.rstrip("m"))
    if bits == 8:
      qat = QuantConfig(8, 8)
      ptq = QuantConfig(8, 8, act_calibration="minmax")
    else:
      qat = QuantConfig(bits, bits, method="lsq")
      ptq = QuantConfig(bits, bits, weight_calibration="mse", act_calibration="mse")
    label = f"W{bits}A{bits}"
    if mixed:
      keep8 = {"conv0|dense": QuantConfig(8, 8)}
      qat, ptq = qatjax.rules({**keep8, ".*": qat}), qatjax.rules({**keep8, ".*": ptq})
      label += " (first/last 8-bit)"
    out.append((label, bits, qat, ptq))
  return out


def load_data(args):
  """MNIST from ``--data-dir`` or digits, cut to ``--train-limit`` / ``--test-limit``."""
  data = load_mnist(args.data_dir) if args.data_dir else load_digits()
  if args.train_limit:
    data = data._replace(
      x_train=data.x_train[: args.train_limit], y_train=data.y_train[: args.train_limit]
    )
  if args.test_limit:
    data = data._replace(
      x_test=data.x_test[: args.test_limit], y_test=data.y_test[: args.test_limit]
    )
  return data


def run(args, data) -> dict:
  pipe = PIPELINES[args.api](data, args.seed)
  bs = min(args.batch_size, len(data.x_train))
  steps_per_epoch = len(data.x_train) // bs
  print(
    f"{data.name} ({pipe.name}): {len(data.x_train)} train / {len(data.x_test)} test images "
    f"{data.x_train.shape[1:]}, batch {bs}, {steps_per_epoch} steps per epoch",
    flush=True,
  )
  acc = lambda logits: float(np.mean(logits.argmax(-1) == data.y_test))
  predict = lambda m: pipe.predict(m, data.x_test, args.eval_batch)

  def train(m, *, epochs, tx, schedule, label):
    print(f"-- {label}: {epochs} epoch(s)", flush=True)
    return pipe.train(
      m, epochs=epochs, batch_size=bs, tx=tx, schedule=schedule, progress=args.progress
    )

  # 1. float32 baseline.
  float_m, float_s = train(
    pipe.float_model(), epochs=args.epochs, tx=optax.adam(args.lr), schedule=None, label="float32"
  )
  float_bytes = pipe.float_bytes(float_m)
  rows = [
    {
      "precision": "float32",
      "bits": 32,
      "float": acc(predict(float_m)),
      "ptq": None,
      "qat": None,
      "int": None,
      "agreement": None,
      "bytes": float_bytes,
      "bytes_pct": 100.0,
      "train_s": float_s,
    }
  ]
  print(f"float32 test accuracy {rows[0]['float']:.4f}", flush=True)

  calib_x = data.x_train[:bs]
  qat_steps = args.qat_epochs * steps_per_epoch
  qat_lr = lambda ratio=1.0: optax.cosine_decay_schedule(args.qat_lr * ratio, max(qat_steps, 1))

  # 1b. the fair reference for QAT: the float model fine-tuned as long as QAT fine-tunes.
  tuned_m, tuned_s = train(
    float_m, epochs=args.qat_epochs, tx=optax.adam(qat_lr()), schedule=None,
    label="float32 fine-tuned",
  )  # fmt: skip
  tuned = acc(predict(tuned_m))
  rows.append({**rows[0], "precision": "float32 fine-tuned", "float": tuned, "train_s": tuned_s})
  print(f"float32 fine-tuned test accuracy {tuned:.4f}", flush=True)
  for label, bits, qat_cfg, ptq_cfg in precisions(args.precisions):
    # 2a. PTQ: observers calibrated on a few batches; params unchanged.
    batches = [
      data.x_train[i * bs : (i + 1) * bs] for i in range(min(args.calib_batches, steps_per_epoch))
    ]
    ptq_m = pipe.calibrate(pipe.quantize(float_m, ptq_cfg, calib_x), batches)
    ptq_acc = acc(predict(ptq_m))

    # 2b. QAT from the float weights: observers frozen after half the steps, BN after 60%.
    tx = make_optimizer(optax.adam(qat_lr()), optax.adam(qat_lr(args.scale_lr_ratio)))
    schedule = QATSchedule(
      freeze_observers_step=qat_steps // 2, freeze_bn_step=int(qat_steps * 0.6)
    )
    qat_m, qat_s = train(
      pipe.quantize(float_m, qat_cfg, calib_x), epochs=args.qat_epochs, tx=tx,
      schedule=schedule, label=f"QAT {label}",
    )  # fmt: skip
    qat_logits = predict(qat_m)

    # 3. integers: the converted model runs integer compute (int8 x int8 -> int32).
    int_m = pipe.convert(qat_m, calib_x)
    int_logits = predict(int_m)
    size = pipe.int_bytes(int_m)
    rows.append(
      {
        "precision": label,
        "bits": bits,
        "float": tuned,
        "ptq": ptq_acc,
        "qat": acc(qat_logits),
        "int": acc(int_logits),
        "agreement": float(np.mean(int_logits.argmax(-1) == qat_logits.argmax(-1))),
        "max_abs_diff": float(np.max(np.abs(int_logits - qat_logits))),
        "bytes": size,
        "bytes_pct": 100.0 * size / float_bytes,
        "train_s": qat_s,
      }
    )
    r = rows[-1]
    print(
      f"{label}: PTQ {r['ptq']:.4f}  QAT {r['qat']:.4f}  int {r['int']:.4f}  "
      f"(agreement {r['agreement']:.4f}, {size} B)",
      flush=True,
    )

  return {
    "dataset": data.name,
    "api": pipe.name,
    "train_images": len(data.x_train),
    "test_images": len(data.x_test),
    "epochs_float": args.epochs,
    "epochs_qat": args.qat_epochs,
    "batch_size": bs,
    "lr": args.lr,
    "qat_lr": args.qat_lr,
    "seed": args.seed,
    "machine": f"{platform.machine()} {jax.default_backend()} "
    f"({os.cpu_count()} CPUs), jax {jax.__version__}",
    "rows": rows,
  }


def _pct(a):
  return "-" if a is None else f"{100 * a:.2f}"


def render_markdown(res: dict) -> str:
  head = (
    "precision",
    "float % (same epochs)",
    "PTQ %",
    "QAT %",
    "integer %",
    "int = QAT argmax",
    "bytes",
    "% of float",
    "train s",
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in res["rows"]:
    agree = "-" if r["agreement"] is None else f"{100 * r['agreement']:.2f}%"
    lines.append(
      f"| {r['precision']} | {_pct(r['float'])} | {_pct(r['ptq'])} | {_pct(r['qat'])} "
      f"| {_pct(r['int'])} | {agree} | {r['bytes']:,} | {r['bytes_pct']:.1f} "
      f"| {r['train_s']:.1f} |"
    )
  return (
    f"{res['dataset']}: CNN conv-BN-relu x2 + dense, {res['train_images']} train / "
    f"{res['test_images']} test images; float32 trained {res['epochs_float']} epoch(s) "
    f"(Adam {res['lr']}), then QAT (and, as its float reference, float32) fine-tuned "
    f"{res['epochs_qat']} epoch(s) from it (Adam {res['qat_lr']}, cosine); PTQ = "
    f"observers calibrated on training batches, no gradient step. 8 bits: observers; fewer: "
    f"LSQ/LSQ+. Integer = the converted model "
    f"(int8 x int8 -> int32). Train time includes compilation; {res['machine']}.\n\n"
    + "\n".join(lines)
    + "\n"
  )


def plot(res: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in res["rows"] if r["bits"] < 32 and "first/last" not in r["precision"]]
  tuned = [r for r in res["rows"] if r["precision"] == "float32 fine-tuned"]
  bits = [r["bits"] for r in rows]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.axhline(100 * res["rows"][0]["float"], color="k", ls="--", label="float32")
  if tuned:
    ax.axhline(100 * tuned[0]["float"], color="gray", ls=":", label="float32 fine-tuned")
  for key, name, style in (
    ("ptq", "PTQ", "o-"),
    ("qat", "QAT", "o-"),
    ("int", "integer (converted)", "x--"),
  ):
    ax.plot(bits, [100 * r[key] for r in rows], style, label=name)
  ax.set_xlabel("bits (weights = activations)")
  ax.set_ylabel("test accuracy %")
  ax.set_xticks(sorted(set(bits)))
  ax.set_title(f"{res['dataset']}: accuracy vs bits")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--data-dir",
    default=None,
    help="folder with the four MNIST IDX .gz files (default: scikit-learn digits)",
  )
  p.add_argument(
    "--out-dir",
    default=None,
    help="where the JSON/Markdown results and the plot go (default: out/mnist_qat)",
  )
  p.add_argument(
    "--api", choices=sorted(PIPELINES), default="linen", help="the Flax API (default: linen)"
  )
  p.add_argument(
    "--precisions",
    default="8,4,2,2m",
    help="comma-separated bits; 'm' keeps the first and last layer at 8 bits",
  )
  p.add_argument("--epochs", type=int, default=None, help="float epochs (MNIST 2, digits 30)")
  p.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (MNIST 1, digits 15)")
  p.add_argument("--batch-size", type=int, default=None, help="MNIST 128, digits 32")
  p.add_argument("--eval-batch", type=int, default=500)
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, float training")
  p.add_argument(
    "--qat-lr",
    type=float,
    default=None,
    help="Adam learning rate for QAT fine-tuning (MNIST 3e-4, digits 1e-3)",
  )
  p.add_argument(
    "--scale-lr-ratio",
    type=float,
    default=1.0,
    help="learning rate of the LSQ step sizes / the weights' learning rate",
  )
  p.add_argument("--calib-batches", type=int, default=8, help="PTQ calibration batches")
  p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
  p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", dest="progress", action="store_false")
  args = p.parse_args(argv)
  mnist = args.data_dir is not None
  for name, m, d in (
    ("epochs", 2, 30),
    ("qat_epochs", 1, 15),
    ("batch_size", 128, 32),
    ("qat_lr", 3e-4, 1e-3),
  ):
    if getattr(args, name) is None:
      setattr(args, name, m if mnist else d)
  args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
  for s in args.precisions:
    if not s.rstrip("m").isdigit() or not 2 <= int(s.rstrip("m")) <= 8:
      p.error(f"--precisions: {s!r} is not a bit width 2..8 (optionally followed by 'm')")
  for name in ("epochs", "qat_epochs", "batch_size", "eval_batch", "calib_batches"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.data_dir is not None and not os.path.isdir(args.data_dir):
    p.error(f"--data-dir {args.data_dir!r} is not a directory")
  args.out_dir = args.out_dir or os.path.join("out", "mnist_qat")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    data = load_data(args)
  except ValueError as e:  # missing or corrupt IDX file: one line naming the file
    raise SystemExit(f"error: {e}") from None
  res = run(args, data)
  md = render_markdown(res)
  print("\n" + md)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "mnist_qat.json"), "w") as f:
    json.dump(res, f, indent=2)
  with open(os.path.join(args.out_dir, "mnist_qat.md"), "w") as f:
    f.write(md)
  plot(res, os.path.join(args.out_dir, "mnist_qat_accuracy_vs_bits.png"))
  print(f"results and plot written to {args.out_dir}/")
  return res


if __name__ == "__main__":
  main(sys.argv[1:])
