"""The byte-level transformer of ``examples/lm_qat.py`` under qatjax and qwix, side by side.

Both start from the same pretrained float model and train the same number of QAT steps on the
same batches (same Adam, same learning rate): qatjax with ``quantize_model`` and W4A8 (int4
weights in groups of 32, int8 per-token dynamic activations, attention's ``q.k`` / ``p.v``
quantized, int8 embeddings), qwix with ``QtProvider`` and the nearest rule it has (int4 weights
with ``tile_size=32``, int8 dynamic activations; qwix leaves embedding lookups float). Reported:
test perplexity after QAT (each library's fake-quant model) and the median train-step time,
interleaved round-robin, against the float step.
"""

from __future__ import annotations

import statistics
import time
import warnings

import jax
import optax

import qatjax


def _lm_modules():
  import lm_qat  # examples/, on sys.path
  import text_data

  return lm_qat, text_data


def _step_fn(model, tx, mutable):
  def loss(params, rest, x, y):
    v = {"params": params, **rest}
    if mutable:
      logits, upd = model.apply(v, x, mutable=list(mutable))
    else:
      logits, upd = model.apply(v, x), {}
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

  @jax.jit
  def step(params, rest, opt, x, y):
    (value, upd), g = jax.value_and_grad(loss, has_aux=True)(params, rest, x, y)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), {**rest, **upd}, opt, value

  return step


def _variants(lm, cfg_group):
  model = lm.ByteLM(**cfg_group)
  out = {"float": (model, lambda fv, x: fv)}
  dyn = dict(act_calibration="dynamic", act_granularity="per_token")
  cfg = qatjax.QuantConfig(4, 8, weight_granularity="per_group", weight_group_size=32, **dyn)
  qm = qatjax.quantize_model(model, {r"Embed_\d+": qatjax.QuantConfig(8, None), ".*": cfg})

  def qatjax_init(fv, x):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return qatjax.from_float(qm, fv, x)

  out["qatjax W4A8 g32 (dynamic)"] = (qm, qatjax_init)
  try:
    import qwix

    rule = qwix.QtRule(
      module_path=".*", weight_qtype="int4", act_qtype="int8", act_static_scale=False, tile_size=32
    )
    qwm = qwix.quantize_model(model, qwix.QtProvider([rule]))
    out["qwix W4A8 tile 32 (dynamic)"] = (qwm, lambda fv, x: fv)
  except Exception as e:
    out["qwix W4A8 tile 32 (dynamic)"] = e
  return out


def bench_lm(
  *, steps=200, pretrain_steps=800, batch=16, rounds=8, timed=5, quick=False, seed=0
) -> dict:
  lm, td = _lm_modules()
  if quick:
    steps, pretrain_steps, rounds, timed = 3, 5, 2, 2
  # Head size 32: qwix tiles every contraction by 32, the attention products' too.
  shape = dict(
    d=64 if quick else 128,
    heads=2 if quick else 4,
    layers=1 if quick else 2,
    max_len=16 if quick else 64,
  )
  t = shape["max_len"]
  train_bytes, test_bytes = td.load_text(200_000 if quick else 3_000_000)
  pre = td.windows(train_bytes, t, pretrain_steps * batch)
  qat_data = td.windows(train_bytes, t, steps * batch, offset=len(pre[0]))
  test = td.windows(test_bytes, t, 16 if quick else 256)
  variants = _variants(lm, shape)
  float_model = variants["float"][0]
  fv = jax.jit(float_model.init)(jax.random.key(seed), pre[0][:1])
  fv = lm.train(
    float_model, fv, pre, steps=pretrain_steps, batch_size=batch, lr=2e-3, seed=seed, progress=False
  )
  tx = optax.adam(3e-4)
  rows, live = [], []
  for name, entry in variants.items():
    if isinstance(entry, Exception):
      rows.append({"name": name, "error": f"{type(entry).__name__}: {entry}"[:300]})
      continue
    model, init = entry
    try:
      v = init(fv, pre[0][:1])
      params, rest = v["params"], {k: t_ for k, t_ in v.items() if k != "params"}
      mutable = tuple(k for k in rest if k != "params")
      step = _step_fn(model, tx, mutable)
      opt = tx.init(params)
      for i in range(steps):  # the same batches for every library
        sl = slice(i * batch, (i + 1) * batch)
        params, rest, opt, _ = step(params, rest, opt, qat_data[0][sl], qat_data[1][sl])
      ppl = lm.perplexity(model, {"params": params, **rest}, test, batch)
      rows.append({"name": name, "ppl": ppl})
      live.append((rows[-1], step, [params, rest, opt], []))
    except Exception as e:
      rows.append({"name": name, "error": f"{type(e).__name__}: {e}"[:300]})
  x, y = qat_data[0][:batch], qat_data[1][:batch]
  for _ in range(rounds):
    for _row, step, carry, times in live:
      for _ in range(timed):
        t0 = time.perf_counter()
        out = step(*carry, x, y)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        carry[:3] = out[:3]
  base = statistics.median(live[0][3]) if live else None
  for row, _, _, times in live:
    row["ms"] = 1e3 * statistics.median(times)
    row["vs_float"] = statistics.median(times) / base
  return {
    "rows": rows,
    "steps": steps,
    "pretrain_steps": pretrain_steps,
    "batch": batch,
    "shape": shape,
    "rounds": rounds,
    "timed": timed,
  }


def render_lm(res: dict) -> list[str]:
  s = res["shape"]
  out = [
    f"**Byte-level transformer LM** (d={s['d']}, {s['layers']} blocks, context {s['max_len']}, "
    f"batch {res['batch']}; float pretrained {res['pretrain_steps']} steps, then "
    f"{res['steps']} QAT steps per library on the same batches; median of {res['rounds']} "
    f"interleaved rounds x {res['timed']} steps):",
    "",
    "| variant | test ppl | ms / step | vs float |",
    "|---|---|---|---|",
  ]
  for r in res["rows"]:
    if "error" in r:
      out.append(f"| {r['name']} | fails: {r['error'][:120]} | — | — |")
    else:
      out.append(f"| {r['name']} | {r['ppl']:.3f} | {r['ms']:.2f} | {r['vs_float']:.2f}x |")
  return [*out, ""]
