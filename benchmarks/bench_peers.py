"""qatjax against google/qwix and google/aqt (aqtp): QAT train-step cost and CNN accuracy.

Everything is measured in one process on one machine:

1. Train-step time of an MLP (784-512-512-10) and a CNN (Conv 32 3x3 s1, relu, Conv 64 3x3 s2,
   relu, Dense 10; 28x28x1 input), batch 256, for float Flax, qatjax W8A8 (observer and LSQ),
   qwix W8A8 QAT and AQT int8. Every variant uses the same jitted step (Adam, softmax
   cross-entropy, ``value_and_grad``, ``quant_stats`` updated where the library keeps them); the
   variants run interleaved, round-robin, and each step is timed on its own; the table gives
   the median (ms) and its ratio to float.
2. Test accuracy of the same CNN on MNIST (``--data-dir``) or scikit-learn digits: a float CNN is
   trained for ``--epochs``, then each library fine-tunes it with QAT for ``--epochs`` more from
   those float weights (same data order: one permutation per epoch from ``--seed``, same Adam),
   and is evaluated in its own fake-quant eval mode. A combination a library cannot run is kept
   in the results with its error message instead of a number.

3. A byte-level transformer LM (``examples/lm_qat.py``'s model): perplexity after the same QAT
   steps from one pretrained float model, and train-step time, for qatjax W4A8 (int4 groups of
   32, int8 per-token dynamic activations) and qwix's nearest rule (int4 tile 32, int8 dynamic).

Peers: qwix (``quantize_model`` + ``QtProvider``, static activation scales in ``quant_stats``,
the analogue of qatjax's observers) and AQT (``config_v4`` int forward, float backward, via
``AqtDotGeneral`` on ``nn.Dense``). AQT's conv (``AqtConvGeneralDilated``) quantizes the forward
pass only and returns a zero gradient for the kernel and the input: its CNN rows are labelled
"conv fwd-only" (the conv layers stay at their float weights), not counted as conv QAT.

Usage: python benchmarks/bench_peers.py [--data-dir DIR] [--epochs N] [--quick]
                                        [--out benchmarks/results/peers.json]

Writes the JSON and a Markdown table next to it (``peers.md``) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
import warnings

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the checkout's qatjax
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import _peer_lm  # noqa: E402
import _peer_models as pm  # noqa: E402
import image_data as datasets  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _malloc import fix_malloc_thresholds  # noqa: E402
from _results import cpu_name, write_results  # noqa: E402

AQT_CONV_NOTE = (
  "AqtConvGeneralDilated quantizes the forward pass only; its kernel and input "
  "gradients are zero, so the conv layers cannot be fine-tuned (no conv QAT)"
)


# ----------------------------------------------------------------------------------------------
# Shared train / eval steps


def make_train_step(v: pm.Variant, tx):
  """The one jitted train step every variant uses."""
  mutable = list(v.mutable)

  def loss_fn(params, state, x, y, rng):
    variables = {**state, "params": params}
    kw = {"rngs": {"params": rng}} if v.needs_rng else {}
    if mutable:
      logits, new_state = v.model.apply(variables, x, mutable=mutable, **kw)
    else:
      logits, new_state = v.model.apply(variables, x, **kw), {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_state

  def step(params, state, opt_state, x, y, rng):
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**state, **new_state}, opt_state, loss

  return jax.jit(step)


def make_eval(v: pm.Variant):
  """Jitted logits in the variant's eval mode (stored statistics, nothing updated)."""

  def logits(params, state, x, rng):
    kw = {"rngs": {"params": rng}} if v.needs_rng else {}
    return v.model.apply({**state, "params": params}, x, **kw)

  return jax.jit(logits)


def split(variables):
  return variables["params"], {k: t for k, t in variables.items() if k != "params"}


def copy_tree(tree):
  return jax.tree.map(jnp.array, tree)


