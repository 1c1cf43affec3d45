"""examples/lm_qat.py end to end on a tiny configuration: every matmul quantized, the integer
model's perplexity equal to the QAT model's, greedy generation identical, results written."""

import importlib
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_lm_pipeline(tmp_path):
  lm_qat = importlib.import_module("lm_qat")  # examples/ is on sys.path (conftest.py)
  args = [
    "--d",
    "16",
    "--heads",
    "2",
    "--layers",
    "1",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--pretrain-steps",
    "12",
    "--steps",
    "4",
    "--text-bytes",
    "20000",
    "--eval-windows",
    "8",
    "--group",
    "8",
    "--recipes",
    "W4A8-dynamic",
    "--no-progress",
    "--out-dir",
    str(tmp_path),
  ]
  res = lm_qat.main(args)
  (row,) = res["rows"]
  assert row["recipe"] == "W4A8-dynamic g8"
  assert row["coverage"] == 1.0
  assert row["generation_identical"]
  assert abs(row["int_vs_qat_pct"]) < 0.05  # dynamic scales: the same integers, float rounding
  assert 1.0 < row["ppl_float_ft"] < 256.0  # a byte-level model, better than uniform
  assert row["bytes"] < 0.6 * row["bytes_float"]
  saved = json.loads((tmp_path / "lm_qat.json").read_text())
  assert saved["rows"][0]["ppl_int"] == row["ppl_int"]
  assert "| W4A8-dynamic g8 |" in (tmp_path / "lm_qat.md").read_text()
