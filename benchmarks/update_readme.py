"""Regenerates the README's results section from benchmarks/results/*.md.

The README holds the tables between ``<!-- results:start -->`` and ``<!-- results:end -->``;
nothing in them is typed by hand: each benchmark writes its table to ``results/NAME.md`` (next
to ``NAME.json``, see ``_results.py``) and this script pastes those files in. Run after the
benchmarks: ``python benchmarks/update_readme.py``.
"""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _md_section(title, md_file, source, where=""):
  path = RESULTS / md_file
  if not path.exists():
    return f"### {title}\n\nNot measured yet: run `{source}`{where}.\n"
  return (
    f"### {title}\n\nFrom `{source}` (`benchmarks/results/{md_file}`):\n\n"
    + path.read_text().strip()
    + "\n"
  )


def render() -> str:
  parts = [
    _md_section(
      "MNIST QAT (end to end)", "mnist_qat.md", "python examples/mnist_qat.py --data-dir DIR"
    ),
    _md_section(
      "MNIST: Linen and NNX side by side",
      "mnist_api_parity.md",
      "python benchmarks/compare_mnist_apis.py",
    ),
    _md_section(
      "Byte-level LM QAT (transformer)",
      "lm_qat.md",
      "python examples/lm_qat.py --out-dir benchmarks/results",
    ),
    _md_section("Against qwix and AQT", "peers.md", "python benchmarks/bench_peers.py"),
    _md_section(
      "Integer inference vs float32", "inference.md", "python benchmarks/bench_inference.py"
    ),
    _md_section("QAT train-step overhead", "layers.md", "python benchmarks/bench_layers.py"),
    _md_section("Fake-quant kernels", "fake_quant.md", "python benchmarks/bench_fake_quant.py"),
    _md_section(
      "LSQ initialisation (from_float output error)",
      "lsq_init.md",
      "python benchmarks/bench_lsq_init.py",
    ),
    _md_section(
      "On a GPU: QAT step (float32, bfloat16) and integer inference",
      "device_gpu.md",
      "python benchmarks/bench_gpu.py",
      " on a machine with a GPU (none has been lent so far)",
    ),
  ]
  return "\n".join(parts)


def main():
  readme = ROOT / "README.md"
  text = readme.read_text()
  if START not in text or END not in text:
    raise SystemExit(f"README.md lacks the {START} / {END} markers")
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  readme.write_text(head + START + "\n" + render() + END + tail)
  print("README.md results section regenerated")


if __name__ == "__main__":
  main()
