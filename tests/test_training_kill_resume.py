"""qatjax.training: a ``fit`` run with periodic checkpoints survives SIGKILL (mid-epoch, and while
a checkpoint is being committed) and finishes bitwise equal to an uninterrupted run; an
interrupted checkpoint write is never restored."""

import os
import signal
import subprocess
import sys
import time

import fit_worker
import pytest
from helpers import assert_bitwise

from qatjax.training import restore_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "fit_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


def start(ckpt_dir, *pause):
  """The worker's ``fit`` run; the runs share a compilation cache next to their checkpoints
  (the later ones load the programs the first ones compiled: same programs, less CPU)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    JAX_COMPILATION_CACHE_DIR=str(ckpt_dir.parent / "xla_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  cmd = [sys.executable, WORKER, str(ckpt_dir), *map(str, pause)]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
  try:
    _, err = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, err[-5000:]
  return err


def kill_when_paused(proc, marker):
  """SIGKILLs ``proc`` once it has created ``marker`` (it then waits at a known point)."""
  deadline = time.monotonic() + TIMEOUT
  try:
    while not os.path.exists(marker):
      assert proc.poll() is None, proc.communicate()[1][-5000:]
      assert time.monotonic() < deadline, "the run never reached its pause"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_run_resumes_bitwise(tmp_path):
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  reference = start(ref_dir)  # uninterrupted, alongside the runs that get killed
  try:
    deadline = time.monotonic() + TIMEOUT  # its first checkpoint: its programs are compiled
    while not (ref_dir / "3").exists():
      assert reference.poll() is None, reference.communicate()[1][-5000:]
      assert time.monotonic() < deadline, "the reference run never saved step 3"
      time.sleep(0.05)

    # killed in the middle of epoch 2 (after step 5): the last checkpoint is step 3
    run = start(run_dir, "pause-after-step", 5, tmp_path / "a")
    kill_when_paused(run, tmp_path / "a")
    assert sorted(os.listdir(run_dir)) == ["3"]

    # resumed from 3 (inside epoch 1), then killed as orbax commits step 9: its files are all
    # written (commit_success.txt included), only the rename to "9" is missing
    run = start(run_dir, "pause-at-commit", 9, tmp_path / "b")
    kill_when_paused(run, tmp_path / "b")
    assert sorted(os.listdir(run_dir)) == ["3", "6", "9.orbax-checkpoint-tmp"]
    assert "commit_success.txt" in os.listdir(run_dir / "9.orbax-checkpoint-tmp")

    target = fit_worker.initial_state()
    with pytest.raises(ValueError, match=r"step 9 .* never completely written.*\[3, 6\]"):
      restore_checkpoint(run_dir, target, step=9)
    with pytest.warns(
      UserWarning, match=r"incomplete checkpoint .*9\.orbax-checkpoint-tmp.*step 6"
    ):
      assert int(restore_checkpoint(run_dir, target).step) == 6

    # the same command again: resumes from 6 (inside epoch 2), saying it skipped step 9's write
    err = finish(start(run_dir))
    assert "ignoring the incomplete checkpoint" in err and "restoring step 6" in err
    assert sorted(os.listdir(run_dir), key=int) == ["3", "6", "9", "12"]
  finally:
    finish(reference)

  for step in (9, 12):
    want = restore_checkpoint(ref_dir, target, step=step)
    got = restore_checkpoint(run_dir, target, step=step)
    assert int(got.step) == step
    assert_bitwise(got, want)  # params, opt_state, quant_stats (observers), batch_stats, step
