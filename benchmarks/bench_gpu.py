"""The accelerator run of issue 12: QAT train step vs float step in float32 and bfloat16, and
integer inference (int8 through XLA) vs float32, on the device JAX sees (a GPU when one is lent).

One prepared script, so that a session with a GPU spends its device time measuring, not writing:

* **train step**: bench_layers' MLP 784-512-512-10 and CNN c32-c64s2-d10 at batch 256, float vs
  W8A8 observer vs W8A8 LSQ, each with the layers computing in float32 and in bfloat16
  (``dtype=jnp.bfloat16``; parameters float32; the QAT variants multiply in bfloat16 too),
  interleaved rounds; ratio to the float step of the same dtype. Also the
  byte-level LM of ``examples/lm_qat.py`` (d=128, 2 blocks, batch 16 x 64), float vs W4A8 dynamic
  (int4 groups of 32, int8 per-token activations, int8 embeddings), float32.
* **integer inference**: bench_inference's models (MLP and CNN at batch 256, 4096-wide MLP at
  batch 8), ``convert``-ed int8 and int4 vs float32, with R, XLA's bare int8-vs-float32 GEMM
  speed-up at the models' GEMM shapes on the same device.

Each model is a section of its own: one that fails (an op the device's backend lacks) is recorded
as a row with its error and the run goes on, and the results are rewritten after every section,
so that a run cut short by its time limit keeps what it measured.

It runs only where ``jax.default_backend()`` is not ``"cpu"`` unless ``--allow-cpu`` is given
(the smoke test, and a dry run before a device session); ``--quick`` is a smoke run (2 rounds: the
MLP's bfloat16 train steps and its integer inference).

On a lent device machine (its image has jax with CUDA, flax, optax and chex; the script imports
the checkout's qatjax, nothing to install), one command: ``PYTHONUNBUFFERED=1 python3
benchmarks/bench_gpu.py --out "$OUT"``; then commit its ``device_gpu.*`` files under
``benchmarks/results`` and regenerate the README (``benchmarks/update_readme.py``).

Usage: python benchmarks/bench_gpu.py [--rounds N] [--quick] [--allow-cpu] [--out DIR]
Writes DIR/device_<backend>.json and .md (device_gpu on a GPU) (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the checkout's qatjax
sys.path.insert(0, str(ROOT / "examples"))  # lm_qat, text_data

import _peer_lm  # noqa: E402  (bench_peers' LM variants and jitted Adam step)
import bench_inference as bi  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _results import write_results  # noqa: E402
from bench_layers import CNN, MLP  # noqa: E402

from qatjax import QuantConfig  # noqa: E402

TRAIN_VARIANTS = {
  "float": None,
  "W8A8 observer": QuantConfig(8, 8),
  "W8A8 LSQ": QuantConfig(8, 8, method="lsq"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


TRAIN_MODELS = {"MLP 784-512-512-10": (MLP, (784,)), "CNN c32-c64s2-d10": (CNN, (28, 28, 1))}


def _case(model, variables, x, y):
  """``[step, carry, (x, y), times]`` for one jitted Adam step of ``model``."""
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(1e-3)
  return [_peer_lm._step_fn(model, tx, tuple(rest)), [params, rest, tx.init(params)], (x, y), []]


def _time_interleaved(cases: dict, rounds: int, steps: int, warmup: int) -> dict:
  """Median seconds per step of each case, rounds interleaved (each round runs every case)."""
  for step, carry, data, _ in cases.values():
    for _ in range(warmup):  # compile, calibrate the observers
      *carry[:3], loss = step(*carry, *data)
    jax.block_until_ready(loss)
  for _ in range(rounds):
    for step, carry, data, times in cases.values():
      t0 = time.perf_counter()
      for _ in range(steps):
        *carry[:3], loss = step(*carry, *data)
      jax.block_until_ready(loss)
      times.append((time.perf_counter() - t0) / steps)
  return {name: statistics.median(c[3]) for name, c in cases.items()}


def train_rows(rounds: int, steps: int, warmup: int, batch: int, models, dtypes) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  for model_name in models:
    cls, in_shape = TRAIN_MODELS[model_name]
    x = jnp.asarray(rng.normal(size=(batch, *in_shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    cases = {}
    for dname in dtypes:
      for variant, config in TRAIN_VARIANTS.items():
        model = cls(config, config, DTYPES[dname])
        variables = jax.jit(model.init)(jax.random.key(0), x)
        cases[(dname, variant)] = _case(model, variables, x, y)
    med = _time_interleaved(cases, rounds, steps, warmup)
    for (dname, variant), t in med.items():
      base = med[(dname, "float")]
      rows.append(
        dict(model=model_name, dtype=dname, variant=variant, ms=1e3 * t, vs_float=t / base)
      )
  return rows


def lm_rows(rounds: int, steps: int, warmup: int) -> list[dict]:
  """The LM of bench_peers (``_peer_lm``): float vs qatjax W4A8 g32 dynamic, same shape."""
  import lm_qat

  shape, t = dict(d=128, heads=4, layers=2, max_len=64), 64
  variants = _peer_lm._variants(lm_qat, shape)
  ids = jax.random.randint(jax.random.key(0), (16, t), 0, 256)
  y = jnp.roll(ids, -1, axis=1)
  float_model = variants["float"][0]
  fv = jax.jit(float_model.init)(jax.random.key(1), ids[:1])
  cases = {}
  for name in ("float", "qatjax W4A8 g32 (dynamic)"):
    model, init = variants[name]
    cases[name] = _case(model, init(fv, ids[:1]), ids, y)
  med = _time_interleaved(cases, rounds, steps, warmup)
  name = f"byte LM d={shape['d']} (batch 16 x {t})"
  return [
    dict(model=name, dtype="float32", variant=v, ms=1e3 * s, vs_float=s / med["float"])
    for v, s in med.items()
  ]


def inference_rows(rounds: int, models) -> list[dict]:
  rows = []
  for name in models:
    x, variants = bi.build(name)
    fns = bi.compiled({k: v for k, v in variants.items() if "before" not in k}, x)
    t = bi.time_variants(x, fns, rounds)
    r, _ = bi.gemm_ratio(bi.GEMM_SHAPES[name], rounds)
    rows.append(
      dict(
        model=name,
        batch=int(x.shape[0]),
        ms={k: 1e3 * v for k, v in t.items()},
        speedup_vs_float32={k: t["float32"] / v for k, v in t.items() if k != "float32"},
        gemm_R=r,
      )
    )
  return rows


def render(res: dict) -> str:
  meta, train, infer = res["meta"], res["train"], res["inference"]
  fails = lambda r: f"| {r['model']} | fails: {r['error'][:160]} |"
  out = [
    f"Device: {meta['device']} ({meta['backend']}), jax {meta['jax']}; median of "
    f"{meta['rounds']} interleaved rounds of {meta['steps']} steps.",
    "",
    "| model | compute dtype | variant | ms / step | x float (same dtype) |",
    "|---|---|---|---|---|",
  ]
  out += [
    fails(r)
    if "error" in r
    else f"| {r['model']} | {r['dtype']} | {r['variant']} | {r['ms']:.3f} | {r['vs_float']:.2f}x |"
    for r in train
  ]
  out += [
    "",
    "| model | batch | float32 ms | int8 ms | int4 ms | int8 speed-up | int4 speed-up | "
    "bare GEMM int8 speed-up R |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in infer:
    if "error" in r:
      out.append(fails(r))
      continue
    ms, sp = r["ms"], r["speedup_vs_float32"]
    out.append(
      f"| {r['model']} | {r['batch']} | {ms['float32']:.3f} | {ms['int8']:.3f} | "
      f"{ms['int4']:.3f} | {sp['int8']:.2f}x | {sp['int4']:.2f}x | {r['gemm_R']:.2f}x |"
    )
  return "\n".join(out) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--steps", type=int, default=5, help="consecutive steps per timed sample")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="a smoke run (2 rounds, the MLP only)")
  p.add_argument("--allow-cpu", action="store_true", help="run on CPU too (smoke test)")
  p.add_argument("--out", default=str(HERE / "results"))
  args = p.parse_args(argv)
  backend = jax.default_backend()
  if backend == "cpu" and not args.allow_cpu:
    raise SystemExit("bench_gpu: JAX sees no accelerator (backend cpu); pass --allow-cpu to run")
  rounds, steps = (2, 1) if args.quick else (args.rounds, args.steps)
  batch = 32 if args.quick else 256
  device = jax.devices()[0]
  meta = dict(
    backend=backend,
    device=getattr(device, "device_kind", str(device)),
    jax=jax.__version__,
    rounds=rounds,
    steps=steps,
    batch=batch,
    quick=args.quick,
    cpus=os.cpu_count(),
    date=time.strftime("%Y-%m-%d %H:%M"),
  )
  dtypes = ["bfloat16"] if args.quick else list(DTYPES)
  jobs = [  # (section, name, rows): one section per model, so that one failure costs one row
    ("train", m, functools.partial(train_rows, rounds, steps, args.warmup, batch, [m], dtypes))
    for m in (list(TRAIN_MODELS)[:1] if args.quick else TRAIN_MODELS)
  ]
  if not args.quick:
    jobs.append(("train", "byte LM", functools.partial(lm_rows, rounds, steps, args.warmup)))
  jobs += [
    ("inference", m, functools.partial(inference_rows, rounds, [m]))
    for m in (["mnist_mlp"] if args.quick else bi.MODELS)
  ]
  res = {"meta": meta, "train": [], "inference": []}
  run_jobs(jobs, res, lambda: write_results(args.out, f"device_{backend}", res, render(res)))
  print(render(res))
  return res


def run_jobs(jobs, res: dict, save) -> None:
  """Runs ``(section, name, rows)`` jobs in order, appending each one's rows to ``res[section]``
  (or a row with its error: a device run must not lose the other models to one that fails) and
  calling ``save()`` after each, so that a run cut short by its time limit keeps what it did."""
  for section, name, rows in jobs:
    print(f"{section}: {name} ...", flush=True)
    try:
      res[section] += rows()
    except Exception as e:  # recorded in the results; the run goes on
      res[section].append(dict(model=name, error=f"{type(e).__name__}: {e}"[:300]))
    save()


if __name__ == "__main__":
  main()
