"""qatjax.training: one QAT job over two processes (``jax.distributed`` on localhost, CPU gloo
collectives, 2 devices each) equals the one-process run over the same global batches."""

import os
import socket
import subprocess
import sys
import time

import distributed_worker as worker
import jax
import numpy as np
import pytest

from qatjax.training import restore_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_job(out_dir, timeout=150):
  """Runs both processes; kills whatever is left after ``timeout`` seconds or a failure."""
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  port, procs, logs = free_port(), [], []
  try:
    for i in range(2):
      logs.append(open(out_dir / f"log{i}.txt", "w+"))  # noqa: SIM115 (closed below)
      cmd = [sys.executable, WORKER, str(i), str(port), str(out_dir)]
      procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: do not wait for the other to time out
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    text = []
    for log in logs:
      log.seek(0)
      text.append(log.read()[-3000:])
      log.close()
  return [p.returncode for p in procs], "\n----\n".join(text)


def leaves(state):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)
  }


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  codes, logs = run_job(tmp_path)
  assert codes == [0, 0], logs

  # the one-process reference: one device, the whole global batch per step
  step, state, losses = worker.train_step(), worker.initial_state(), []
  for batch in worker.global_batches():
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  ref = leaves(state)
  assert state.batch_stats and state.quant_stats and "kernel_scale" in state.params["QDense_1"]
  assert int(state.quant_stats["QDense_0"]["input_count"]) == 3  # observers froze at step 3

  for i in range(2):  # both processes hold the reference state (and saw the global losses)
    got = np.load(tmp_path / f"process{i}.npz")
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-6, atol=1e-6)
    assert set(got.files) - {"losses"} == set(ref)
    for path, want in ref.items():
      np.testing.assert_allclose(got[path], want, rtol=1e-6, atol=1e-6, err_msg=f"{i}{path}")

  # the checkpoint both processes wrote restores in this one-process run
  restored = restore_checkpoint(tmp_path / "ckpt", worker.initial_state())
  assert int(restored.step) == worker.STEPS
  got = np.load(tmp_path / "process0.npz")
  for path, leaf in leaves(restored).items():
    assert np.array_equal(leaf, got[path]), path
