"""Integer inference (converted model) vs float32 inference of the same models, on CPU.

Models: the MNIST MLP (784-512-512-10) and a CNN (conv32-pool-conv64-pool-dense128-dense10) at
batch 256, and a 4096-wide MLP (4096-4096-4096-10) at batch 8. Variants: float32 (the same
modules with ``config=None``), int8 (w8a8) and int4 weights (w4a8) after ``qatjax.convert``, and
"before": the integer path as it was before its CPU optimisations (dense kernels re-stored in
their logical ``(K, N)`` order with ``QArray.with_perm(None)``; ``int_kernels.SWAP_ROWS`` and
``FEW_CHANNELS`` set to 0 while tracing), to measure them in the same run. All integer variants
give bitwise the same outputs (checked).

Every variant is ``jax.jit(model.apply)(variables, x)`` with the variables passed as arguments (as
a server holding weights in memory would), plus int4 with the variables closed over ("int4
const": compile-time constants, as in ``export_stablehlo``; XLA folds the 4-bit unpacking).
Timing: 3 warm-up calls, then interleaved rounds (each round times every variant once, in
rotating order, over enough calls to last ~30 ms); the median per-call time over rounds is
reported. Also reported: model bytes (``qatjax`` ``model_size``).

Usage: python benchmarks/bench_inference.py [--rounds 15] [--quick]
Writes benchmarks/results/inference.json and inference.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _results import write_results

from qatjax import QArray, QConv, QDense, QuantConfig, convert, model_size
from qatjax.core import int_kernels as _int_ops

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
GOALS = {"mnist_mlp": 1.2, "cnn": 1.2, "wide_mlp": 3.0}  # int8 speed-up over float32


class MLP(nn.Module):
  sizes: tuple
  cfg: QuantConfig | None = None

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, n in enumerate(self.sizes):
      x = QDense(n, config=self.cfg)(x)
      x = nn.relu(x) if i < len(self.sizes) - 1 else x
    return x


class CNN(nn.Module):
  cfg: QuantConfig | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(QConv(32, (3, 3), config=self.cfg)(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(QConv(64, (3, 3), config=self.cfg)(x)), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(128, config=self.cfg)(x))
    return QDense(10, config=self.cfg)(x)


MODELS = {
  "mnist_mlp": (lambda cfg: MLP((512, 512, 10), cfg), (256, 784)),
  "cnn": (lambda cfg: CNN(cfg), (256, 28, 28, 1)),
  "wide_mlp": (lambda cfg: MLP((4096, 4096, 10), cfg), (8, 4096)),
}


def logical_order(qvars):
  """The same converted variables with every QArray stored in its logical order."""
  return jax.tree_util.tree_map(
    lambda a: a.with_perm(None) if isinstance(a, QArray) else a,
    qvars,
    is_leaf=lambda a: isinstance(a, QArray),
  )


def build(name):
  make, shape = MODELS[name]
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  float_model = make(None)
  variants = {"float32": (float_model, float_model.init(jax.random.key(1), x))}
  for bits in (8, 4):
    model = make(QuantConfig(weight_bits=bits))
    v = model.init(jax.random.key(1), x)
    _, stats = model.apply(v, x, mutable=["quant_stats"])
    qv = convert(model, {**v, **stats}, x)
    variants[f"int{bits}"] = (model, qv)
    variants[f"int{bits} before"] = (model, logical_order(qv))
  return x, variants


@contextlib.contextmanager
def unoptimised():
  """Traces the integer path as before its CPU optimisations (same numbers, slower HLO)."""
  saved = _int_ops.SWAP_ROWS, _int_ops.FEW_CHANNELS
  _int_ops.SWAP_ROWS, _int_ops.FEW_CHANNELS = 0, 0
  try:
    yield
  finally:
    _int_ops.SWAP_ROWS, _int_ops.FEW_CHANNELS = saved


def compiled(variants, x):
  """``name -> f(x)``: jitted applies (traced now); variables as arguments, or closed over."""
  fns = {}
  for k, (m, v) in variants.items():
    f = jax.jit(m.apply)
    with unoptimised() if "before" in k else contextlib.nullcontext():
      jax.block_until_ready(f(v, x))
    fns[k] = lambda x, f=f, v=v: f(v, x)
  m, v = variants["int4"]
  fns["int4 const"] = jax.jit(lambda x, m=m, v=v: m.apply(v, x))
  return fns


def time_variants(x, fns, rounds, target_s=0.03):
  reps = {}
  for k, f in fns.items():
    for _ in range(3):
      jax.block_until_ready(f(x))
    t = time.perf_counter()
    jax.block_until_ready(f(x))
    reps[k] = max(1, int(target_s / max(time.perf_counter() - t, 1e-6)))
  times = {k: [] for k in fns}
  names = list(fns)
  for r in range(rounds):
    for k in names[r % len(names) :] + names[: r % len(names)]:
      f = fns[k]
      t = time.perf_counter()
      for _ in range(reps[k]):
        out = f(x)
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t) / reps[k])
  return {k: float(np.median(t)) for k, t in times.items()}


def check_agreement(x, variants):
  """The optimisations change no number: outputs are bitwise those of the "before" path."""
  for bits in (8, 4):
    a = jax.jit(variants[f"int{bits}"][0].apply)(variants[f"int{bits}"][1], x)
    with unoptimised():
      b = jax.jit(variants[f"int{bits}"][0].apply)(variants[f"int{bits} before"][1], x)
    if not bool(jnp.array_equal(a, b)):
      raise SystemExit(f"int{bits}: the optimised and unoptimised paths differ")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--quick", action="store_true", help="3 rounds (smoke test)")
  args = p.parse_args()
  rounds = 3 if args.quick else args.rounds
  rows = []
  for name in MODELS:
    x, variants = build(name)
    check_agreement(x, variants)
    t = time_variants(x, compiled(variants, x), rounds)
    sizes = {
      k: model_size({"params": variants[k][1]["params"]}).total for k in ("float32", "int8", "int4")
    }
    row = {
      "model": name,
      "batch": int(x.shape[0]),
      "ms": {k: 1e3 * v for k, v in t.items()},
      "speedup_vs_float32": {k: t["float32"] / v for k, v in t.items() if k != "float32"},
      "bytes": sizes,
      "bytes_ratio": {k: sizes[k] / sizes["float32"] for k in ("int8", "int4")},
      "goal_int8_speedup": GOALS[name],
    }
    row["goal_met"] = row["speedup_vs_float32"]["int8"] >= GOALS[name]
    rows.append(row)
    print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items()), flush=True)
  meta = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "cpus": os.cpu_count(),
    "machine": platform.machine(),
    "processor": platform.processor() or platform.machine(),
    "load_average_1m": os.getloadavg()[0],
    "rounds": rounds,
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  md = render(rows, meta)
  print("\n" + md)
  write_results(RESULTS, "inference", {"meta": meta, "results": rows}, md)


def render(rows, meta):
  head = [
    "model",
    "batch",
    "float32 ms",
    "int8 ms",
    "int4 ms",
    "int8 speed-up (goal)",
    "int4 speed-up",
    "int4 const",
    "int8 before",
    "int4 before",
    "bytes f32 / int8 / int4",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    ms, sp, b = r["ms"], r["speedup_vs_float32"], r["bytes"]
    lines.append(
      "| "
      + " | ".join(
        [
          r["model"],
          str(r["batch"]),
          f"{ms['float32']:.2f}",
          f"{ms['int8']:.2f}",
          f"{ms['int4']:.2f}",
          f"{sp['int8']:.2f}x (>= {r['goal_int8_speedup']}x: "
          f"{'met' if r['goal_met'] else 'NOT met'})",
          f"{sp['int4']:.2f}x",
          f"{sp['int4 const']:.2f}x",
          f"{sp['int8 before']:.2f}x",
          f"{sp['int4 before']:.2f}x",
          f"{b['float32']:,} / {b['int8']:,} ({100 * r['bytes_ratio']['int8']:.1f}%) / "
          f"{b['int4']:,} ({100 * r['bytes_ratio']['int4']:.1f}%)",
        ]
      )
      + " |"
    )
  lines.append("")
  lines.append(
    f"jit(model.apply)(variables, x) on {meta['backend']} ({meta['cpus']} CPUs, "
    f"load average {meta['load_average_1m']:.1f} at the end), jax {meta['jax']}; "
    f"median of {meta['rounds']} interleaved rounds. Speed-ups are float32 time / "
    'integer time; "int4 const" = variables closed over (compile-time constants, '
    'as in export_stablehlo: the 4-bit unpacking is constant-folded); "before" = the '
    "integer path before its CPU optimisations (dense kernels in logical (K, N) order, "
    "which the int8 matmul repacks every call; int4 unpacked + interleaved; no "
    "swapped small-batch dot; no exact-float few-channel conv)."
  )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
