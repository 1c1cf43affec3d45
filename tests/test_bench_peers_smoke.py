"""Smoke test: benchmarks/bench_peers.py --quick runs end to end on digits (needs qwix and aqtp)."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("qwix")
pytest.importorskip("aqt.jax.v2.flax.aqt_flax")
pytest.importorskip("sklearn")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_peers_quick(tmp_path):
  out = tmp_path / "peers.json"
  # Compile cheaply: the smoke run is all compilation (a few steps per variant).
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",
  }
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--quick", "--out", str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["config"]["quick"] is True
  assert res["machine"]["cpu_count"] and res["machine"]["versions"]["jax"]
  if platform.libc_ver()[0] == "glibc":  # thresholds fixed before timing (benchmarks/_malloc.py)
    assert res["machine"]["allocator"].startswith("glibc malloc: M_MMAP_THRESHOLD=1024 MiB")

  timing = {t["arch"]: {r["name"]: r for r in t["rows"]} for t in res["timing"]}
  assert set(timing) == {"mlp", "cnn"}
  for arch, rows in timing.items():
    assert rows["float"]["ratio_vs_float"] == 1.0
    for name in ("qatjax W8A8 observer", "qwix W8A8"):
      assert rows[name]["median_ms"] > 0, (arch, name)
      # really quantized: the logits differ from float's on the same weights
      assert rows[name]["max_abs_logit_diff_vs_float"] > 0, (arch, name)
  assert timing["mlp"]["AQT W8A8"]["median_ms"] > 0
  assert timing["cnn"]["AQT W8A8 (conv QAT)"]["error"].startswith("not supported")
  assert all(t["float_unchanged_after_peers"] for t in res["timing"])

  acc = res["accuracy"]
  assert acc["dataset"] == "digits" and acc["n_test"] == 128  # the quick slice
  rows = {(r["lib"], r["method"], r["bits"]): r for r in acc["rows"]}
  # every row has a number or a recorded reason
  assert all(("accuracy" in r) != ("error" in r) for r in acc["rows"])
  for r in acc["rows"]:  # accuracies are counts of the 128 test images
    for key in ("accuracy", "accuracy_before_qat"):
      if key in r:
        assert float(r[key] * 128).is_integer() and 0 <= r[key] <= 1, r
  # Better than chance (10 classes) after the quick run's few steps: the float model and the
  # 2-bit LSQ model fine-tuned from it really learned and were really evaluated.
  assert rows[("flax", "float", None)]["accuracy"] > 0.1
  assert rows[("qatjax", "lsq", 2)]["accuracy"] > 0.1
  assert "accuracy" in rows[("qwix", "QtProvider, static act", 8)]

  lm = {r["name"]: r for r in res["lm"]["rows"]}
  assert lm["float"]["vs_float"] == 1.0
  assert np.isfinite(lm["qatjax W4A8 g32 (dynamic)"]["ppl"])
  assert "ppl" in lm["qwix W4A8 tile 32 (dynamic)"] or "error" in lm["qwix W4A8 tile 32 (dynamic)"]

  md = out.with_suffix(".md").read_text()
  assert "| library | method |" in md and "quick smoke mode" in md