def error_string(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  first = msg[0] if msg else ""
  return f"{type(e).__name__}: {first}"[:300]


# ----------------------------------------------------------------------------------------------
# 1. Train-step timing


def timing_variants(arch: str, quick: bool = False):
  """(name, builder) pairs; a builder raising NotImplementedError is recorded as unsupported.
  ``quick``: one variant per library (the smoke test)."""
  out = [
    ("float", lambda: pm.float_variant(arch)),
    ("qatjax W8A8 observer", lambda: pm.qatjax_variant(arch, 8, "observer")),
    ("qatjax W8A8 lsq", lambda: pm.qatjax_variant(arch, 8, "lsq")),
    ("qwix W8A8", lambda: pm.qwix_variant(arch, 8)),
    ("qwix W8A8 (dynamic act)", lambda: pm.qwix_variant(arch, 8, static=False)),
  ]
  if arch == "mlp":
    out.append(("AQT W8A8", lambda: pm.aqt_variant(arch, 8)))
  else:
    out.append(("AQT W8A8 (conv QAT)", lambda: pm.aqt_variant(arch, 8)))
    out.append(("AQT W8A8 (conv fwd-only)", lambda: pm.aqt_variant(arch, 8, conv="forward")))
  if quick:
    out = [
      o
      for o in out
      if o[0] not in ("qatjax W8A8 lsq", "qwix W8A8 (dynamic act)", "AQT W8A8 (conv fwd-only)")
    ]
  return out


def bench_timing(
  arch: str, batch: int, rounds: int, steps: int, warmup: int, seed: int, quick: bool = False
):
  shape = (batch, 784) if arch == "mlp" else (batch, 28, 28, 1)
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.uniform(kx, shape, jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, 10)
  rng = jax.random.key(seed + 1)
  float_model = pm.float_variant(arch).model
  float_vars = float_model.init(kp, x)
  float_logits = float_model.apply(float_vars, x)
  tx = optax.adam(1e-3)

  rows, live = [], []
  for name, build in timing_variants(arch, quick):
    row = {"name": name}
    rows.append(row)
    try:
      v = build()
      row.update(lib=v.lib, note=v.note)
      variables = v.init_from_float(float_vars, x)
      params, state = split(copy_tree(variables))
      # Is this variant really quantized? (logits with the float weights vs float logits)
      logits = make_eval(v)(params, state, x, rng)
      row["max_abs_logit_diff_vs_float"] = float(jnp.abs(logits - float_logits).max())
      step = make_train_step(v, tx)
      carry = [params, state, tx.init(params)]
      t0 = time.perf_counter()
      jax.block_until_ready(step(*carry, x, y, rng))
      row["compile_s"] = round(time.perf_counter() - t0, 3)
      for _ in range(warmup):
        carry[:3] = step(*carry, x, y, rng)[:3]
      jax.block_until_ready(carry)
      live.append((row, step, carry, []))
    except NotImplementedError as e:
      row.update(lib=row.get("lib", "aqt"), error=f"not supported: {e}")
    except Exception as e:
      row["error"] = error_string(e)
  # The float model must still be float after every peer was traced (qwix intercepts lax ops).
  float_after = float(jnp.abs(float_model.apply(float_vars, x) - float_logits).max())

  for _ in range(rounds):
    for _row, step, carry, times in live:
      for _ in range(steps):
        t0 = time.perf_counter()
        out = step(*carry, x, y, rng)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        carry[:3] = out[:3]
  base = None
  for row, _, _, times in live:
    row["median_ms"] = round(statistics.median(times) * 1e3, 3)
    row["min_ms"] = round(min(times) * 1e3, 3)
    row["n_steps"] = len(times)
    if row["name"] == "float":
      base = row["median_ms"]
  for row, *_ in live:
    row["ratio_vs_float"] = round(row["median_ms"] / base, 3) if base else None
  return {
    "arch": arch,
    "batch": batch,
    "input_shape": list(shape),
    "rounds": rounds,
    "steps_per_round": steps,
    "rows": rows,
    "float_unchanged_after_peers": float_after == 0.0,
  }


# ----------------------------------------------------------------------------------------------
# 2. Accuracy


def accuracy_configs(quick: bool = False, extra: bool = False):
  """(lib, method, bits, builder) for the CNN; builders may raise. ``quick``: a subset that still
  goes through every library and every failure path (the smoke test); ``extra``: also qatjax
  W8A8 LSQ and qwix with dynamic activation scales."""
  configs = [
    ("qatjax", "observer", 8, lambda: pm.qatjax_variant("cnn", 8, "observer")),
    ("qatjax", "observer", 4, lambda: pm.qatjax_variant("cnn", 4, "observer")),
    ("qatjax", "lsq", 4, lambda: pm.qatjax_variant("cnn", 4, "lsq")),
    ("qatjax", "lsq", 2, lambda: pm.qatjax_variant("cnn", 2, "lsq")),
    ("qwix", "QtProvider, static act", 8, lambda: pm.qwix_variant("cnn", 8)),
    ("qwix", "QtProvider, static act", 4, lambda: pm.qwix_variant("cnn", 4)),
    ("AQT", "config_v4, full conv QAT", 8, lambda: pm.aqt_variant("cnn", 8)),
    ("AQT", "config_v4, full conv QAT", 4, lambda: pm.aqt_variant("cnn", 4)),
    ("AQT", "config_v4, conv fwd-only", 8, lambda: pm.aqt_variant("cnn", 8, conv="forward")),
    ("AQT", "config_v4, conv fwd-only", 4, lambda: pm.aqt_variant("cnn", 4, conv="forward")),
  ]
  if extra:
    configs.insert(2, ("qatjax", "lsq", 8, lambda: pm.qatjax_variant("cnn", 8, "lsq")))
    configs.insert(
      7, ("qwix", "QtProvider, dynamic act", 8, lambda: pm.qwix_variant("cnn", 8, static=False))
    )
  if quick:
    keep = {
      ("qatjax", "lsq", 2),
      ("qwix", "QtProvider, static act", 8),
      ("qwix", "QtProvider, static act", 4),
      ("AQT", "config_v4, full conv QAT", 8),
      ("AQT", "config_v4, conv fwd-only", 8),
    }
    configs = [c for c in configs if c[:3] in keep]
  return configs


def evaluate(eval_fn, params, state, x, y, rng, batch):
  correct = 0
  n = len(x) - len(x) % batch
  for i in range(0, n, batch):
    logits = eval_fn(params, state, x[i : i + batch], rng)
    correct += int((jnp.argmax(logits, -1) == y[i : i + batch]).sum())
  if n < len(x):  # remainder batch (one extra compile at most)
    logits = eval_fn(params, state, x[n:], rng)
    correct += int((jnp.argmax(logits, -1) == y[n:]).sum())
  return correct / len(x)


def train(v, variables, data, perms, batch, lr, rng):
  """Trains for len(perms) epochs (drop-last batches, fixed order); returns variables, stats."""
  tx = optax.adam(lr)
  step = make_train_step(v, tx)
  params, state = split(copy_tree(variables))
  opt_state = tx.init(params)
  losses, t0 = [], time.perf_counter()
  for perm in perms:
    for i in range(0, len(perm) - batch + 1, batch):
      idx = perm[i : i + batch]
      params, state, opt_state, loss = step(
        params, state, opt_state, data.x_train[idx], data.y_train[idx], rng
      )
      losses.append(loss)
  losses = [float(v) for v in losses[-20:]]
  if any(not np.isfinite(v) for v in losses):
    raise FloatingPointError(f"non-finite training loss {losses[-1]}")
  return {**state, "params": params}, {
    "train_s": round(time.perf_counter() - t0, 2),
    "final_train_loss": round(float(np.mean(losses)), 4),
  }


def bench_accuracy(
  data,
  epochs,
  batch,
  lr,
  qat_lr,
  seed,
  eval_batch,
  *,
  quick=False,
  extra=False,
  float_reference=True,
):
  rng = jax.random.key(seed)
  perm_rng = np.random.default_rng(seed)
  n = len(data.x_train)
  float_perms = [perm_rng.permutation(n) for _ in range(epochs)]
  qat_perms = [perm_rng.permutation(n) for _ in range(epochs)]  # shared by every QAT run
  example = data.x_train[qat_perms[0][:batch]]

  fv = pm.float_variant("cnn")
  float_vars = fv.model.init(jax.random.key(seed), example)
  float_vars, stats = train(fv, float_vars, data, float_perms, batch, lr, rng)
  float_eval = make_eval(fv)
  acc = evaluate(float_eval, *split(float_vars), data.x_test, data.y_test, rng, eval_batch)
  rows = [
    {"lib": "flax", "method": "float", "bits": None, "accuracy": acc, "epochs": epochs, **stats}
  ]
  print(f"  float: {acc:.4f} ({stats['train_s']} s)", flush=True)
  if float_reference:  # float fine-tuned for the same extra epochs at the QAT learning rate
    tuned, stats = train(fv, float_vars, data, qat_perms, batch, qat_lr, rng)
    acc = evaluate(float_eval, *split(tuned), data.x_test, data.y_test, rng, eval_batch)
    rows.append(
      {
        "lib": "flax",
        "method": "float, fine-tuned",
        "bits": None,
        "accuracy": acc,
        "epochs": epochs,
        **stats,
      }
    )
    print(f"  float fine-tuned: {acc:.4f} ({stats['train_s']} s)", flush=True)

  for lib, method, bits, build in accuracy_configs(quick, extra):
    row = {"lib": lib, "method": method, "bits": bits, "epochs": epochs}
    rows.append(row)
    try:
      v = build()
      row["note"] = v.note
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qvars = v.init_from_float(float_vars, example)
      ev = make_eval(v)
      row["accuracy_before_qat"] = evaluate(
        ev, *split(qvars), data.x_test, data.y_test, rng, eval_batch
      )
      qvars, stats = train(v, qvars, data, qat_perms, batch, qat_lr, rng)
      row.update(stats)
      row["accuracy"] = evaluate(ev, *split(qvars), data.x_test, data.y_test, rng, eval_batch)
      msg = (
        f"{row['accuracy']:.4f} (before QAT {row['accuracy_before_qat']:.4f}, {stats['train_s']} s)"
      )
    except NotImplementedError as e:
      row["error"] = f"not supported: {e}"
      msg = row["error"]
    except Exception as e:
      row["error"] = error_string(e)
      row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
      msg = "FAILED " + row["error"]
    print(f"  {lib} {method} W{bits}A{bits}: {msg}", flush=True)
  return {
    "dataset": data.name,
    "n_train": n,
    "n_test": len(data.x_test),
    "epochs": epochs,
    "batch": batch,
    "lr_float": lr,
    "lr_qat": qat_lr,
    "optimizer": "adam",
    "rows": rows,
  }


# ----------------------------------------------------------------------------------------------
# Report


def machine_info(allocator: str = "default allocator"):
  def version(pkg):
    try:
      return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      return None

  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "processor": cpu_name(),
    "cpu_count": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "allocator": allocator,
    "devices": [str(d) for d in jax.devices()],
    "versions": {
      p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy", "qwix", "aqtp", "qatjax")
    },
  }


