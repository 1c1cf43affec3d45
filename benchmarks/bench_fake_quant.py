"""Fake-quant kernel cost: jitted forward + backward against a jitted copy of the same array.

Each kernel is timed as one jitted function that runs the forward pass and applies a cotangent
through ``jax.vjp``, returning ``y`` and ``dx`` (and, for LSQ, the scale gradient); the baseline is
``jax.jit(lambda x: x * 1.0)`` on the same (2048, 2048) float32 array (4M elements). A forward +
backward pass reads ``x`` and ``dy`` and writes ``y`` and ``dx``, twice the copy's memory traffic,
so a memory-bound kernel sits at about 2x the copy; the goal is "within 2x of the copy".

Usage: python benchmarks/bench_fake_quant.py [--repeats N] [--size N]

Writes benchmarks/results/fake_quant.json and fake_quant.md (the README table).
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the checkout's qatjax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _results import write_results  # noqa: E402

import qatjax  # noqa: E402

QMIN, QMAX = -128, 127


def _fq(axis):
  def f(x, s, z, dy):
    y, vjp = jax.vjp(lambda x: qatjax.fake_quant(x, s, z, QMIN, QMAX, axis=axis), x)
    return y, vjp(dy)[0]

  return jax.jit(f)


def _lsq(axis, grad_scale):
  def f(x, s, z, dy):
    y, vjp = jax.vjp(
      lambda x, s: qatjax.lsq_fake_quant(x, s, z, QMIN, QMAX, axis=axis, grad_scale=grad_scale),
      x,
      s,
    )
    dx, ds = vjp(dy)
    return y, dx, ds

  return jax.jit(f)


def _time(cases, repeats, warmup=3):
  """Median and min wall time (ms) per case; the cases run interleaved, round-robin, so that
  changes in machine load hit them alike."""
  for _, fn, args in cases:
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = [[] for _ in cases]
  for _ in range(repeats):
    for i, (_, fn, args) in enumerate(cases):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - t0)
  return [(statistics.median(t) * 1e3, min(t) * 1e3) for t in times]


def _fusions(fn, args):
  """Number of fusion / custom kernels in the optimized HLO (a rough count of memory passes)."""
  text = fn.lower(*args).compile().as_text()
  entry = text[text.find("ENTRY") :]
  return sum(1 for line in entry.splitlines() if " fusion(" in line or "custom-call(" in line)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--repeats", type=int, default=100, help="timed runs per kernel (median)")
  p.add_argument("--size", type=int, default=2048, help="the array is (size, size) float32")
  p.add_argument("--out", default=str(HERE / "results"), help="folder for the result files")
  args = p.parse_args()

  n = args.size
  kx, kd, ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, n), jnp.float32)
  dy = jax.random.normal(kd, (n, n), jnp.float32)
  s_t, z_t = jnp.float32(3.0 / 127), jnp.float32(0.0)
  s_c = jax.random.uniform(ks, (n,), jnp.float32, 1.0 / 127, 4.0 / 127)
  z_c = jnp.zeros((n,), jnp.float32)
  gf = qatjax.lsq_grad_scale(n * n, QMAX)

  copy = jax.jit(lambda x: x * 1.0)
  cases = [
    ("copy (x * 1.0)", copy, (x,)),
    # Same memory traffic as fake_quant's forward + backward (read 2 arrays, write 2), for scale.
    ("copy x and dy (reference)", jax.jit(lambda x, dy: (x * 1.0, dy * 1.0)), (x, dy)),
    ("fake_quant per-tensor", _fq(None), (x, s_t, z_t, dy)),
    ("fake_quant per-channel", _fq(-1), (x, s_c, z_c, dy)),
    ("lsq_fake_quant per-tensor", _lsq(None, gf), (x, s_t, z_t, dy)),
    ("lsq_fake_quant per-channel", _lsq(-1, gf), (x, s_c, z_c, dy)),
  ]
  rows = []
  timings = _time(cases, args.repeats)
  copy_ms, copy_min = timings[0]
  for (name, fn, fargs), (med, best) in zip(cases, timings):
    rows.append(
      dict(
        name=name,
        median_ms=round(med, 4),
        min_ms=round(best, 4),
        ratio_to_copy=round(med / copy_ms, 3),
        min_ratio_to_copy=round(best / copy_min, 3),
        kernels=_fusions(fn, fargs),
      )
    )

  device = jax.devices()[0]
  meta = dict(
    shape=[n, n],
    dtype="float32",
    repeats=args.repeats,
    jax=jax.__version__,
    backend=jax.default_backend(),
    device=getattr(device, "device_kind", str(device)),
    cpu=platform.processor() or platform.machine(),
    goal="ratio_to_copy <= 2.0",
  )
  print(
    f"fake quant forward+backward, ({n}, {n}) float32, {meta['backend']} "
    f"({meta['device']}), median of {args.repeats}"
  )
  header = (
    f"{'kernel':<28} {'median ms':>10} {'x copy':>7} {'min ms':>9} {'x copy':>7} {'fusions':>8}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    flag = "" if r["ratio_to_copy"] <= 2.0 or "copy" in r["name"] else "  (over 2x)"
    print(
      f"{r['name']:<28} {r['median_ms']:>10.3f} {r['ratio_to_copy']:>7.2f} "
      f"{r['min_ms']:>9.3f} {r['min_ratio_to_copy']:>7.2f} {r['kernels']:>8}{flag}"
    )

  md = [
    f"({n}, {n}) float32, forward + backward (`jax.vjp`, cotangent applied), "
    f"{meta['backend']} ({meta['device']}), median of {args.repeats} runs; goal: within 2x "
    "of a jitted copy.",
    "",
    "| kernel | median ms | x copy (median) | min ms | x copy (min) |",
    "|---|---|---|---|---|",
  ]
  md += [
    f"| {r['name']} | {r['median_ms']:.3f} | {r['ratio_to_copy']:.2f} | {r['min_ms']:.3f} | "
    f"{r['min_ratio_to_copy']:.2f} |"
    for r in rows
  ]
  write_results(args.out, "fake_quant", dict(meta=meta, results=rows), "\n".join(md))


if __name__ == "__main__":
  main()
