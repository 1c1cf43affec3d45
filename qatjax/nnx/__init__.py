"""qatjax for Flax NNX: quantized NNX modules, in-place ``quantize_model``, ``convert``.

NNX is a second :class:`~qatjax.ops.context.QuantContext` (:class:`NNXContext`) under the same
quantized ops as Linen, so both run the same fake quantization, record the same conversion and
serve with the same integer kernels.

* Modules: :class:`QLinear`, :class:`QLinearGeneral`, :class:`QEinsum`, :class:`QConv`,
  :class:`QEmbed`, :class:`QMultiHeadAttention` (subclasses of their ``nnx`` counterparts: same
  arguments, same parameters) and :class:`QConvBN`. Learned quantizer steps are
  ``nnx.Param``; observer statistics and the ``enabled`` / ``observe`` / ``bn_frozen``
  switches are :class:`QuantStat`.
* Modes: observers update while ``use_running_average`` is False (``model.train()``) and are
  frozen by ``model.eval()``, like ``nnx.BatchNorm``; :func:`calibrating` / :func:`calibrate`
  run them in evaluation mode (post-training quantization).
* State that depends on data is created by one eager example pass before anything is jitted:
  :func:`quantize_model` (an existing float model, in place) or :func:`init_quantizers`
  (a model built from quantized modules).
* Training: ``nnx.jit`` with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (quantizer steps
  train, statistics do not); :func:`set_quant_flags` flips the switches inside the step, e.g.
  from :meth:`qatjax.training.QATSchedule.flags`. ``qatjax.training``'s ``make_train_step`` /
  ``make_eval_step`` / ``fit`` / ``evaluate`` also take an ``nnx.ModelAndOptimizer``.
* Deployment: :func:`convert`; :func:`to_variables` gives the Linen-style variables dict that
  ``qatjax.model_size`` / ``save_quantized`` read, :func:`load_variables` writes one back.

Example:
  >>> import jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import qatjax.nnx as qnnx
  >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
  >>> x = jnp.ones((16, 4))
  >>> _ = qnnx.quantize_model(model, QuantConfig(8, 8), x)   # in place
  >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  >>> @nnx.jit
  ... def train_step(model, optimizer, x):
  ...   loss, grads = nnx.value_and_grad(lambda m: (m(x) ** 2).mean())(model)
  ...   optimizer.update(model, grads)
  ...   return loss
  >>> _ = train_step(model, optimizer, x)
  >>> int_model = qnnx.convert(model, x)
  >>> int_model.layers[0].kernel.get_value().values.dtype
  dtype('int8')
"""

from qatjax.nnx.attention import QMultiHeadAttention
from qatjax.nnx.context import NNXContext, QuantModule, QuantStat, calibrating
from qatjax.nnx.conv import QConv, QConvBN
from qatjax.nnx.convert import convert
from qatjax.nnx.coverage import coverage
from qatjax.nnx.embed import QEmbed
from qatjax.nnx.flags import set_quant_flags
from qatjax.nnx.linear import QEinsum, QLinear, QLinearGeneral
from qatjax.nnx.passes import calibrate, init_quantizers
from qatjax.nnx.quantize_model import quantize_model, rules_report
from qatjax.nnx.variables import load_variables, to_variables

__all__ = [
  "NNXContext",
  "QConv",
  "QConvBN",
  "QEinsum",
  "QEmbed",
  "QLinear",
  "QLinearGeneral",
  "QMultiHeadAttention",
  "QuantModule",
  "QuantStat",
  "calibrate",
  "calibrating",
  "convert",
  "coverage",
  "init_quantizers",
  "load_variables",
  "quantize_model",
  "rules_report",
  "set_quant_flags",
  "to_variables",
]
