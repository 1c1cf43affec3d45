"""Whole-model passes: the example pass that creates quantizer state, and PTQ calibration."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qatjax.nnx.context import QuantModule, QuantStat, calibrating, in_pass

# The attributes model.train() / model.eval() set (nnx.Dropout, nnx.BatchNorm, quantized layers).
MODE_ATTRIBUTES = ("deterministic", "use_running_average")


def module_path(path) -> str:
  """``"block/layers/0"`` for an ``nnx.iter_modules`` path (``"<root>"`` for the model)."""
  return "/".join(str(p) for p in path) or "<root>"


def quant_modules(model):
  """``[(path, module)]`` of the quantized modules of ``model`` (each once)."""
  return [(module_path(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, QuantModule)]


@contextlib.contextmanager
def eval_mode(model):
  """``model.eval()`` for the body; every module's own mode attributes are restored after it."""
  saved = [
    (m, name, getattr(m, name))
    for _, m in nnx.iter_modules(model)
    for name in MODE_ATTRIBUTES
    if hasattr(m, name)
  ]
  model.eval()
  try:
    yield
  finally:
    for m, name, value in saved:
      setattr(m, name, value)


def assign_paths(model) -> dict:
  """Gives every quantized module of ``model`` its path; returns ``{path: module}`` of all."""
  modules = {module_path(p): m for p, m in nnx.iter_modules(model)}
  for path, m in modules.items():
    if isinstance(m, QuantModule):
      m.quant_path = path
  return modules


def run_on_copy(model, body: Callable, args, kwargs):
  """``body(copy, args, kwargs)`` on a copy of ``model``, compiled (``jax.jit``); its outputs.

  The copy is merged from ``model``'s state inside the compiled function: ``model`` is neither
  copied nor changed, and whatever ``body`` does to the copy stays there (it returns what it
  needs). Array leaves of ``args`` / ``kwargs`` are traced, other leaves are constants.
  """
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  traced = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

  def run(state, arrays):
    it = iter(arrays)
    a, kw = treedef.unflatten([next(it) if t else leaf for leaf, t in zip(leaves, traced)])
    return body(nnx.merge(graphdef, state), a, kw)

  return jax.jit(run)(state, [leaf for leaf, t in zip(leaves, traced) if t])


def example_pass(
  model, args, kwargs, prepare: Callable | None = None, *, from_float: bool = False
) -> None:
  """``prepare(model)``, then one forward pass on the example that creates the quantizer state.

  With ``from_float`` (:func:`qatjax.nnx.quantize_model`, Linen's ``from_float``), every
  observer's ``<site>_count_from_float`` records the count it ends with, so that ``convert`` can
  warn about observers a training loop never updated (:mod:`qatjax.model.observers`).

  The pass runs in evaluation mode (no BatchNorm or dropout update) with the observers on: LSQ
  steps are initialised from this batch and the observers see it once (as Linen's
  ``from_float``). It runs compiled on a copy (:func:`run_on_copy`) and returns the new
  variables' values; only then is ``model`` prepared and given them, so an input that does not
  fit a layer, or any other error, leaves ``model`` untouched.
  """
  created = {}

  def body(copy, a, kw):
    if prepare is not None:
      prepare(copy)
    modules = assign_paths(copy)
    with eval_mode(copy), in_pass(create=created, observe=True):
      copy(*a, **kw)
    values = {}
    for path, name in created:
      values.setdefault(path, {})[name] = vars(modules[path])[name].get_value()
    if from_float:
      for leaves in values.values():
        for name in leaves:
          if name.endswith("_count_from_float"):
            leaves[name] = leaves[name.removesuffix("_from_float")]
    return values

  values = run_on_copy(model, body, args, kwargs)
  if prepare is not None:
    prepare(model)
  modules = assign_paths(model)
  for (path, name), kind in created.items():
    setattr(modules[path], name, kind(values[path][name]))


def init_quantizers(model, *example_args, **example_kwargs) -> None:
  """Creates the quantizer state of every quantized module of ``model`` from an example input.

  Needed once, outside ``nnx.jit``, for a model built from ``QLinear`` / ``QConv`` / ...
  modules, before it is called or jitted (:func:`quantize_model` runs it itself): quantizer
  variables whose value depends on data (LSQ steps initialised from the first batch) must exist
  before ``nnx.jit`` traces the model. It also gives every quantized module its path (for
  ``QuantRules`` configs and error messages). The forward pass runs in evaluation mode with the
  observers on: they see the example once; BatchNorm statistics and weights are not changed.

  Args:
    model: an ``nnx.Module`` holding quantized modules (or one itself).
    *example_args: an example input for ``model(...)``.
    **example_kwargs: keyword arguments of ``model(...)``.

  Raises:
    ValueError: naming a layer the example does not fit; nothing is created then.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, init_quantizers
    >>> layer = QLinear(4, 2, config=QuantConfig(4, 4, method="lsq"), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.ones((8, 4)))
    >>> layer.kernel_scale.shape, layer.input_scale.shape
    ((2,), ())
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"init_quantizers expects an nnx.Module, got {type(model).__name__}")
  example_pass(model, example_args, example_kwargs)


def _inputs(batch):
  return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibrate(model, batches: Iterable, num_batches: int | None = None, **kwargs) -> None:
  """Post-training quantization of an NNX model, in place: the observers see ``batches``.

  The model runs in evaluation mode (BatchNorm on running statistics, no dropout) inside
  :func:`calibrating`, so only the observer statistics change; weights, BatchNorm statistics and
  the ``observe`` flags (observers update during calibration whatever they say) are left as they
  were. The forward pass is compiled once per batch shape (``nnx.jit``).

  Args:
    model: a quantized NNX model (after :func:`quantize_model` or :func:`init_quantizers`).
    batches: an iterable of input arrays or ``(inputs, labels, ...)`` tuples.
    num_batches: how many batches to use (default: all).
    **kwargs: keyword arguments of ``model(...)``.

  Raises:
    ValueError: a model without quantizer state, a bad ``num_batches``, or fewer batches than
      ``num_batches`` (or none); the model is not changed then.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qatjax.nnx import QLinear, calibrate, init_quantizers
    >>> layer = QLinear(3, 2, config=QuantConfig(act_calibration="minmax"), rngs=nnx.Rngs(0))
    >>> init_quantizers(layer, jnp.zeros((1, 3)))
    >>> calibrate(layer, [jnp.full((4, 3), 2.0), -jnp.ones((4, 3))])
    >>> float(layer.input_min[...]), float(layer.input_max[...])
    (-1.0, 2.0)
  """
  flags = [
    m.observe for _, m in quant_modules(model) if isinstance(vars(m).get("observe"), QuantStat)
  ]
  if not flags:
    raise ValueError(
      "calibrate needs a quantized model with quantizer state: run "
      "qatjax.nnx.quantize_model / init_quantizers first"
    )
  if num_batches is not None and (
    isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
  ):
    raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")

  chosen = list(itertools.islice(batches, num_batches))
  if not chosen or (num_batches is not None and len(chosen) < num_batches):
    raise ValueError(
      f"batches yielded {len(chosen)} batches, expected "
      f"{num_batches if num_batches is not None else 'at least 1'}"
    )

  @nnx.jit
  def forward(model, x):
    with calibrating():
      model(x, **kwargs)

  saved = [flag.get_value() for flag in flags]
  try:
    for flag in flags:
      flag.set_value(jnp.ones_like(flag.get_value()))
    with eval_mode(model):
      for batch in chosen:
        forward(model, _inputs(batch))
  finally:
    for flag, value in zip(flags, saved):
      flag.set_value(value)
