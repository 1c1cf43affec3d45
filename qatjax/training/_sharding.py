"""Sharded parameters: rules that split a train state's parameters over a mesh (FSDP / tensor
parallel), with the quantizer state following its weight.

A rule maps a regular expression over parameter paths (``"QDense_0/kernel"``, matched whole) to a
``PartitionSpec`` over the mesh's axes: ``{".*kernel": P(None, "model")}`` splits every kernel's
output axis over ``"model"`` (tensor parallel); ``P(None, "data")`` would split it over the batch
axis instead (FSDP). The first matching rule wins; a parameter no rule matches is replicated.

Quantizer state is never matched by the rules, it follows its weight: a weight's learned scale
(``kernel_scale``, ``embedding_scale``) is split as the weight's channels are
(:mod:`qatjax.model.sharding`), so a per-channel scale of a kernel split on its output axis is
split the same way; per-tensor scales, activation quantizer parameters, observer statistics
(``quant_stats``), BatchNorm statistics and the step are replicated, and XLA reduces their updates
over the whole global batch. Optimizer state leaves that mirror a parameter (Adam's moments, ...)
are split as that parameter; the others are replicated.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qatjax.model.sharding import entry_size, follow_spec, spec_entries
from qatjax.ops.registry import QUANTIZER_PARAMS, WEIGHTS, weight_scale
from qatjax.training._parallel import put, replicated
from qatjax.training._tree import key_name, path_str

_WEIGHT_OF_SCALE = {weight_scale(w): w for w in WEIGHTS}


def _axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Ordered ``(regex, PartitionSpec)`` pairs for parameter paths; made by :func:`sharding_rules`.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> from qatjax.training import sharding_rules
    >>> sharding_rules({".*kernel": P(None, "model")}).match("block/Dense_0/kernel")
    ('.*kernel', P(None, 'model'))
  """

  patterns: tuple[tuple[str, PartitionSpec], ...]

  def __post_init__(self):
    for pattern, spec in self.patterns:
      if not isinstance(pattern, str):
        raise ValueError(f"sharding rule keys must be regex strings, got {pattern!r}")
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"sharding rule regex {pattern!r} does not compile: {e}") from None
      if not isinstance(spec, PartitionSpec):
        raise ValueError(
          f"sharding rule {pattern!r} must map to a jax.sharding.PartitionSpec, got {spec!r}"
        )

  def match(self, path: str) -> tuple[str | None, PartitionSpec | None]:
    """``(pattern, spec)`` of the first rule matching the whole ``path``, else ``(None, None)``.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> from qatjax.training import sharding_rules
      >>> rules = sharding_rules({"Dense_0/kernel": P(None, "model")})
      >>> rules.match("Dense_0/kernel"), rules.match("block/Dense_0/kernel")  # whole paths only
      (('Dense_0/kernel', P(None, 'model')), (None, None))
    """
    for pattern, spec in self.patterns:
      if re.fullmatch(pattern, path):
        return pattern, spec
    return None, None

  def param_specs(self, mesh, params) -> dict[str, PartitionSpec]:
    """``{path: PartitionSpec}`` of every parameter on ``mesh`` (a ``Mesh`` or an
    ``AbstractMesh``), quantizer parameters following their weight.

    Raises:
      ValueError: as :func:`shard_state`.

    Example:
      >>> import optax
      >>> from jax.sharding import AbstractMesh, PartitionSpec as P
      >>> from qatjax import QDense, QuantConfig
      >>> from qatjax.training import create_train_state, sharding_rules
      >>> s = create_train_state(QDense(4, config=QuantConfig(method="lsq")), optax.sgd(0.1),
      ...                        jax.random.key(0), jnp.ones((1, 3)))
      >>> specs = sharding_rules({"kernel": P(None, "model")}).param_specs(
      ...   AbstractMesh((4, 2), ("data", "model")), s.params)
      >>> specs["kernel"], specs["kernel_scale"], specs["input_scale"]
      (P(None, 'model'), P('model',), P())
    """
    return param_specs(mesh, params, self)

  def check_mesh(self, mesh: Mesh) -> None:
    """Raises ``ValueError`` if a rule names an axis ``mesh`` does not have.

    Example:
      >>> from jax.sharding import AbstractMesh, PartitionSpec as P
      >>> from qatjax.training import sharding_rules
      >>> rules = sharding_rules({"kernel": P(None, "model")})
      >>> rules.check_mesh(AbstractMesh((2, 2), ("data", "model")))       # fine
      >>> rules.check_mesh(AbstractMesh((4,), ("data",)))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: sharding rule 'kernel' -> P(None, 'model') names mesh axis 'model', but ...
    """
    for pattern, spec in self.patterns:
      for entry in spec:
        for name in _axis_names(entry):
          if name not in mesh.axis_names:
            raise ValueError(
              f"sharding rule {pattern!r} -> {spec} names mesh axis {name!r}, but the mesh "
              f"has axes {mesh.axis_names}"
            )