def _fmt_acc(row):
  if "accuracy" in row:
    return f"{100 * row['accuracy']:.2f}%"
  return "fails" if not row.get("error", "").startswith("not supported") else "not supported"


def render_markdown(res) -> str:
  m = res["machine"]
  v = m["versions"]
  out = [
    f"Measured {m['date']} on {m['cpu_count']} CPU core(s) of {m['processor']} "
    f"({m['jax_backend']}), jax "
    f"{v['jax']}, flax {v['flax']}, qwix {v['qwix']}, aqtp {v['aqtp']}; "
    f"{m.get('allocator', 'default allocator')} (see benchmarks/_malloc.py)"
    + (" — **quick smoke mode, not representative**" if res["config"]["quick"] else "")
    + ".",
    "",
  ]
  notes = []
  for t in res.get("timing", []):
    out += [
      f"**Train step, {t['arch'].upper()}** (batch {t['batch']}, input "
      f"{tuple(t['input_shape'][1:])}, Adam, median of {t['rounds']} "
      f"interleaved rounds x {t['steps_per_round']} steps):",
      "",
      "| variant | ms / step | vs float | note |",
      "|---|---|---|---|",
    ]
    for r in t["rows"]:
      if "median_ms" in r:
        out.append(
          f"| {r['name']} | {r['median_ms']:.2f} | {r['ratio_vs_float']:.2f}x | "
          f"{r.get('note', '')} |"
        )
      else:
        out.append(f"| {r['name']} | — | — | {r['error'][:120]} |")
    out.append("")
  a = res.get("accuracy")
  if a:
    out += [
      f"**CNN test accuracy, {a['dataset']}** ({a['n_train']} train / {a['n_test']} test; "
      f"float trained {a['epochs']} epoch(s) at lr {a['lr_float']}, then QAT fine-tuned "
      f"{a['epochs']} epoch(s) from those weights at lr {a['lr_qat']}, same data order; "
      "in brackets: accuracy at the start of QAT):",
      "",
    ]
    table = {}
    order = []
    for r in a["rows"]:
      key = (r["lib"], r["method"])
      if key not in table:
        table[key] = {}
        order.append(key)
      cell = _fmt_acc(r)
      if "accuracy_before_qat" in r:
        cell += f" ({100 * r['accuracy_before_qat']:.1f}%)"
      if "error" in r:
        notes.append(f"{r['lib']} {r['method']} W{r['bits']}A{r['bits']}: {r['error']}")
        cell += f" [{len(notes)}]"
      table[key][r["bits"]] = cell
    out += ["| library | method | float | W8A8 | W4A4 | W2A2 |", "|---|---|---|---|---|---|"]
    for key in order:
      cells = table[key]
      row = [cells.get(None, ""), cells.get(8, ""), cells.get(4, ""), cells.get(2, "")]
      out.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + " |")
    out.append("")
  if "lm" in res:
    out += _peer_lm.render_lm(res["lm"])
  notes += [
    f"{t['arch'].upper()} timing, {r['name']}: {r['error']}"
    for t in res.get("timing", [])
    for r in t["rows"]
    if "error" in r
  ]
  if notes:
    out += ["Failures and unsupported combinations:", ""]
    out += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    out.append("")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument(
    "--data-dir",
    default=None,
    help="folder with the four MNIST IDX .gz files (default: scikit-learn digits)",
  )
  p.add_argument(
    "--epochs",
    type=int,
    default=None,
    help="float epochs, and QAT epochs per library (default: MNIST 1, digits 20)",
  )
  p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds, meaningless)")
  p.add_argument(
    "--out",
    default=str(HERE / "results" / "peers.json"),
    help="JSON result path; the Markdown table goes next to it with the suffix .md",
  )
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, float training")
  p.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate, QAT fine-tune")
  p.add_argument("--rounds", type=int, default=None, help="timing rounds (default: MLP 10, CNN 8)")
  p.add_argument(
    "--steps",
    type=int,
    default=None,
    help="timed steps per variant per round (default: MLP 10, CNN 3)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip-timing", action="store_true")
  p.add_argument("--skip-accuracy", action="store_true")
  p.add_argument("--skip-lm", action="store_true", help="skip the transformer LM comparison")
  p.add_argument(
    "--extra",
    action="store_true",
    help="accuracy also for qatjax W8A8 LSQ and qwix with dynamic activation scales",
  )
  p.add_argument(
    "--no-float-reference",
    action="store_true",
    help="skip the float model fine-tuned for the QAT epochs (the fair float reference)",
  )
  args = p.parse_args(argv)
  allocator = fix_malloc_thresholds()  # before the first step: see benchmarks/_malloc.py

  if args.quick:
    sched = {"mlp": (args.rounds or 2, args.steps or 2), "cnn": (args.rounds or 2, args.steps or 2)}
    warmup, tbatch = 1, 16
  else:
    sched = {
      "mlp": (args.rounds or 10, args.steps or 10),
      "cnn": (args.rounds or 8, args.steps or 3),
    }
    warmup, tbatch = 2, args.batch
  data = datasets.load_mnist(args.data_dir) if args.data_dir else datasets.load_digits()
  epochs = args.epochs or (1 if args.quick else 1 if data.name == "mnist" else 20)
  batch = args.batch
  if args.quick:  # a slice of the data, small batches
    data = data._replace(
      x_train=data.x_train[:256],
      y_train=data.y_train[:256],
      x_test=data.x_test[:128],
      y_test=data.y_test[:128],
    )
    batch = 64

  res = {
    "machine": machine_info(allocator),
    "config": {
      "quick": args.quick,
      "warmup": warmup,
      "timing_batch": tbatch,
      "seed": args.seed,
      "data_dir": args.data_dir,
    },
  }
  t_start = time.perf_counter()
  if not args.skip_timing:
    res["timing"] = []
    for arch in ("mlp", "cnn"):
      print(f"timing {arch} ...", flush=True)
      res["timing"].append(bench_timing(arch, tbatch, *sched[arch], warmup, args.seed, args.quick))
  if not args.skip_accuracy:
    print(f"accuracy on {data.name} ({epochs} epoch(s) float + {epochs} QAT) ...", flush=True)
    res["accuracy"] = bench_accuracy(
      data,
      epochs,
      batch,
      args.lr,
      args.qat_lr,
      args.seed,
      eval_batch=1000 if not args.quick else 64,
      quick=args.quick,
      extra=args.extra,
      float_reference=not (args.quick or args.no_float_reference),
    )
  if not args.skip_lm:
    print("LM: qatjax vs qwix on the byte-level transformer ...", flush=True)
    res["lm"] = _peer_lm.bench_lm(quick=args.quick, seed=args.seed)
  res["total_s"] = round(time.perf_counter() - t_start, 1)

  md = render_markdown(res)
  print()
  print(md)
  out = pathlib.Path(args.out)
  write_results(out.parent, out.stem, res, md)
  print(f"({res['total_s']} s)")


if __name__ == "__main__":
  main()
