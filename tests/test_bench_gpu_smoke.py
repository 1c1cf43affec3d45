"""Smoke test: benchmarks/bench_gpu.py (issue 12's device script) runs on CPU when told to."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def test_refuses_a_cpu_only_machine_unless_told():
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--quick"],
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert "no accelerator (backend cpu); pass --allow-cpu" in proc.stderr


@pytest.mark.slow
def test_quick_run_on_cpu_writes_both_tables(tmp_path):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",  # compile cheaply: the smoke run is mostly compilation
    "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
  }
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
