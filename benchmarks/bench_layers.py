"""QAT train-step overhead: jitted Adam steps of float32 vs W8A8 observer vs W8A8 LSQ layers.

Two models, each built from qatjax layers with ``config=None`` (exactly the Flax layers), a W8A8
observer config (per-channel min/max weights, EMA activation ranges in ``quant_stats``) and a W8A8
LSQ config (learned step sizes and offsets in ``params``), and a diagnostic row: LSQ with the
first layer on observers. An LSQ first layer learns its input's step, whose gradient needs the
gradient of that input (``sum(dx_q * (round(x/s) - x/s))``): a transposed product the size of the
layer's forward one that the float step never computes, as it does not differentiate its data.
That row shows what LSQ costs without it:

  * MLP 784-512-512-10, batch 256;
  * CNN 28x28x1 -> conv 32 3x3 -> relu -> conv 64 3x3 stride 2 -> relu -> dense 10, batch 256.

One step is ``value_and_grad`` of the softmax cross-entropy + an ``optax.adam`` update, with
``quant_stats`` mutable, jitted, timed to ``jax.block_until_ready``. After a warm-up (compile, and
calibration of the observers), the variants of one model run interleaved, round-robin, for
``--repeats`` rounds of ``--steps`` consecutive steps each, so that drift in machine load hits
them alike; the table reports the median per step and its ratio to the float32 step of the same
model. Goals on CPU (issue 12): MLP observer <= 1.0x, LSQ <= 1.05x; CNN <= 1.0x.

Residual bytes: what the step's ``value_and_grad`` keeps for its backward pass, counted with
JAX's saved-residuals accounting (the function behind ``jax.ad_checkpoint.
print_saved_residuals``), in total and without the ones that are the function's arguments (the
parameters, which exist anyway), for each model above and for an MLP 784-1024x3-10 at batch 512.
Goal: a QAT step keeps no more than the float step (<= 1.0x).

Usage: python benchmarks/bench_layers.py [--repeats N] [--batch N] [--hlo]

Writes benchmarks/results/layers.json and layers.md (the README table).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the checkout's qatjax

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _malloc import fix_malloc_thresholds  # noqa: E402
from _results import cpu_name, write_results  # noqa: E402

from qatjax import QConv, QDense, QuantConfig  # noqa: E402

VARIANTS = {  # a config, or (the first layer's config, the other layers' config)
  "float32": None,
  "W8A8 observer": QuantConfig(8, 8),
  "W8A8 LSQ": QuantConfig(8, 8, method="lsq"),
  "W8A8 LSQ, layer 1 observer": (QuantConfig(8, 8), QuantConfig(8, 8, method="lsq")),
}
GOALS = {("MLP", "W8A8 observer"): 1.0, ("MLP", "W8A8 LSQ"): 1.05, ("CNN", "W8A8 observer"): 1.0}
GOALS[("CNN", "W8A8 LSQ")] = 1.0
RESIDUAL_GOAL = 1.0


class MLP(nn.Module):
  first_config: object = None  # the first layer's
  config: object = None  # the other layers'
  dtype: object = None  # the layers' computation dtype (bench_gpu: bfloat16); logits float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(512, config=self.first_config, dtype=self.dtype)(x))
    x = nn.relu(QDense(512, config=self.config, dtype=self.dtype)(x))
    return QDense(10, config=self.config, dtype=self.dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
  first_config: object = None
  config: object = None
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(QConv(32, (3, 3), config=self.first_config, dtype=self.dtype)(x))
    x = nn.relu(QConv(64, (3, 3), strides=2, config=self.config, dtype=self.dtype)(x))
    x = x.reshape(x.shape[0], -1)
    return QDense(10, config=self.config, dtype=self.dtype)(x).astype(jnp.float32)


class WideMLP(nn.Module):
  """The MLP of issue 12's residual figures: 784-1024x3-10."""

  first_config: object = None
  config: object = None

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(1024, config=self.first_config)(x))
    for _ in range(2):
      x = nn.relu(QDense(1024, config=self.config)(x))
    return QDense(10, config=self.config)(x)


MODELS = {"MLP 784-512-512-10": (MLP, (784,)), "CNN 28x28x1 c32-c64s2-d10": (CNN, (28, 28, 1))}
RESIDUAL_MODELS = {**MODELS, "MLP 784-1024x3-10 (batch 512)": (WideMLP, (784,))}


def setup(model_cls, in_shape, config, batch, seed=0):
  """``(model, variables, x, y)``: the model, its initial variables and one random batch."""
  first, rest = config if isinstance(config, tuple) else (config, config)
  model = model_cls(first, rest)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch,) + in_shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  return model, jax.jit(model.init)(jax.random.key(seed), x), x, y


