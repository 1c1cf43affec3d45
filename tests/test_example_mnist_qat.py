"""End-to-end runs of examples/mnist_qat.py (digits always; MNIST when ../shared has it)."""

import gzip
import importlib.util
import json
import pathlib
import struct
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
MNIST_FILES = (
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="module")
def example():
  spec = importlib.util.spec_from_file_location("mnist_qat", ROOT / "examples" / "mnist_qat.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["mnist_qat"] = mod  # flax's dataclass transform looks the module up
  spec.loader.exec_module(mod)
  return mod


def _check_outputs(res, out_dir, labels):
  assert [r["precision"] for r in res["rows"]] == ["float32", "float32 fine-tuned", *labels]
  saved = json.loads((out_dir / "mnist_qat.json").read_text())
  assert saved["rows"] == res["rows"]
  md = (out_dir / "mnist_qat.md").read_text()
  for label in labels:
    assert f"| {label} |" in md
  assert (out_dir / "mnist_qat_accuracy_vs_bits.png").stat().st_size > 1000
  for r in res["rows"][2:]:
    # The converted integer model is the QAT model: same predictions (up to rare ties).
    assert r["agreement"] >= 0.99, r
    assert abs(r["int"] - r["qat"]) <= 0.01, r
    assert r["bytes_pct"] < 27.0, r


@pytest.mark.slow
def test_digits_end_to_end(example, tmp_path, capsys):
  res = example.main(
    [
      "--precisions",
      "8,4,2m",
      "--epochs",
      "12",
      "--qat-epochs",
      "3",
      "--no-progress",
      "--out-dir",
      str(tmp_path),
    ]
  )
  labels = ["W8A8", "W4A4", "W2A2 (first/last 8-bit)"]
  _check_outputs(res, tmp_path, labels)
  assert res["dataset"] == "digits" and res["test_images"] == 449
  float_acc, (w8, w4, w2m) = res["rows"][1]["float"], res["rows"][2:]
  assert float_acc > 0.93
  assert all(r["float"] == float_acc for r in res["rows"][2:])  # the fair (fine-tuned) reference
  # PTQ: 8-bit observers calibrated on a few batches lose at most 1.5 points (Jacob et al. 2018:
  # 8-bit inference within about a point of float); every row has its PTQ accuracy.
  assert w8["ptq"] >= float_acc - 0.015, res["rows"]
  assert all(0.1 < r["ptq"] <= 1.0 for r in (w4, w2m))  # above chance (10 classes)
  # QAT: observers at 8 bits; LSQ / LSQ+ at 4 bits, and at 2 bits with the first and last layer
  # at 8 (Esser et al. 2020: 4-bit LSQ matches float, 2-bit loses a few points).
  assert w8["qat"] >= float_acc - 0.015, res["rows"]
  assert w4["qat"] >= float_acc - 0.03, res["rows"]
  assert w2m["qat"] >= float_acc - 0.05, res["rows"]
  assert w4["bytes"] < w2m["bytes"] < w8["bytes"]  # packed 4-bit kernels; 2m keeps two at 8 bits
  out = capsys.readouterr().out
  assert "| precision | float % (same epochs) | PTQ % | QAT % | integer %" in out
  md = (tmp_path / "mnist_qat.md").read_text()
  for r in res["rows"][2:]:  # the PTQ column holds the row's PTQ accuracy
    assert f"| {r['precision']} | {100 * r['float']:.2f} | {100 * r['ptq']:.2f} |" in md


def test_nnx_api_runs_the_pipeline(example, tmp_path):
  # A smoke run of the NNX pipeline (qat_pipelines.NNXPipeline); that it gives the Linen
  # numbers is test_nnx_training's and test_nnx_parity's to show.
  res = example.main(
    ["--api", "nnx", "--precisions", "8", "--epochs", "2", "--qat-epochs", "1"]
    + ["--train-limit", "256", "--test-limit", "200", "--calib-batches", "2"]
    + ["--no-progress", "--out-dir", str(tmp_path)]
  )
  _check_outputs(res, tmp_path, ["W8A8"])
  assert res["api"] == "nnx" and res["train_images"] == 256


@pytest.mark.slow
@pytest.mark.skipif(
  not all((MNIST_DIR / f).exists() for f in MNIST_FILES),
  reason=f"MNIST IDX files not in {MNIST_DIR}",
)
def test_mnist_few_hundred_images(example, tmp_path):
  res = example.main(
    [
      "--data-dir",
      str(MNIST_DIR),
      "--train-limit",
      "768",
      "--test-limit",
      "400",
      "--precisions",
      "8",
      "--epochs",
      "4",
      "--qat-epochs",
      "1",
      "--batch-size",
      "64",
      "--no-progress",
      "--out-dir",
      str(tmp_path),
    ]
  )
  _check_outputs(res, tmp_path, ["W8A8"])  # 2-bit rows: test_digits_end_to_end
  assert res["dataset"] == "mnist" and res["train_images"] == 768
  # 768 images, 4 + 1 epochs: the float reference is noisy; take the better of the two rows.
  float_acc, w8 = max(r["float"] for r in res["rows"][:2]), res["rows"][2]
  assert float_acc > 0.8
  assert w8["qat"] >= float_acc - 0.03, res["rows"]


def _write_idx(path, magic, dims, payload=b"", truncate=0, level=9):
  data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
  body = payload or bytes(int(np.prod(dims)))
  with gzip.open(path, "wb", compresslevel=level) as f:
    f.write((data + body)[: len(data + body) - truncate])


def _fake_mnist(d, n_train=60000, n_test=10000):  # valid headers and sizes, zero pixels
  _write_idx(d / MNIST_FILES[0], 0x803, (n_train, 28, 28))
  _write_idx(d / MNIST_FILES[1], 0x801, (n_train,))
  _write_idx(d / MNIST_FILES[2], 0x803, (n_test, 28, 28))
  _write_idx(d / MNIST_FILES[3], 0x801, (n_test,))


def test_load_mnist_reads_valid_idx_files(tmp_path):
  """load_mnist's success path on small valid IDX files: the standard headers and sizes with a
  known pixel pattern and labels (the real files are not needed)."""
  from image_data import load_mnist

  def images(n, offset):  # pixel (i, r, c) = (i + offset + 3 r + 7 c) mod 256 (uint8 wraps)
    r, c = np.ogrid[:28, :28]
    base = ((offset + 3 * r + 7 * c) % 256).astype(np.uint8)
    return base[None] + (np.arange(n) % 256).astype(np.uint8)[:, None, None]

  want = {}
  for which, (n, offset) in enumerate([(60000, 0), (10000, 5)]):
    img, lab = images(n, offset), ((np.arange(n) + offset) % 10).astype(np.uint8)
    _write_idx(tmp_path / MNIST_FILES[2 * which], 0x803, (n, 28, 28), img.tobytes(), level=1)
    _write_idx(tmp_path / MNIST_FILES[2 * which + 1], 0x801, (n,), lab.tobytes(), level=1)
    want[which] = (img, lab)
  data = load_mnist(str(tmp_path))
  assert data.name == "mnist"
  splits = [(data.x_train, data.y_train), (data.x_test, data.y_test)]
  for (x, y), (img, lab) in zip(splits, want.values()):
    assert x.shape == img.shape + (1,) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(y, lab)
    every = slice(None, None, 7)  # a seventh of the images keeps the check fast
    assert np.array_equal(x[every, ..., 0], img[every].astype(np.float32) / 255.0)


def test_missing_file_is_named(example, tmp_path):
  _fake_mnist(tmp_path)
  (tmp_path / MNIST_FILES[3]).unlink()
  with pytest.raises(SystemExit, match=r"not found: .*t10k-labels-idx1-ubyte\.gz"):
    example.main(["--data-dir", str(tmp_path), "--no-progress", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize(
  "which,kwargs,match",
  [
    (0, {"magic": 0x801}, "magic"),
    (1, {"truncate": 1}, ""),
    (2, {"not_gzip": True}, "gzip"),
  ],
)
def test_corrupt_file_is_named(example, tmp_path, which, kwargs, match):
  _fake_mnist(tmp_path)
  path = tmp_path / MNIST_FILES[which]
  if kwargs.get("not_gzip"):
    path.write_bytes(b"this is not an IDX file")
  else:
    dims = (60000, 28, 28) if which == 0 else (60000,)
    _write_idx(
      path,
      kwargs.get("magic", 0x803 if which == 0 else 0x801),
      dims,
      truncate=kwargs.get("truncate", 0),
    )
  with pytest.raises(SystemExit) as e:
    example.main(["--data-dir", str(tmp_path), "--no-progress", "--out-dir", str(tmp_path)])
  msg = str(e.value)
  assert MNIST_FILES[which] in msg and match in msg, msg
  assert not (tmp_path / "mnist_qat.json").exists()  # nothing written


def test_bad_arguments(example, tmp_path, capsys):
  with pytest.raises(SystemExit):
    example.main(["--data-dir", str(tmp_path / "nope")])
  assert "is not a directory" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    example.main(["--precisions", "9"])
  assert "not a bit width 2..8" in capsys.readouterr().err
