"""The one registry of variable names the quantized ops create and of the layer kinds they serve.

Everything that has to tell a quantizer leaf from a weight (``from_float``, the optimizer labels,
``model_size``, ``convert``, the ONNX exporter) reads these tuples; none keeps its own list. A new
op that quantizes another operand adds its activation site here (one line).
"""

from __future__ import annotations

# Weight tensors a quantized op owns, by the parameter name of the Flax layer.
WEIGHTS = ("kernel", "embedding")

# Activation sites: the prefix of an activation quantizer's variables. "input" is a layer's input;
# attention's activation x activation products quantize query, key, probabilities and value.
ATTENTION_SITES = (("attn_q", "attn_k"), ("attn_p", "attn_v"))
ACT_SITES = ("input", *(site for pair in ATTENTION_SITES for site in pair))

# Recorded by an activation x activation op for ``convert``: the layer serves it in integers.
ATTENTION_MARKER = "attn_int8"
# Recorded by a BatchNorm that ``quantize_model`` folded into the convolution before it: after
# ``convert`` the BatchNorm is an identity (its shift is the conv's bias).
BN_FOLDED = "batch_norm_folded"

# Collections: observer statistics and switches; what ``convert`` collects from the ops.
STATS = "quant_stats"
RECORD = "quant_record"

# Per-layer switches in STATS (see ``qatjax.set_quant_flags``).
FLAGS = ("enabled", "observe", "bn_frozen")

# Layer kinds, the unit ``quantize_model``, ``convert`` and the ONNX exporter dispatch on.
KINDS = ("dense", "dense_general", "einsum", "conv", "conv_bn", "embed", "attention", "act")

# Recorded leaves that make a layer "converted" (its quantizer state is replaced by the record).
CONVERTED_MARKERS = (*WEIGHTS, ATTENTION_MARKER, BN_FOLDED)


def weight_scale(weight: str) -> str:
  """The learned step of ``weight`` (LSQ): ``"kernel_scale"``."""
  return f"{weight}_scale"


def act_leaf(site: str, what: str) -> str:
  """An activation quantizer's variable: ``act_leaf("input", "scale") == "input_scale"``."""
  return f"{site}_{what}"


# Learned quantizer parameters (in ``params``, trained with their own optimizer).
QUANTIZER_PARAMS = tuple(weight_scale(w) for w in WEIGHTS) + tuple(
  act_leaf(s, w) for s in ACT_SITES for w in ("scale", "zero_point", "alpha")
)

# Observer statistics (in STATS). ``<site>_count_from_float`` is the batch count ``from_float``
# left (0 from ``init``; the op never reads it): an observer whose count still equals it has seen
# no batch since, which ``convert`` and ``qatjax.training.evaluate`` report.
OBSERVER_STATS = tuple(
  act_leaf(s, w) for s in ACT_SITES for w in ("min", "max", "count", "count_from_float")
)

# Leaves that only serve (de)quantization in a converted model: input scales, zero points and bit
# widths, the kernels' zero-point correction sums, and the learned quantizer parameters.
QUANT_METADATA = tuple(
  dict.fromkeys(
    QUANTIZER_PARAMS
    + tuple(f"{w}_sum" for w in WEIGHTS)
    + tuple(act_leaf(s, w) for s in ACT_SITES for w in ("scale", "zero_point", "bits"))
    + (ATTENTION_MARKER, BN_FOLDED)
  )
)


def is_quantizer_param(name: str) -> bool:
  """Whether a ``params`` leaf named ``name`` is a learned quantizer parameter.

  Example:
    >>> from qatjax.ops.registry import is_quantizer_param
    >>> is_quantizer_param("kernel_scale"), is_quantizer_param("bn_scale")
    (True, False)
  """
  return name in QUANTIZER_PARAMS
