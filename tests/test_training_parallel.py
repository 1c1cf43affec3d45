"""qatjax.training: data-parallel training over a 4-device CPU mesh (in a subprocess, because the
device count must be set before jax is imported)."""

import textwrap

import pytest
from helpers import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import os, tempfile
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
    from qatjax import QConvBN, QDense, QuantConfig
    from qatjax.training import (QATSchedule, create_train_state, cross_entropy, data_mesh,
                                 make_eval_step, make_train_step, replicate, restore_checkpoint,
                                 save_checkpoint, shard_batch)

    assert jax.device_count() == 4, jax.devices()

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.relu(QConvBN(4, (3, 3), config=QuantConfig())(x, use_running_average=not train))
        x = nn.relu(QDense(16, config=QuantConfig(act_calibration="minmax"))(
            x.reshape(x.shape[0], -1)))
        return QDense(3, config=QuantConfig(method="lsq"))(x)

    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(16, 5, 5, 1)).astype(np.float32) * (1 + i),
                rng.integers(0, 3, 16).astype(np.int32)) for i in range(4)]
    state0 = create_train_state(Net(), optax.adam(1e-2), jax.random.key(0), batches[0][0][:1])
    sched = QATSchedule(float_steps=1, freeze_observers_step=3)
    results, calls = {}, []

    def loss(out, y):
      calls.append(1)
      return cross_entropy(out, y)

    for n in (4, 1):
      mesh = data_mesh(jax.devices()[:n])
      step = make_train_step(loss, sched, apply_kwargs={"train": True}, mesh=mesh)
      s = state0
      for b in batches:
        s, m = step(s, b)
      assert step.jitted._cache_size() == 1
      results[n] = (s, m)
    assert len(calls) == 2, calls  # one trace per mesh

    s4, s1 = results[4][0], results[1][0]
    for name in ("params", "quant_stats", "batch_stats", "opt_state"):
      for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(getattr(s4, name)),
                           jax.tree_util.tree_leaves(getattr(s1, name))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                   err_msg=name + jax.tree_util.keystr(p))
    np.testing.assert_allclose(results[4][1]["loss"], results[1][1]["loss"], rtol=1e-5)
    assert int(s4.quant_stats["QDense_0"]["input_count"]) == 3  # frozen from step 3 on

    # every device holds the same observer statistics (and parameters): bitwise
    for tree in (s4.quant_stats, s4.params, s4.batch_stats):
      for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shards = [np.asarray(sh.data) for sh in leaf.addressable_shards]
        assert len(shards) == 4 and leaf.sharding.is_fully_replicated, jax.tree_util.keystr(p)
        assert all(np.array_equal(shards[0], sh) for sh in shards[1:]), jax.tree_util.keystr(p)

    # the batch really is split: each device sees a quarter
    mesh = data_mesh()
    xs, ys = shard_batch(mesh, batches[0])
    assert [sh.data.shape[0] for sh in xs.addressable_shards] == [4, 4, 4, 4]

    # a batch that does not divide the device count
    try:
      make_train_step(mesh=mesh)(state0, (batches[0][0][:6], batches[0][1][:6]))
    except ValueError as e:
      assert "divisible by the 4 devices" in str(e) and "(6, 5, 5, 1)" in str(e), e
    else:
      raise AssertionError("no ValueError")

    # eval and checkpoints with a replicated state
    ev = make_eval_step(apply_kwargs={"train": False}, mesh=mesh)
    m = ev(s4, batches[0] + (np.ones(16, np.float32),))
    assert float(m["count"]) == 16.0
    d = tempfile.mkdtemp()
    save_checkpoint(d, s4)
    r = restore_checkpoint(d, replicate(mesh, state0))
    for a, b in zip(jax.tree_util.tree_leaves(r), jax.tree_util.tree_leaves(s4)):
      assert np.array_equal(a, b) and a.sharding.is_fully_replicated
    print("PARALLEL-OK")
""")


@pytest.mark.slow
def test_four_devices_match_one_device():
  run_on_cpu_devices(SCRIPT, 4, "PARALLEL-OK", timeout=300)
