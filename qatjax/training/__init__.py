"""Training utilities for qatjax: train state, QAT / PTQ steps, schedule, optimizers, ``fit``,
plots, orbax checkpoints and data-parallel training over a ``jax.sharding`` mesh.

A QAT run::

    state = create_train_state(model, make_optimizer(optax.adamw(1e-3), optax.adam(1e-4)),
                               jax.random.key(0), x[:1], variables=qatjax.from_float(...))
    train_step = make_train_step(schedule=QATSchedule(float_steps=100, freeze_observers_step=500))
    state, history = fit(state, (x, y), epochs=5, batch_size=64, train_step=train_step,
                         eval_step=make_eval_step(), eval_data=(x_test, y_test), rng=0)
    save_checkpoint("ckpt", state)

Flax NNX: the same steps, ``fit`` and ``evaluate`` take ``nnx.ModelAndOptimizer(model, tx,
wrt=nnx.Param)`` as the state (a model from :func:`qatjax.nnx.quantize_model`), trained in
place under ``nnx.jit``; checkpoint it with ``save_checkpoint(directory, nnx.state(state))``.

The same run as post-training quantization: ``make_train_step(mode="ptq")`` (or
:func:`calibrate`).

Data parallel: ``make_train_step(mesh=data_mesh())`` replicates the state and shards each batch
along axis 0 over the mesh; observer statistics, BatchNorm statistics and gradients are reduced
over the whole (global) batch inside the one jitted program, so every device holds the same
scales. Multi-host: run the same script on every host after ``jax.distributed.initialize()``;
``data_mesh()`` then spans the devices of all hosts and each host passes its own part of the
global batch to the step (assembled with ``jax.make_array_from_process_local_data``). Details in
``qatjax/training/_parallel.py``.

Sharded parameters (tensor parallel / FSDP): ``make_train_step(mesh=data_model_mesh(2),
param_sharding={".*kernel": P(None, "model")})`` splits the matched parameters over the mesh;
quantizer state follows its weight, optimizer moments their parameter (``_sharding.py``), and
``qatjax.convert`` keeps the split. Runs that survive being killed: ``fit(...,
checkpoint_dir=..., checkpoint_every=N)`` resumes bitwise from the latest complete checkpoint.
"""

from qatjax.training._checkpoint import restore_checkpoint, save_checkpoint
from qatjax.training._data import iterate_batches
from qatjax.training._distill import Teacher, distillation_loss
from qatjax.training._evaluate import evaluate
from qatjax.training._fit import fit
from qatjax.training._losses import cross_entropy
from qatjax.training._optim import make_optimizer, quant_param_labels
from qatjax.training._parallel import data_mesh, data_model_mesh, replicate, shard_batch
from qatjax.training._plots import plot_history, plot_quantization, quantization_summary
from qatjax.training._ptq import calibrate
from qatjax.training._schedule import QATSchedule
from qatjax.training._sharding import ShardingRules, shard_state, sharding_rules
from qatjax.training._state import TrainState, create_train_state
from qatjax.training._steps import Step, make_eval_step, make_train_step

__all__ = [
  "QATSchedule",
  "ShardingRules",
  "Step",
  "Teacher",
  "TrainState",
  "calibrate",
  "create_train_state",
  "cross_entropy",
  "data_mesh",
  "data_model_mesh",
  "distillation_loss",
  "evaluate",
  "fit",
  "iterate_batches",
  "make_eval_step",
  "make_optimizer",
  "make_train_step",
  "plot_history",
  "plot_quantization",
  "quant_param_labels",
  "quantization_summary",
  "replicate",
  "restore_checkpoint",
  "save_checkpoint",
  "shard_batch",
  "shard_state",
  "sharding_rules",
]
