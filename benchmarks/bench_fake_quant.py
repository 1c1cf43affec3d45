"""Fake-quant kernel cost: jitted forward + backward against its memory bound.

Each kernel is timed as one jitted function that runs the forward pass and applies a cotangent
through ``jax.vjp``, returning ``y`` and ``dx`` (and, for LSQ, the scale gradient), on a (2048,
2048) float32 array (N = 4M elements). Its bound is the time to move the bytes a forward +
backward pass must move at the bandwidth of a jitted copy measured in the same run: read ``x``,
write ``y``, read what the backward needs of the forward (a 1-byte in-range mask for the clipped
STE; ``x`` again for LSQ, whose scale gradient needs ``round(x / s) - x / s``), read ``dy``,
write ``dx``: 17N bytes for ``fake_quant``, 20N for ``lsq_fake_quant``. Goal: every kernel within
1.25x of its bound.

The bandwidth is that of a copy with the kernels' shape of traffic: two arrays read, two written
(``x * 2.0, dy * 2.0``: 16N bytes, 64 MiB, more than the 32 MiB last-level cache of this project's
CPUs). A copy of ``x`` alone (8N bytes, 32 MiB) runs partly from that cache and overstates the
bandwidth the kernels can get: by it, the two-array copy itself took 1.7-1.9x its "bound" (stop
18's table). Both copies are reported; ``x 1-copy`` is a kernel's time against the one-array
copy's bandwidth. ``* 2.0``, not ``* 1.0``: XLA simplifies the latter to a buffer copy.

Usage: python benchmarks/bench_fake_quant.py [--repeats N] [--size N]

Writes benchmarks/results/fake_quant.json and fake_quant.md (the README table).
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _results import cpu_name, write_results  # noqa: E402

import qatjax  # noqa: E402

QMIN, QMAX = -128, 127
GOAL = 1.25
# Bytes per element a fused forward + backward must move (see the module docstring).
MASK_BYTES = 4 + 4 + 1 + 4 + 4  # clipped STE: x, y, in-range mask, dy, dx
LSQ_BYTES = 4 + 4 + 4 + 4 + 4  # LSQ: x, y, x again, dy, dx
COPY_BYTES = 4 + 4  # the one-array copy: read x, write x * 2.0
REF_BYTES = 16  # the two-array copy the bound is calibrated on: read x and dy, write both
GOAL_LABEL = {None: "-", True: "met", False: "not met"}


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
  """Wall times (s) per case and round; the cases run interleaved, round-robin, so that
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
  return times


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

  # (name, function, arguments, bytes per element its forward + backward must move)
  cases = [
    ("copy x and dy (bandwidth)", jax.jit(lambda x, dy: (x * 2.0, dy * 2.0)), (x, dy), REF_BYTES),
    ("copy x alone", jax.jit(lambda x: x * 2.0), (x,), COPY_BYTES),
    ("fake_quant per-tensor", _fq(None), (x, s_t, z_t, dy), MASK_BYTES),
    ("fake_quant per-channel", _fq(-1), (x, s_c, z_c, dy), MASK_BYTES),
    ("lsq_fake_quant per-tensor", _lsq(None, gf), (x, s_t, z_t, dy), LSQ_BYTES),
    ("lsq_fake_quant per-channel", _lsq(-1, gf), (x, s_c, z_c, dy), LSQ_BYTES),
  ]
  rows = []
  times = _time([c[:3] for c in cases], args.repeats)
  ref_ms, ref_min = statistics.median(times[0]) * 1e3, min(times[0]) * 1e3
  one_ms = statistics.median(times[1]) * 1e3
  gbps = REF_BYTES * n * n / (ref_ms * 1e-3) / 1e9
  one_gbps = COPY_BYTES * n * n / (one_ms * 1e-3) / 1e9
  for (name, fn, fargs, nbytes), t in zip(cases, times):
    med, best = statistics.median(t) * 1e3, min(t) * 1e3
    bound_ms = ref_ms * nbytes / REF_BYTES
    bound_min = ref_min * nbytes / REF_BYTES
    # Paired: each round's time over the same round's bound. This machine's speed drifts in
    # phases (the copy's median has been 1.5x to 4x its minimum from one run to the next); a
    # phase slows every case of a round alike, so the ratio within a round does not see it.
    paired = [k / (r * nbytes / REF_BYTES) for k, r in zip(t, times[0])]
    ratio = statistics.median(paired)
    rows.append(
      dict(
        name=name,
        median_ms=round(med, 4),
        min_ms=round(best, 4),
        ratio_to_one_array_copy_bound=round(
          statistics.median(k / (c * nbytes / COPY_BYTES) for k, c in zip(t, times[1])), 3
        ),
        bytes_per_element=nbytes,
        bound_ms=round(bound_ms, 4),
        ratio_to_bound=round(ratio, 3),
        ratio_of_medians=round(med / bound_ms, 3),
        min_ratio_to_bound=round(best / bound_min, 3),
        goal_met=None if "copy" in name else ratio <= GOAL,
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
    cpu=cpu_name(),
    copy_gb_per_s=round(gbps, 2),
    one_array_copy_gb_per_s=round(one_gbps, 2),
    load_average=round(os.getloadavg()[0], 2),
    goal=f"ratio_to_bound <= {GOAL}",
  )
  print(
    f"fake quant forward+backward, ({n}, {n}) float32, {meta['backend']} "
    f"({meta['device']}), median of {args.repeats}; two-array copy {gbps:.1f} GB/s (one array: "
    f"{one_gbps:.1f}); "
    f"load average {meta['load_average']}"
  )
  header = (
    f"{'kernel':<28} {'B/elem':>6} {'median ms':>10} {'bound ms':>9} {'x bound':>8} "
    f"{'min ms':>8} {'x bound':>8} {'x 1-copy':>8} {'fusions':>8}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    flag = {None: "", True: "  (goal met)", False: f"  (over {GOAL}x)"}[r["goal_met"]]
    print(
      f"{r['name']:<28} {r['bytes_per_element']:>6} {r['median_ms']:>10.3f} "
      f"{r['bound_ms']:>9.3f} {r['ratio_to_bound']:>8.2f} {r['min_ms']:>8.3f} "
      f"{r['min_ratio_to_bound']:>8.2f} {r['ratio_to_one_array_copy_bound']:>8.2f} "
      f"{r['kernels']:>8}{flag}"
    )

  md = [
    f"({n}, {n}) float32, forward + backward (`jax.vjp`, cotangent applied), "
    f"{meta['backend']} ({meta['cpu']}), median of {args.repeats} interleaved runs (load "
    f"average {meta['load_average']}). Bound = the bytes per element a fused forward + "
    "backward must move (x, y, a 1-byte in-range mask or x again for LSQ, dy, dx) at the "
    "bandwidth of a jitted copy of two arrays in the same run (read x and dy, write both: "
    f"{gbps:.1f} GB/s; a copy of x alone, which runs partly from the last-level cache: "
    f"{one_gbps:.1f} GB/s, whose bound the column x 1-copy uses). x bound: the median over the "
    "rounds of a kernel's time over the same round's bound (paired: this machine's speed drifts "
    f"in phases that slow a whole round alike); goal: within {GOAL}x.",
    "",
    "| kernel | bytes / element | median ms | bound ms | x bound | min ms | x bound (min) | "
    "x 1-copy | goal |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  md += [
    f"| {r['name']} | {r['bytes_per_element']} | {r['median_ms']:.3f} | {r['bound_ms']:.3f} | "
    f"{r['ratio_to_bound']:.2f} | {r['min_ms']:.3f} | {r['min_ratio_to_bound']:.2f} | "
    f"{r['ratio_to_one_array_copy_bound']:.2f} | {GOAL_LABEL[r['goal_met']]} |"
    for r in rows
  ]
  write_results(args.out, "fake_quant", dict(meta=meta, results=rows), "\n".join(md))


if __name__ == "__main__":
  main()
