"""Linen vs NNX on the MNIST pipeline: the two runs of ``examples/mnist_qat.py`` side by side.

Reads ``mnist_qat.json`` (``--api linen``) and ``mnist_qat_nnx.json`` (``--api nnx``, the same
arguments otherwise) from ``--results`` and writes ``mnist_api_parity.json`` / ``.md``: per
precision, the accuracies of both APIs and their difference in points. Goal (issue 11): every
QAT and integer accuracy within 0.2 points.

Usage:
  python examples/mnist_qat.py --data-dir DIR --out-dir benchmarks/results
  python examples/mnist_qat.py --data-dir DIR --api nnx --out-dir /tmp/nnx
  cp /tmp/nnx/mnist_qat.json benchmarks/results/mnist_qat_nnx.json
  python benchmarks/compare_mnist_apis.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import write_results  # noqa: E402

GOAL_POINTS = 0.2
COLUMNS = ("float", "ptq", "qat", "int")


def compare(linen: dict, nnx: dict) -> dict:
  """Rows ``{precision, <col>_linen, <col>_nnx, <col>_diff_points}`` and the largest difference."""
  if linen.get("api", "linen") != "linen" or nnx.get("api") != "nnx":
    raise SystemExit("expected a --api linen and a --api nnx result")
  keys = ("dataset", "train_images", "test_images", "epochs_float", "epochs_qat", "seed")
  differ = [k for k in keys if linen.get(k) != nnx.get(k)]
  if differ:
    raise SystemExit(f"the two runs differ in {differ}: not comparable")
  nnx_rows = {r["precision"]: r for r in nnx["rows"]}
  rows, worst = [], 0.0
  for r in linen["rows"]:
    n = nnx_rows[r["precision"]]
    row = {"precision": r["precision"]}
    for col in COLUMNS:
      if r.get(col) is None or n.get(col) is None:
        continue
      diff = 100 * (n[col] - r[col])
      row.update({f"{col}_linen": r[col], f"{col}_nnx": n[col], f"{col}_diff_points": diff})
      if col in ("qat", "int"):
        worst = max(worst, abs(diff))
    rows.append(row)
  return {"rows": rows, "max_abs_diff_points": worst, "goal_points": GOAL_POINTS}


def markdown(res: dict, linen: dict) -> str:
  lines = [
    f"{linen['dataset']}, {linen['train_images']} train / {linen['test_images']} test images, "
    "`examples/mnist_qat.py` run once with `--api linen` and once with `--api nnx` (same "
    f"seed and arguments). Largest QAT / integer difference: "
    f"{res['max_abs_diff_points']:.2f} points (goal <= {GOAL_POINTS} points: "
    f"{'met' if res['max_abs_diff_points'] <= GOAL_POINTS else 'missed'}).",
    "",
    "| precision | QAT % Linen | QAT % NNX | integer % Linen | integer % NNX | PTQ % Linen | "
    "PTQ % NNX |",
    "|---|---|---|---|---|---|---|",
  ]
  pct = lambda row, key: f"{100 * row[key]:.2f}" if key in row else "-"
  for r in res["rows"]:
    if "qat_linen" not in r:
      continue
    lines.append(
      f"| {r['precision']} | {pct(r, 'qat_linen')} | {pct(r, 'qat_nnx')} | "
      f"{pct(r, 'int_linen')} | {pct(r, 'int_nnx')} | {pct(r, 'ptq_linen')} | "
      f"{pct(r, 'ptq_nnx')} |"
    )
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default=str(HERE / "results"))
  args = p.parse_args(argv)
  folder = pathlib.Path(args.results)
  linen = json.loads((folder / "mnist_qat.json").read_text())
  nnx = json.loads((folder / "mnist_qat_nnx.json").read_text())
  res = compare(linen, nnx)
  md = markdown(res, linen)
  print(md)
  write_results(folder, "mnist_api_parity", res, md)
  return res


if __name__ == "__main__":
  main()
