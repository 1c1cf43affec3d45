"""QAT of a byte-level decoder-only transformer, written with Flax's own modules, on the Python
standard library's source text: float -> PTQ / QAT (+ distillation) -> integers -> generation.

The model is ``nn.Embed`` (tokens and positions) + blocks of ``nn.LayerNorm`` ->
``nn.MultiHeadDotProductAttention`` (causal mask) and ``nn.LayerNorm`` -> ``nn.Dense`` MLP, then
an ``nn.Dense`` head; :func:`qatjax.quantize_model` quantizes it unmodified, every matmul (the
attention projections, ``q.k`` and ``p.v``, the MLP, the head) and the embeddings
(:func:`qatjax.coverage` checks it). For each recipe this script

1. pretrains the float model, then fine-tunes it for N steps (the fair float reference);
2. PTQ: quantizes the fine-tuned float model (no gradient step);
3. QAT: N steps from the pretrained float with the same optimizer, with and without
   distillation from the float model's probabilities (:class:`qatjax.training.Teacher`);
4. converts the better QAT model to integers, evaluates it and generates a few lines greedily
   with the integer and the fake-quant model (they must agree);
5. prints one table and writes ``lm_qat.json`` / ``lm_qat.md`` to ``--out-dir``.

``gap_recovered = (ppl_ptq - best QAT ppl) / (ppl_ptq - ppl_float_ft)``.

Usage::

    python examples/lm_qat.py                                   # defaults: ~10 min on 2 cores
    python examples/lm_qat.py --out-dir benchmarks/results      # the README table
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qatjax
from qatjax import QuantConfig
from qatjax.training import (
  Teacher,
  create_train_state,
  fit,
  make_optimizer,
  make_train_step,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from text_data import VOCAB, load_text, windows


class Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.d)(h, mask=mask)
    h = nn.Dense(4 * self.d)(nn.LayerNorm()(x))
    return x + nn.Dense(self.d)(nn.gelu(h))


class ByteLM(nn.Module):
  """A decoder-only transformer over bytes (GPT-style, pre-LayerNorm, learned positions)."""

  d: int = 128
  heads: int = 4
  layers: int = 2
  max_len: int = 64

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, self.d)(ids) + nn.Embed(self.max_len, self.d)(jnp.arange(ids.shape[1]))
    mask = nn.make_causal_mask(ids)
    for _ in range(self.layers):
      x = Block(self.d, self.heads)(x, mask)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


EMBED = QuantConfig(8, None)  # int8 tables, one scale per row


def recipes(group: int) -> dict[str, QuantConfig]:
  dyn = dict(act_calibration="dynamic", act_granularity="per_token")
  # int4 groups with float16 scales: GGML's Q4_0 layout, 4.5 bits per weight
  grp = dict(weight_granularity="per_group", weight_group_size=group, weight_scale_dtype="float16")
  return {
    "W8A8-dynamic": QuantConfig(8, 8, **dyn),
    f"W4A8-dynamic g{group}": QuantConfig(4, 8, **dyn, **grp),
    f"W4 weight-only g{group}": QuantConfig(4, None, **grp),
  }


def rules_for(cfg: QuantConfig):
  return {r"Embed_\d+": EMBED, ".*": cfg}


@functools.partial(jax.jit, static_argnums=0)  # one program per model (PTQ, QAT, QAT+KD share)
def _loss_sum(model, v, x, y):
  logits = model.apply(v, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()


def perplexity(model, variables, data, batch_size) -> float:
  """``exp`` of the mean next-byte cross-entropy over every window of ``data``."""
  x, y = data
  n = len(x) - len(x) % batch_size
  total = sum(
    float(_loss_sum(model, variables, x[i : i + batch_size], y[i : i + batch_size]))
    for i in range(0, n, batch_size)
  )
  return float(np.exp(total / (n * x.shape[1])))


def train(model, variables, data, *, steps, batch_size, lr, teacher=None, seed, progress):
  """``steps`` Adam steps (cosine decay) over ``data``; returns the trained variables."""
  tx = make_optimizer(
    optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.01),
    optax.adam(optax.cosine_decay_schedule(lr * 0.1, steps)),  # learned quantizer steps
  )
  state = create_train_state(model, tx, seed, data[0][:1], variables=variables)
  step = make_train_step(teacher=teacher)
  n = steps * batch_size
  x, y = data[0][:n], data[1][:n]
  epochs = -(-n // len(x))
  state, _ = fit(
    state,
    (np.tile(x, (epochs, 1))[:n], np.tile(y, (epochs, 1))[:n]),
    epochs=1,
    batch_size=batch_size,
    train_step=step,
    rng=seed,
    progress=progress,
  )
  return state.variables


def generate(model, variables, prompt, new_tokens):
  """Greedy decoding, ``(batch, len(prompt) + new_tokens)`` bytes, and tokens/s."""
  b, p = prompt.shape
  total = p + new_tokens

  @jax.jit
  def run(v, buf):
    def body(i, buf):
      logits = model.apply(v, buf)
      nxt = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(buf.dtype)
      return buf.at[:, p + i].set(nxt)

    return jax.lax.fori_loop(0, new_tokens, body, buf)

  buf = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt)
  run(variables, buf).block_until_ready()  # compile
  t0 = time.perf_counter()
  out = run(variables, buf).block_until_ready()
  return np.asarray(out), b * new_tokens / (time.perf_counter() - t0)


def _text(row) -> str:
  return bytes(int(c) for c in row).decode("utf-8", errors="replace")


def run(args) -> dict:
  train_bytes, test_bytes = load_text(args.text_bytes)
  t = args.seq_len
  pre = windows(train_bytes, t, args.pretrain_steps * args.batch_size)
  ft = windows(train_bytes, t, args.steps * args.batch_size, offset=len(pre[0]))
  test = windows(test_bytes, t, args.eval_windows)
  model = ByteLM(args.d, args.heads, args.layers, t)
  kw = dict(batch_size=args.batch_size, seed=args.seed, progress=args.progress)
  t0 = time.perf_counter()
  init = jax.jit(model.init)(jax.random.key(args.seed), pre[0][:1])
  pretrained = train(model, init, pre, steps=args.pretrain_steps, lr=args.lr, **kw)
  float_ft = train(model, pretrained, ft, steps=args.steps, lr=args.ft_lr, **kw)
  float_s = time.perf_counter() - t0
  ppl_ft = perplexity(model, float_ft, test, args.batch_size)
  bytes_float = qatjax.model_size(float_ft).total
  prompt = test[0][:: max(1, len(test[0]) // 8)][:8, : t // 2]
  gen_float = {b: generate(model, float_ft, prompt[:b], t - t // 2)[1] for b in (1, 8)}
  teacher = Teacher(model, pretrained, temperature=args.temperature, alpha=args.alpha)
  rows = []
  chosen = recipes(args.group)
  if args.recipes:
    chosen = {k: v for k, v in chosen.items() if k.split()[0] in args.recipes.split(",")}
  for name, cfg in chosen.items():
    qm = qatjax.quantize_model(model, rules_for(cfg))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # coverage is checked below
      ptq = qatjax.from_float(qm, float_ft, pre[0][:1])
      start = qatjax.from_float(qm, pretrained, pre[0][:1])
    report = qatjax.coverage(qm, pre[0][:1], variables=start)
    t1 = time.perf_counter()
    qat = train(qm, start, ft, steps=args.steps, lr=args.ft_lr, **kw)
    qat_kd = train(qm, start, ft, steps=args.steps, lr=args.ft_lr, teacher=teacher, **kw)
    qat_s = (time.perf_counter() - t1) / 2
    ppl = {
      k: perplexity(qm, v, test, args.batch_size)
      for k, v in (("ptq", ptq), ("qat", qat), ("qat_kd", qat_kd))
    }
    best = "qat_kd" if ppl["qat_kd"] <= ppl["qat"] else "qat"
    qvars = qatjax.convert(qm, {"qat": qat, "qat_kd": qat_kd}[best], pre[0][:1])
    ppl_int = perplexity(qm, qvars, test, args.batch_size)
    out_fq, _ = generate(qm, {"qat": qat, "qat_kd": qat_kd}[best], prompt, t - t // 2)
    out_int, tps8 = generate(qm, qvars, prompt, t - t // 2)
    _, tps1 = generate(qm, qvars, prompt[:1], t - t // 2)
    gap = ppl["ptq"] - ppl_ft
    rows.append(
      {
        "recipe": name,
        "ppl_float_ft": ppl_ft,
        "ppl_ptq": ppl["ptq"],
        "ppl_qat": ppl["qat"],
        "ppl_qat_kd": ppl["qat_kd"],
        "best": best,
        "ppl_int": ppl_int,
        "int_vs_qat_pct": 100.0 * (ppl_int / ppl[best] - 1.0),
        "gap_recovered": (ppl["ptq"] - ppl[best]) / gap if gap > 0 else None,
        "ptq_gap_pct": 100.0 * gap / ppl_ft,
        "bytes": qatjax.model_size(qvars).total,
        "bytes_float": bytes_float,
        "coverage": report.fraction,
        "generation_identical": bool((out_fq == out_int).all()),
        "tokens_per_s_int_b1": tps1,
        "tokens_per_s_int_b8": tps8,
        "tokens_per_s_float_b1": gen_float[1],
        "tokens_per_s_float_b8": gen_float[8],
        "qat_train_s": qat_s,
        "sample_int": [_text(r) for r in out_int[:3]],
      }
    )
    print(
      f"{name}: ppl float-ft {ppl_ft:.3f} ptq {ppl['ptq']:.3f} qat {ppl['qat']:.3f} "
      f"qat+kd {ppl['qat_kd']:.3f} int {ppl_int:.3f}",
      flush=True,
    )
  return {
    "rows": rows,
    "config": {k: v for k, v in vars(args).items() if k not in ("out_dir", "progress")},
    "text_bytes": [len(train_bytes), len(test_bytes)],
    "float_train_s": float_s,
    "machine": f"{platform.machine()} {jax.default_backend()} ({os.cpu_count()} CPUs), "
    f"jax {jax.__version__}",
  }


def render_markdown(res: dict) -> str:
  c = res["config"]
  head = (
    "| recipe | coverage | ppl float ft | ppl PTQ | ppl QAT | ppl QAT+KD | ppl int | int vs QAT "
    "| gap recovered (QAT without KD) | bytes (x float) | int tok/s b1 / b8 (float) "
    "| gen = fake quant |"
  )
  lines = [head, "|" + "---|" * 12]
  for r in res["rows"]:
    gap = "n/a (no PTQ gap)" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.0f}%"
    ptq_gap = r["ppl_ptq"] - r["ppl_float_ft"]
    plain = (r["ppl_ptq"] - r["ppl_qat"]) / ptq_gap if ptq_gap > 0 else None
    plain = "n/a" if plain is None else f"{100 * plain:.0f}%"
    lines.append(
      f"| {r['recipe']} | {r['coverage']:.0%} | {r['ppl_float_ft']:.3f} | {r['ppl_ptq']:.3f} | "
      f"{r['ppl_qat']:.3f} | {r['ppl_qat_kd']:.3f} | {r['ppl_int']:.3f} | "
      f"{r['int_vs_qat_pct']:+.2f}% | {gap} ({plain}; PTQ gap {r['ptq_gap_pct']:.1f}%) | "
      f"{r['bytes']:,} ({r['bytes'] / r['bytes_float']:.3f}x) | "
      f"{r['tokens_per_s_int_b1']:.0f} / {r['tokens_per_s_int_b8']:.0f} "
      f"({r['tokens_per_s_float_b1']:.0f} / {r['tokens_per_s_float_b8']:.0f}) | "
      f"{'yes' if r['generation_identical'] else 'NO'} |"
    )
  return (
    f"Byte-level transformer (d={c['d']}, {c['layers']} blocks, {c['heads']} heads, context "
    f"{c['seq_len']}) on the Python standard library's source ({res['text_bytes'][0]:,} / "
    f"{res['text_bytes'][1]:,} bytes train / test); float pretrained {c['pretrain_steps']} steps, "
    f"then float fine-tuned, QAT and QAT + distillation (T={c['temperature']}, alpha="
    f"{c['alpha']}) {c['steps']} steps each, batch {c['batch_size']}; embeddings int8 in every "
    f"recipe. Coverage: the quantized share of the matmuls and lookups (qatjax.coverage; weight-"
    f"only leaves attention's two activation x activation products float). Gap recovered: (PTQ "
    f"ppl - best QAT ppl) / (PTQ ppl - float fine-tuned ppl). {res['machine']}.\n\n"
    + "\n".join(lines)
  )


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d", type=int, default=128, help="model width (bench_peers' LM is the same)")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--pretrain-steps", type=int, default=2000)
  p.add_argument("--steps", type=int, default=300, help="fine-tuning / QAT steps (N)")
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--ft-lr", type=float, default=5e-4)
  p.add_argument("--group", type=int, default=32, help="int4 group size")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--alpha", type=float, default=0.5, help="distillation weight (1 - on labels)")
  p.add_argument("--text-bytes", type=int, default=3_000_000)
  p.add_argument("--eval-windows", type=int, default=512)
  p.add_argument("--recipes", default="", help="comma-separated subset, e.g. W4A8-dynamic")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default=".")
  p.add_argument("--no-progress", dest="progress", action="store_false")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  res = run(args)
  md = render_markdown(res)
  print(md)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "lm_qat.json"), "w") as f:
    json.dump(res, f, indent=2)
  with open(os.path.join(args.out_dir, "lm_qat.md"), "w") as f:
    f.write(md + "\n")
  return res


if __name__ == "__main__":
  main()
