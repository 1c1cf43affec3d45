"""benchmarks/compare_mnist_apis.py: differences in points, the goal verdict, refused mismatches."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_mnist_apis

META = dict(dataset="mnist", train_images=100, test_images=50, epochs_float=1, epochs_qat=1, seed=0)


def _run(api, qat, integer):
  rows = [
    {"precision": "float32", "float": 0.9},
    {"precision": "W8A8", "float": 0.9, "ptq": 0.8, "qat": qat, "int": integer},
  ]
  return {**META, "api": api, "rows": rows}


def _write(tmp_path, linen, nnx):
  (tmp_path / "mnist_qat.json").write_text(json.dumps(linen))
  (tmp_path / "mnist_qat_nnx.json").write_text(json.dumps(nnx))


def test_differences_in_points_and_the_verdict(tmp_path):
  _write(tmp_path, _run("linen", 0.9000, 0.9000), _run("nnx", 0.9010, 0.8975))
  res = compare_mnist_apis.main(["--results", str(tmp_path)])
  (row,) = [r for r in res["rows"] if r["precision"] == "W8A8"]
  assert row["qat_diff_points"] == pytest.approx(0.10)
  assert row["int_diff_points"] == pytest.approx(-0.25)
  assert res["max_abs_diff_points"] == pytest.approx(0.25)
  md = (tmp_path / "mnist_api_parity.md").read_text()
  assert "0.25 points (goal <= 0.2 points: missed)" in md
  assert "| W8A8 | 90.00 | 90.10 | 90.00 | 89.75 | 80.00 | 80.00 |" in md


def test_runs_with_other_arguments_are_refused(tmp_path):
  nnx = {**_run("nnx", 0.9, 0.9), "seed": 1}
  _write(tmp_path, _run("linen", 0.9, 0.9), nnx)
  with pytest.raises(SystemExit, match=r"differ in \['seed'\]"):
    compare_mnist_apis.main(["--results", str(tmp_path)])
