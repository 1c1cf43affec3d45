"""qatjax.training: parameters split over a 4 x 2 ("data", "model") mesh of 8 CPU devices train as
on one device, the quantizer state follows its kernel, ``convert`` keeps the shardings, each
device holds half of the kernels' bytes; bad input fails before the first step, writing nothing
(in a subprocess: the device count must be set before jax is imported)."""

import textwrap

import pytest
from helpers import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import os, tempfile
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from qatjax import QDense, QuantConfig, QArray, convert
    from qatjax.training import (QATSchedule, create_train_state, data_model_mesh, fit,
                                 make_optimizer, make_train_step, restore_checkpoint,
                                 save_checkpoint, shard_state)

    assert jax.device_count() == 8, jax.devices()
    LSQ8, LSQ4 = QuantConfig(method="lsq"), QuantConfig(weight_bits=4, method="lsq")

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.relu(QDense(16, config=QuantConfig())(x))   # observers, per-channel weight scales
        x = nn.relu(QDense(16, config=LSQ8)(x))             # learned per-channel scales
        return QDense(4, config=LSQ4)(x)                    # int4, packed two per byte

    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(16, 12)).astype(np.float32),
                rng.integers(0, 4, 16).astype(np.int32)) for _ in range(4)]
    x = batches[0][0]
    state0 = create_train_state(Net(), make_optimizer(optax.adam(1e-2), optax.adam(1e-3)),
                                jax.random.key(0), x[:1])
    RULES = {"QDense_.*/kernel": P(None, "model")}
    kw = dict(schedule=QATSchedule(float_steps=1, freeze_observers_step=3), param_sharding=RULES)
    mesh = data_model_mesh(2)
    assert dict(mesh.shape) == {"data": 4, "model": 2}

    runs = {}
    for name, m in (("sharded", mesh), ("one", data_model_mesh(1, jax.devices()[:1]))):
      step = make_train_step(mesh=m, **kw)
      s, losses = state0, []
      for b in batches:
        s, metrics = step(s, b)
        losses.append(float(metrics["loss"]))
      assert step.jitted._cache_size() == 1
      runs[name] = (s, losses)
    s8, s1 = runs["sharded"][0], runs["one"][0]
    np.testing.assert_allclose(runs["sharded"][1], runs["one"][1], rtol=1e-6, atol=1e-6)
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(s8), jax.tree_util.tree_leaves(s1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(p))
    assert int(s8.quant_stats["QDense_0"]["input_count"]) == 3

    # where things live: kernels split on their output axis, per-channel LSQ scales with them,
    # Adam's moments as their parameter; per-tensor / activation state replicated
    spec = lambda a: tuple(a.sharding.spec)
    for layer in ("QDense_0", "QDense_1", "QDense_2"):
      assert spec(s8.params[layer]["kernel"]) == (None, "model"), layer
      assert s8.params[layer]["bias"].sharding.is_fully_replicated
    for layer in ("QDense_1", "QDense_2"):
      assert spec(s8.params[layer]["kernel_scale"]) == ("model",), layer
      assert s8.params[layer]["input_scale"].sharding.is_fully_replicated
    mu = s8.opt_state.inner_states["weights"].inner_state[0].mu
    assert spec(mu["QDense_0"]["kernel"]) == (None, "model")
    mu_q = s8.opt_state.inner_states["quant"].inner_state[0].mu
    assert spec(mu_q["QDense_1"]["kernel_scale"]) == ("model",)
    for leaf in jax.tree_util.tree_leaves((s8.quant_stats, s8.step)):
      assert leaf.sharding.is_fully_replicated

    def kernel_bytes(tree):
      # total bytes of the kernels, and the bytes each device holds (its addressable shards)
      # (a QArray's scalar zero point is replicated: one number, not part of the split)
      kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(tree)
                 if "['kernel']" in jax.tree_util.keystr(p) and v.ndim > 0]
      per_device = {d: 0 for d in jax.devices()}
      for k in kernels:
        for shard in k.addressable_shards:
          per_device[shard.device] += shard.data.nbytes
      return sum(k.nbytes for k in kernels), sorted(set(per_device.values()))

    total, held = kernel_bytes(s8.params)
    assert held == [total // 2], (total, held)  # every device: exactly half
    print(f"FLOAT-KERNEL-BYTES total={total} per_device={held}")
    total, held = kernel_bytes(s8.opt_state)
    assert held == [total // 2], (total, held)
    print(f"ADAM-KERNEL-MOMENT-BYTES total={total} per_device={held}")

    # convert keeps the shardings and stores round(W / s) of the trained kernels
    qv = convert(Net(), s8.variables, x)
    for layer, cfg in (("QDense_1", LSQ8), ("QDense_2", LSQ4)):
      qa, w = qv["params"][layer]["kernel"], np.asarray(s8.params[layer]["kernel"])
      scale = np.asarray(s8.params[layer]["kernel_scale"])
      wq = cfg.weight_quant
      want = np.clip(np.round(w * (np.float32(1) / scale)), wq.qmin, wq.qmax)
      assert isinstance(qa, QArray) and np.array_equal(np.asarray(qa.unpack()), want), layer
      assert spec(qa.scale) == (None, "model"), layer
    assert spec(qv["params"]["QDense_1"]["kernel"].values) == ("model", None)  # stored (out, in)
    packed = qv["params"]["QDense_2"]["kernel"]
    assert packed.packed and spec(packed.values) == ("model",)  # the int4 bytes, split too
    total, held = kernel_bytes(qv["params"])
    assert held == [total // 2], (total, held)
    print(f"INT-KERNEL-BYTES total={total} per_device={held}")
    # the sharded integer model computes what the same integers compute on one device
    apply = jax.jit(Net().apply)
    np.testing.assert_allclose(np.asarray(apply(qv, x)), np.asarray(apply(jax.device_get(qv), x)),
                               rtol=1e-6, atol=1e-6)

    # --- bad input: ValueError before the first step, nothing written ---------------------------
    def raises(fn, *needles):
      try:
        fn()
      except ValueError as e:
        assert all(n in str(e) for n in needles), (needles, str(e))
      else:
        raise AssertionError(f"no ValueError for {needles}")

    raises(lambda: make_train_step(mesh=mesh, param_sharding={".*kernel": P(None, "tensor")}),
           "'.*kernel'", "'tensor'", "('data', 'model')")
    step = make_train_step(mesh=mesh, param_sharding={"Dense_9/kernel": P(None, "model")})
    raises(lambda: step(state0, batches[0]), "'Dense_9/kernel' matches no parameter")
    step = make_train_step(mesh=mesh, param_sharding={"QDense_2/kernel": P(None, ("data", "model")),
                                                      "QDense_.*/kernel": P(None, "model")})
    raises(lambda: step(state0, batches[0]), "params/QDense_2/kernel", "(16, 4)",
           "axis 1 (4)", "8 devices", "('data', 'model')")
    step = make_train_step(mesh=mesh, **kw)
    raises(lambda: step(state0, (x[:6], batches[0][1][:6])), "(6, 12)", "divisible by the 4")
    assert step.jitted._cache_size() == 0  # nothing ran

    d = tempfile.mkdtemp()
    save_checkpoint(d, s8)
    listing = lambda: sorted((r, tuple(sorted(f))) for r, _, f in os.walk(d))
    before = listing()
    other = data_model_mesh(4)  # 2 x 4: the kernels would be split in 4
    raises(lambda: restore_checkpoint(d, shard_state(other, state0, RULES)),
           "params/QDense_0/kernel", "(2 parts)", "(4 parts)", "'data': 4, 'model': 2",
           "'data': 2, 'model': 4", "reshard=True")
    raises(lambda: restore_checkpoint(d, state0), "unsplit", "reshard=True")  # onto one device
    raises(lambda: fit(state0, (x, batches[0][1]), epochs=1, batch_size=8, rng=0, progress=False,
                       train_step=make_train_step(mesh=other, **kw), checkpoint_dir=d),
           "params/QDense_0/kernel", "(4 parts)")
    assert listing() == before
    fresh = tempfile.mkdtemp() + "/new"
    raises(lambda: fit(state0, (x, batches[0][1]), epochs=1, batch_size=6, rng=0, progress=False,
                       train_step=step, checkpoint_dir=fresh), "divisible by the 4")
    assert not os.path.exists(fresh)
    for target in (shard_state(other, state0, RULES), state0):  # reshard=True: onto the target
      r = restore_checkpoint(d, target, reshard=True)
      for a, b, t in zip(*map(jax.tree_util.tree_leaves, (r, s8, target))):
        assert np.array_equal(a, b) and a.sharding == t.sharding
    print("SHARDED-OK")
""")


@pytest.mark.slow
def test_sharded_params_match_one_device():
  print(run_on_cpu_devices(SCRIPT, 8, "SHARDED-OK"))  # the measured bytes, with pytest -s
