"""qatjax.training.QATSchedule: phases switch at the right steps inside one compiled train step."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from qatjax import QConvBN, QDense, QuantConfig, set_quant_flags
from qatjax.training import QATSchedule, create_train_state, cross_entropy, make_train_step

N, M, K = 2, 4, 5  # float_steps, freeze_observers_step, freeze_bn_step


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(
      QConvBN(4, (3, 3), config=QuantConfig(act_bits=4, weight_bits=4))(
        x, use_running_average=not train
      )
    )
    return QDense(3, config=QuantConfig(act_bits=4, weight_bits=4))(x.reshape(x.shape[0], -1))


@jax.jit
def _reference(variables, x, y, enabled, observe, bn_frozen):
  v = set_quant_flags(variables, enabled=enabled, observe=observe, bn_frozen=bn_frozen)
  out, _ = ConvNet().apply(v, x, train=True, mutable=["quant_stats", "batch_stats"])
  return cross_entropy(out, y).mean()


def reference_loss(state, batch, **flags):
  """The loss of a forward pass with the given flags, as the train step should compute it."""
  return float(
    _reference(
      state.variables, *batch, *(np.bool_(flags[k]) for k in ("enabled", "observe", "bn_frozen"))
    )
  )


def test_phases_switch_at_the_right_steps_with_one_compilation():
  rng = np.random.default_rng(0)
  batches = [
    (
      rng.normal(size=(8, 5, 5, 1)).astype(np.float32) * (1 + i),
      rng.integers(0, 3, 8).astype(np.int32),
    )
    for i in range(7)
  ]
  calls = []

  def loss(out, y):
    calls.append(1)
    return cross_entropy(out, y)

  sched = QATSchedule(float_steps=N, freeze_observers_step=M, freeze_bn_step=K)
  step = make_train_step(loss, sched, apply_kwargs={"train": True})
  state = create_train_state(ConvNet(), optax.sgd(0.05), jax.random.key(0), batches[0][0])
  for s, batch in enumerate(batches):
    enabled, observe, frozen = s >= N, s < M, s >= K
    expected = reference_loss(state, batch, enabled=enabled, observe=observe, bn_frozen=frozen)
    other = reference_loss(state, batch, enabled=not enabled, observe=observe, bn_frozen=frozen)
    new, metrics = step(state, batch)
    # the forward pass used this step's flags (and the other quantization phase differs)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert abs(expected - other) > 1e-4
    for layer in ("QConvBN_0", "QDense_0"):
      qs_old, qs = state.quant_stats[layer], new.quant_stats[layer]
      assert bool(qs["enabled"]) == enabled and bool(qs["observe"]) == observe, (s, layer)
      moved = not np.array_equal(qs["input_max"], qs_old["input_max"])
      assert moved == observe, (s, layer, "observer")
    assert bool(new.quant_stats["QConvBN_0"]["bn_frozen"]) == frozen
    bn_moved = not np.array_equal(
      new.batch_stats["QConvBN_0"]["var"], state.batch_stats["QConvBN_0"]["var"]
    )
    assert bn_moved == (not frozen), (s, "bn")
    state = new
  assert len(calls) == 1 and step.jitted._cache_size() == 1


def test_flags_and_none_leaves_state_flags():
  f = QATSchedule(float_steps=3).flags(np.int32(2))
  assert not bool(f["enabled"]) and f["observe"] is None and f["bn_frozen"] is None
  v = jax.jit(QDense(2, config=QuantConfig()).init)(jax.random.key(0), np.ones((1, 3), np.float32))
  v = set_quant_flags(v, observe=False)
  out = QATSchedule(float_steps=None).apply(v, 100)
  assert bool(out["quant_stats"]["enabled"]) and not bool(out["quant_stats"]["observe"])


@pytest.mark.parametrize(
  "kw", [{"float_steps": -1}, {"freeze_observers_step": 1.5}, {"freeze_bn_step": True}]
)
def test_bad_schedule(kw):
  with pytest.raises(ValueError, match="QATSchedule"):
    QATSchedule(**kw)


def test_schedule_needs_quantized_model():
  with pytest.raises(ValueError, match="quant_stats"):
    QATSchedule().apply({"params": {}}, 0)