def sharding_rules(mapping: Mapping[str, PartitionSpec] | ShardingRules) -> ShardingRules:
  """Parameter sharding rules: regular expressions over parameter paths to ``PartitionSpec``\\ s.

  A parameter path is its names inside ``params`` joined by ``/`` (``"QDense_0/kernel"``); each
  regex must match the whole path (``re.fullmatch``); the first matching entry (in insertion
  order) wins. Learned quantizer parameters are not matched: they follow their weight (see
  ``qatjax/training/_sharding.py``).

  Args:
    mapping: ``{regex: PartitionSpec}`` (or a :class:`ShardingRules`, returned as is).

  Returns:
    A :class:`ShardingRules`, for ``make_train_step(param_sharding=...)`` / :func:`shard_state`.

  Raises:
    ValueError: a regex that does not compile, or a value that is not a ``PartitionSpec``.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> from qatjax.training import sharding_rules
    >>> r = sharding_rules({"Dense_0/kernel": P("model", None), ".*kernel": P(None, "model")})
    >>> r.match("Dense_1/kernel")[1], r.match("Dense_1/bias")
    (P(None, 'model'), (None, None))
  """
  if isinstance(mapping, ShardingRules):
    return mapping
  if not isinstance(mapping, Mapping):
    raise ValueError(f"sharding_rules expects a mapping of regex -> PartitionSpec, got {mapping!r}")
  return ShardingRules(tuple(mapping.items()))


def _check_split(mesh, path, shape, spec):
  if len(spec) > len(shape):
    raise ValueError(
      f"params/{path} has shape {shape}, fewer axes than its sharding {spec} has entries"
    )
  for axis, (d, e) in enumerate(zip(shape, spec_entries(spec, len(shape)))):
    if d % entry_size(mesh, e):
      raise ValueError(
        f"params/{path} has shape {shape}: axis {axis} ({d}) is not divisible by the "
        f"{entry_size(mesh, e)} devices of mesh axis {e!r} ({spec})"
      )


def _normalized(mesh, spec: PartitionSpec) -> PartitionSpec:
  """``spec`` as XLA returns it: mesh axes of size 1 dropped, no trailing ``None`` (an equal
  sharding, so a state a step returns is placed as the one it was given: one compilation)."""
  entries = []
  for entry in spec:
    names = tuple(n for n in _axis_names(entry) if mesh.shape[n] > 1)
    entries.append(None if not names else names if isinstance(entry, tuple) else names[0])
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def param_specs(mesh: Mesh, params, rules: ShardingRules | None) -> dict[str, PartitionSpec]:
  """``{path: PartitionSpec}`` for every leaf of ``params`` (paths as in the rules).

  Raises:
    ValueError: a rule naming an axis the mesh lacks, a rule that matches no parameter, a spec
      with more entries than its parameter has axes, or a split axis not divisible by its devices.
  """
  leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  specs, used = {}, set()
  if rules is not None:
    rules.check_mesh(mesh)
  for path, x in leaves.items():
    if path.rsplit("/", 1)[-1] in QUANTIZER_PARAMS or rules is None:
      continue
    pattern, spec = rules.match(path)
    if pattern is not None:
      used.add(pattern)
      _check_split(mesh, path, tuple(x.shape), spec)
      specs[path] = spec
  if rules is not None:
    unused = [p for p, _ in rules.patterns if p not in used]
    if unused:
      raise ValueError(
        f"sharding rule {unused[0]!r} matches no parameter (rules are matched against whole "
        f"paths such as {next(iter(leaves), '<none>')!r})"
      )
  for path, x in leaves.items():
    layer, _, name = path.rpartition("/")
    weight = _WEIGHT_OF_SCALE.get(name)
    source = f"{layer}/{weight}" if layer else weight
    if weight is not None and source in specs:
      w = leaves[source]
      specs[path] = follow_spec(mesh, specs[source], weight, w.shape, x.shape)
  return {path: _normalized(mesh, specs.get(path, PartitionSpec())) for path in leaves}


