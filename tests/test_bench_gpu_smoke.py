"""Smoke test: benchmarks/bench_gpu.py (issue 12's device script) runs on CPU when told to."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture
def bench_gpu(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
  return importlib.import_module("bench_gpu")


def test_refuses_a_cpu_only_machine_unless_told(bench_gpu):
  with pytest.raises(SystemExit, match=r"no accelerator \(backend cpu\); pass --allow-cpu"):
    bench_gpu.main(["--quick"])


def test_a_failing_model_is_recorded_and_the_run_goes_on(bench_gpu):
  """One device run: a model that fails (e.g. an int8 convolution a GPU backend lacks) costs its
  row only, and the results are saved after every model (a run cut short keeps them)."""

  def fails():
    raise RuntimeError("UNIMPLEMENTED: int8 convolution")

  mlp = dict(
    model="mnist_mlp",
    batch=256,
    ms={"float32": 2.0, "int8": 1.0, "int4": 1.25},
    speedup_vs_float32={"int8": 2.0, "int4": 1.6},
    gemm_R=1.5,
  )
  meta = dict(device="test", backend="cpu", jax="0", rounds=1, steps=1)
  res, saved = {"meta": meta, "train": [], "inference": []}, []
  jobs = [("inference", "cnn", fails), ("inference", "mnist_mlp", lambda: [mlp])]
  bench_gpu.run_jobs(jobs, res, lambda: saved.append(len(res["inference"])))
  assert res["inference"] == [
    {"model": "cnn", "error": "RuntimeError: UNIMPLEMENTED: int8 convolution"},
    mlp,
  ]
  assert saved == [1, 2]
  md = bench_gpu.render(res)
  assert "| cnn | fails: RuntimeError: UNIMPLEMENTED: int8 convolution |" in md
  assert "| mnist_mlp | 256 | 2.000 | 1.000 | 1.250 | 2.00x | 1.60x | 1.50x |" in md


@pytest.mark.slow
def test_quick_run_on_cpu_writes_both_tables(tmp_path):
  # The run is mostly compilation: it inherits conftest.py's cheap-compilation XLA_FLAGS.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, str(SCRIPT), "--quick", "--allow-cpu", "--out", str(tmp_path)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads((tmp_path / "device_cpu.json").read_text())
  assert res["meta"]["backend"] == "cpu" and res["meta"]["quick"] is True
  train = {(r["dtype"], r["variant"]): r for r in res["train"]}
  assert set(train) == {("bfloat16", v) for v in ("float", "W8A8 observer", "W8A8 LSQ")}
  assert train[("bfloat16", "float")]["vs_float"] == 1.0
  assert all(r["ms"] > 0 for r in res["train"])
  (inf,) = res["inference"]
  assert inf["model"] == "mnist_mlp" and inf["gemm_R"] > 0
  assert set(inf["ms"]) == {"float32", "int8", "int4", "int4 const"}
  md = (tmp_path / "device_cpu.md").read_text()
  assert "| MLP 784-512-512-10 | bfloat16 | W8A8 LSQ |" in md and "| mnist_mlp | 256 |" in md