def residual_bytes(model_cls, in_shape, config, batch, seed=0):
  """``(all, non-argument)`` bytes the loss's ``value_and_grad`` saves for its backward pass."""
  from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints

  model, variables, x, y = setup(model_cls, in_shape, config, batch, seed)
  stats = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    logits, _ = model.apply({**stats, "params": params}, x, mutable=sorted(stats))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  res = saved_residuals(loss, variables["params"])
  size = lambda a: int(np.prod(a.shape)) * a.dtype.itemsize
  return (
    sum(size(a) for a, _ in res),
    sum(size(a) for a, why in res if not why.startswith("from the argument")),
  )


def residual_rows(batch):
  rows = []
  for model_name, (cls, in_shape) in RESIDUAL_MODELS.items():
    b = 512 if "batch 512" in model_name else batch
    sizes = {v: residual_bytes(cls, in_shape, cfg, b) for v, cfg in VARIANTS.items()}
    (f_all, f_act) = sizes["float32"]
    for variant, (all_b, act_b) in sizes.items():
      rows.append(
        dict(
          model=model_name,
          variant=variant,
          residual_mb=round(all_b / 1e6, 2),
          residual_ratio=round(all_b / f_all, 3),
          activation_residual_mb=round(act_b / 1e6, 2),
          activation_residual_ratio=round(act_b / f_act, 3),
        )
      )
  return rows


def make_case(model_cls, in_shape, config, batch, seed=0):
  """``(jitted step, state)``; ``step(*state, x, y)`` returns the new state and the loss."""
  model, variables, x, y = setup(model_cls, in_shape, config, batch, seed)
  params = variables["params"]
  stats = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(1e-3)
  mutable = sorted(stats)

  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      if mutable:
        logits, upd = model.apply({**stats, "params": p}, x, mutable=mutable)
      else:
        logits, upd = model.apply({"params": p}, x), {}
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**stats, **upd}, opt_state, loss

  return jax.jit(step), [params, stats, tx.init(params)], (x, y)


def hlo_summary(step, state, data):
  """Fusions / custom calls (convolution, dot) in the optimized HLO: a rough count of passes."""
  text = step.lower(*state, *data).compile().as_text()
  entry = text[text.find("ENTRY") :]
  lines = entry.splitlines()
  count = lambda key: sum(1 for line in lines if key in line)
  return {
    "fusions": count(" fusion("),
    "convolutions": count("convolution("),
    "dots": count(" dot("),
    "custom_calls": count("custom-call("),
  }