def _opt_state_shardings(opt_state, params, param_shardings, rep):
  """Each optimizer leaf whose path ends with a parameter's path and that has its shape takes
  that parameter's sharding (Adam's moments, momentum, ...); other leaves are replicated."""
  by_keys = {
    tuple(key_name(e) for e in p): (x.shape, s)
    for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_shardings)
    )
  }
  depths = sorted({len(k) for k in by_keys}, reverse=True)

  def pick(path, x):
    names = tuple(key_name(e) for e in path)
    for d in depths:
      shape, sharding = by_keys.get(names[-d:], (None, None))
      if d <= len(names) and shape == x.shape:
        return sharding
    return rep

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def state_shardings(mesh: Mesh, state, rules: ShardingRules | None = None):
  """A :class:`TrainState` of ``NamedSharding``\\ s: where each leaf of ``state`` lives on
  ``mesh`` (parameters by ``rules``, see the module notes; everything else replicated).

  Works on concrete and abstract states (shapes only).
  """
  rep = replicated(mesh)
  specs = param_specs(mesh, state.params, rules)
  params = jax.tree_util.tree_map_with_path(
    lambda p, _: NamedSharding(mesh, specs[path_str(p)]), state.params
  )
  everywhere = lambda tree: jax.tree.map(lambda _: rep, tree)
  return state.replace(
    step=rep,
    params=params,
    opt_state=_opt_state_shardings(state.opt_state, state.params, params, rep),
    quant_stats=everywhere(state.quant_stats),
    batch_stats=everywhere(state.batch_stats),
  )


def shard_state(mesh: Mesh, state, param_sharding=None):
  """``state`` placed on ``mesh``: parameters split by ``param_sharding``, quantizer state
  following its weight, the rest replicated (see ``qatjax/training/_sharding.py``).

  Leaves already placed so are passed through. With several processes every process passes the
  same values (same seed / same checkpoint). ``make_train_step(mesh=..., param_sharding=...)``
  calls it on every step; call it yourself for a restore target (:func:`restore_checkpoint`).

  Args:
    mesh: e.g. :func:`data_model_mesh`.
    state: a :class:`TrainState`.
    param_sharding: ``{regex: PartitionSpec}`` or :class:`ShardingRules`; ``None`` replicates.

  Raises:
    ValueError: a rule naming an axis the mesh lacks, a rule matching no parameter, or a
      parameter whose shape the rule cannot split (naming the path, the axis and the shape).

  Example:
    >>> import optax
    >>> from jax.sharding import PartitionSpec as P
    >>> from qatjax import QDense, QuantConfig
    >>> from qatjax.training import create_train_state, data_model_mesh, shard_state
    >>> s = create_train_state(QDense(4, config=QuantConfig(method="lsq")), optax.adam(1e-3),
    ...                        jax.random.key(0), jnp.ones((1, 3)))
    >>> mesh = data_model_mesh(1, jax.devices()[:1])
    >>> s = shard_state(mesh, s, {".*kernel": P(None, "model")})
    >>> s.params["kernel"].sharding.mesh.axis_names
    ('data', 'model')
  """
  rules = None if param_sharding is None else sharding_rules(param_sharding)
  shardings = state_shardings(mesh, state, rules)
  return jax.tree.map(put, state, shardings)
