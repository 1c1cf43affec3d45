"""Runs every benchmark in sequence, then regenerates the README's results section.

Usage: python benchmarks/run_all.py [--data-dir DIR]   (MNIST IDX files; default: digits)
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--data-dir", default=None, help="folder with the four MNIST IDX .gz files")
  args = p.parse_args()
  data = ["--data-dir", args.data_dir] if args.data_dir else []
  runs = [
    [HERE / "bench_fake_quant.py"],
    [HERE / "bench_layers.py"],
    [HERE / "bench_inference.py"],
    [ROOT / "examples" / "mnist_qat.py", *data, "--no-progress", "--out-dir", HERE / "results"],
    [HERE / "bench_peers.py", *data],
    [HERE / "update_readme.py"],
  ]
  failed = []
  for cmd in runs:
    print(f"\n=== {' '.join(str(c) for c in cmd)}", flush=True)
    if subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT).returncode:
      failed.append(str(cmd[0].name))
  if failed:
    raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
  main()
