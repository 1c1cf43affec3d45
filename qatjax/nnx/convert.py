"""``convert``: a trained quantized NNX model to its integer deployment form."""

from __future__ import annotations

from flax import nnx

from qatjax.nnx.context import QuantStat, in_pass
from qatjax.nnx.passes import assign_paths, eval_mode, run_on_copy
from qatjax.ops.registry import ACT_SITES, ATTENTION_MARKER, WEIGHTS, act_leaf


def _check_calibrated(module, record) -> None:
  """Every activation quantizer a converted layer keeps must have seen data."""
  for site in ACT_SITES:
    count = vars(module).get(act_leaf(site, "count"))
    calibrated = not isinstance(count, QuantStat) or int(count.get_value()) > 0
    if act_leaf(site, "scale") in record and not calibrated:
      raise ValueError(
        f"convert: layer {module.quant_path} has no activation statistics (its observer "
        "never saw data); calibrate or train it first"
      )


def _keeps(name, var, record) -> bool:
  """Whether a converted layer keeps variable ``name``: its bias (unless a folded one was
  recorded) and variables of other types; quantizer parameters and statistics, BatchNorm
  parameters and statistics (folded) go."""
  if isinstance(var, (QuantStat, nnx.BatchStat)):
    return False
  if isinstance(var, nnx.Param):
    return name == "bias" and name not in record
  return True


def convert(model, *example_args, **example_kwargs):
  """A converted copy of a trained quantized NNX model: integer kernels (Jacob et al. 2018).

  Runs the model once (compiled) in evaluation mode on the example while every quantized op
  records what its integer kernel needs (as Linen's :func:`qatjax.convert`): the kernel (or
  embedding table) as a :class:`QArray` (int8; two values per byte at 4 bits and fewer) stored
  in the order the kernel reads it, the frozen input scale and zero point, and the kernel sums
  the zero-point correction needs, each an ``nnx.Param`` of the layer. ``QConvBN`` layers are
  folded (kernel ``W * gamma / sqrt(var + eps)``, their ``bias`` the folded BN shift). The
  layer's quantizer parameters, observer statistics and BatchNorm variables go; float layers are
  untouched.

  The result is a copy made with ``nnx.clone``: it shares the unconverted arrays with ``model``
  (nothing is copied) and ``model`` itself stays as it was. Calling it runs the same integer
  kernels as a converted Linen model (int8 x int8 -> int32 matmuls and convolutions).

  Args:
    model: the trained quantized model.
    *example_args: an example input (its shape matters, not its values: no statistic changes).
    **example_kwargs: keyword arguments of ``model(...)``.

  Returns:
    The converted model.

  Raises:
    ValueError: naming a layer whose activation observer never saw data; nothing is converted.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, convert, init_quantizers
    >>> layer = QLinear(4, 3, config=QuantConfig(), rngs=nnx.Rngs(0))
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> init_quantizers(layer, x)   # the observer sees x
    >>> int_layer = convert(layer, x)
    >>> int_layer.kernel.get_value().values.dtype
    dtype('int8')
    >>> layer.eval(); int_layer.eval()
    >>> bool(jnp.abs(int_layer(x) - layer(x)).max() < 1e-4)
    True
  """

  def body(copy, args, kwargs):
    assign_paths(copy)
    record = {}
    with eval_mode(copy), in_pass(record=record):
      copy(*args, **kwargs)
    return record

  record = run_on_copy(model, body, example_args, example_kwargs)
  qmodel = nnx.clone(model)
  modules = assign_paths(qmodel)
  converted = (*WEIGHTS, ATTENTION_MARKER)
  layers = [(modules[p], rec) for p, rec in record.items() if any(w in rec for w in converted)]
  for module, rec in layers:
    _check_calibrated(module, rec)
  for module, rec in layers:
    for name, var in list(vars(module).items()):
      if not _keeps(name, var, rec):
        delattr(module, name)
    for name, value in rec.items():
      setattr(module, name, nnx.Param(value))
  return qmodel