def run(repeats, batch, warmup, with_hlo, steps):
  cases = []
  for model_name, (cls, in_shape) in MODELS.items():
    for variant, config in VARIANTS.items():
      step, state, data = make_case(cls, in_shape, config, batch)
      cases.append(dict(model=model_name, variant=variant, step=step, state=state, data=data))
  for c in cases:  # compile, calibrate the observers, settle
    t0 = time.perf_counter()
    for _ in range(warmup):
      *c["state"], loss = c["step"](*c["state"], *c["data"])
      jax.block_until_ready(loss)
    c["warmup_s"] = time.perf_counter() - t0
    c["times"] = []
  for model_name in MODELS:  # interleaved rounds within one model (a CNN step in between
    group = [c for c in cases if c["model"] == model_name]  # would leave the MLP's caches cold)
    for _ in range(repeats):
      for c in group:
        t0 = time.perf_counter()
        for _ in range(steps):
          *c["state"], loss = c["step"](*c["state"], *c["data"])
        jax.block_until_ready(loss)
        c["times"].append((time.perf_counter() - t0) / steps)
  rows = []
  for c in cases:
    base = next(b for b in cases if b["model"] == c["model"] and b["variant"] == "float32")
    med, base_med = statistics.median(c["times"]), statistics.median(base["times"])
    row = dict(
      model=c["model"],
      variant=c["variant"],
      median_ms=round(med * 1e3, 3),
      min_ms=round(min(c["times"]) * 1e3, 3),
      ratio_to_float=round(med / base_med, 3),
      goal=GOALS.get((c["model"].split()[0], c["variant"])),
    )
    if with_hlo:
      row["hlo"] = hlo_summary(c["step"], c["state"], c["data"])
    rows.append(row)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--repeats", type=int, default=30, help="timed rounds (each runs every case)")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="consecutive steps per timed sample")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps per case (incl. compile)")
  p.add_argument("--hlo", action="store_true", help="also count fusions / convs / dots in HLO")
  p.add_argument("--out", default=str(HERE / "results"), help="folder for the result files")
  args = p.parse_args()
  allocator = fix_malloc_thresholds()  # before the first step: see benchmarks/_malloc.py

  residuals = residual_rows(args.batch)
  rows = run(args.repeats, args.batch, args.warmup, args.hlo, args.steps)
  device = jax.devices()[0]
  meta = dict(
    batch=args.batch,
    repeats=args.repeats,
    steps=args.steps,
    warmup=args.warmup,
    jax=jax.__version__,
    flax=nn.__name__ and __import__("flax").__version__,
    optax=optax.__version__,
    backend=jax.default_backend(),
    device=getattr(device, "device_kind", str(device)),
    cpu=cpu_name(),
    cores=os.cpu_count(),
    allocator=allocator,
    step="value_and_grad(softmax CE) + optax.adam, quant_stats mutable, jitted",
    goal="MLP observer <= 1.0x, LSQ <= 1.05x float32; CNN <= 1.0x; residuals <= 1.0x (CPU)",
  )
  print(
    f"QAT train step, batch {args.batch}, {meta['backend']} ({meta['cpu']}, "
    f"{meta['cores']} cores), median of {args.repeats} interleaved rounds"
  )
  header = f"{'model':<28} {'variant':<27} {'median ms':>10} {'min ms':>9} {'x float':>8}"
  print(header)
  print("-" * len(header))
  for r in rows:
    flag = ""
    if r["goal"] is not None:
      flag = "  ok" if r["ratio_to_float"] <= r["goal"] else f"  (goal {r['goal']:.2f}x)"
    hlo = f"  {r['hlo']}" if "hlo" in r else ""
    print(
      f"{r['model']:<28} {r['variant']:<27} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
      f"{r['ratio_to_float']:>8.2f}{flag}{hlo}"
    )

  print()
  print(
    f"{'residuals (backward pass)':<34} {'variant':<27} {'MB':>7} {'x float':>8} "
    f"{'act MB':>7} {'x float':>8}"
  )
  for r in residuals:
    print(
      f"{r['model']:<34} {r['variant']:<27} {r['residual_mb']:>7.2f} "
      f"{r['residual_ratio']:>8.2f} {r['activation_residual_mb']:>7.2f} "
      f"{r['activation_residual_ratio']:>8.2f}"
    )

  def met(ratio, goal):
    return "" if goal is None else (" (met)" if ratio <= goal else f" (goal {goal:.2f}x: missed)")

  md = [
    f"Jitted train step (value_and_grad of softmax cross-entropy + Adam, `quant_stats` "
    f"mutable), batch {args.batch}, {meta['backend']} ({meta['cpu']}, {meta['cores']} "
    f"cores), median over {args.repeats} interleaved rounds of {args.steps} consecutive "
    f"steps (variants of one model interleaved; {allocator}, see benchmarks/_malloc.py). "
    "Goals: MLP observer <= 1.0x, LSQ <= 1.05x "
    "float32; CNN <= 1.0x. Residuals: bytes the step keeps for its backward pass (JAX's "
    "saved-residuals accounting), all of them and without the parameters (activations); "
    "goal <= 1.0x float32. The row *W8A8 LSQ, layer 1 observer* (no goal) is LSQ with the "
    "first layer on observers: an LSQ first layer's input step needs the gradient of that "
    "input, a transposed product the float step never computes (it does not differentiate "
    "its data).",
    "",
    "| model | variant | median ms | x float32 | residual MB (x float32) | activation "
    "residual MB (x float32) |",
    "|---|---|---|---|---|---|",
  ]
  by_key = {(r["model"], r["variant"]): r for r in residuals}
  for r in rows:
    res = by_key[(r["model"], r["variant"])]
    md.append(
      f"| {r['model']} | {r['variant']} | {r['median_ms']:.2f} | "
      f"{r['ratio_to_float']:.2f}{met(r['ratio_to_float'], r['goal'])} | "
      f"{res['residual_mb']:.2f} ({res['residual_ratio']:.2f}) | "
      f"{res['activation_residual_mb']:.2f} ({res['activation_residual_ratio']:.2f}) |"
    )
  timed = {(x["model"], x["variant"]) for x in rows}
  md.extend(
    f"| {r['model']} | {r['variant']} | - | - | {r['residual_mb']:.2f} "
    f"({r['residual_ratio']:.2f}) | {r['activation_residual_mb']:.2f} "
    f"({r['activation_residual_ratio']:.2f}) |"
    for r in residuals
    if (r["model"], r["variant"]) not in timed
  )
  data = dict(meta=meta, results=rows, residuals=residuals)
  write_results(args.out, "layers", data, "\n".join(md))


if __name__ == "__main__":
  main()
