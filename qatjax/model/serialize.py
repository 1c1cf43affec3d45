"""``save_quantized`` / ``load_quantized``: converted variables in one self-describing file.

File layout (all integers little-endian)::

  bytes 0..7    magic  b"\\x89QATJAX\\n"
  bytes 8..11   uint32 format version (1 or 2, see below)
  bytes 12..19  uint64 length H of the header
  H bytes       header, UTF-8 JSON:
                  {"data_bytes": N, "crc32": <of the data section>,
                   "entries": [{"path": [...], "kind": "array", "dtype", "shape", "offset",
                                "nbytes"} |
                               {"path": [...], "kind": "qarray", "shape", "bits", "axis",
                                "group_size", "perm", "values": {...}, "scale": {...},
                                "zero_point": {...}}],
                   "empty": [paths of empty dicts]}
  N bytes       data: every array's raw bytes (C order, little-endian), one after the other

It is safetensors-like: arrays are stored bit for bit (int8 and packed-uint8 kernels, float32
scales, int32 kernel sums...), so a round trip is exact, and the header carries what a
:class:`QArray` keeps outside its arrays (``shape``, ``bits``, ``axis``, ``group_size``). The file
can be read with numpy alone. (``perm``: the QArray's storage order, see :class:`QArray`.)

Versions: in version 2 a 2-bit QArray's ``values`` hold four values per byte (3- and 4-bit ones
two per byte, as in version 1); version 1 stored 2-bit values two per byte. A file is written as
version 1 unless it holds a 2-bit QArray, so older readers still read every file they can
represent; version 1 files load, their 2-bit kernels repacked four per byte.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from qatjax.core.qarray import QArray, pack_bits, storage_bits, unpack_bits
from qatjax.model.nnx_variables import as_variables

MAGIC = b"\x89QATJAX\n"
VERSION = 2  # the newest version this module reads and writes (see the module docstring)
_PREFIX = struct.Struct("<8sIQ")


def _leaf_array(a, where):
  if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended):
    raise ValueError(f"save_quantized: {where} has dtype {a.dtype}, which cannot be saved")
  if not isinstance(a, (jax.Array, np.ndarray, np.generic, bool, int, float)):
    raise ValueError(
      f"save_quantized: {where} is a {type(a).__name__}; only arrays, QArrays "
      "and nested dicts can be saved"
    )
  a = np.asarray(a)
  if a.dtype == object:
    raise ValueError(f"save_quantized: {where} is an object array")
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  return a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (keeps 0-d arrays 0-d)


def save_quantized(path, qvars) -> None:
  """Writes converted variables (nested dicts of arrays and :class:`QArray`) to one file.

  See the module docstring for the format. The file is written to ``path + ".tmp"`` first and
  renamed, so an interrupted save never leaves a truncated ``path``.

  Args:
    path: file name (str or ``os.PathLike``).
    qvars: the variables, e.g. from :func:`qatjax.convert` (float variables work too), or an
      NNX model (e.g. from :func:`qatjax.nnx.convert`; read back into one with
      :func:`qatjax.nnx.load_variables`).

  Raises:
    ValueError: naming a leaf that is neither an array nor a QArray, or a non-string key.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> layer = QDense(3, config=QuantConfig(weight_bits=4))
    >>> x = jnp.ones((2, 5))
    >>> v = layer.init(jax.random.key(0), x)
    >>> _, stats = layer.apply(v, x, mutable=["quant_stats"])
    >>> qv = convert(layer, {**v, **stats}, x)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.qjx")
    >>> save_quantized(path, qv)
    >>> back = load_quantized(path)
    >>> back["params"]["kernel"].bits, bool((back["params"]["kernel"].values ==
    ...                                      qv["params"]["kernel"].values).all())
    (4, True)
  """
  entries, empty, chunks = [], [], []
  offset = 0

  def add(a, where):
    nonlocal offset
    a = _leaf_array(a, where)
    raw = a.tobytes()
    chunks.append(raw)
    spec = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset, "nbytes": len(raw)}
    offset += len(raw)
    return spec

  def walk(node, keys):
    where = "/".join(keys) or "<root>"
    if isinstance(node, QArray):
      entries.append(
        {
          "path": keys,
          "kind": "qarray",
          "shape": list(node.shape),
          "bits": int(node.bits),
          "axis": node.axis,
          "group_size": node.group_size,
          "perm": None if node.perm is None else list(node.perm),
          **{f: add(getattr(node, f), f"{where}.{f}") for f in ("values", "scale", "zero_point")},
        }
      )
    elif hasattr(node, "items"):
      if not len(node):
        empty.append(keys)
      for k, v in node.items():
        if not isinstance(k, str):
          raise ValueError(f"save_quantized: key {k!r} under {where} is not a string")
        walk(v, keys + [k])
    else:
      entries.append({"path": keys, "kind": "array", **add(node, where)})

  qvars = as_variables(qvars)
  if not hasattr(qvars, "items"):
    raise ValueError(
      f"save_quantized: qvars must be a dict of collections, got {type(qvars).__name__}"
    )
  walk(qvars, [])
  data = b"".join(chunks)
  header = json.dumps(
    {"data_bytes": len(data), "crc32": zlib.crc32(data), "entries": entries, "empty": empty},
    separators=(",", ":"),
  ).encode()
  path = os.fspath(path)
  tmp = path + ".tmp"
  version = 2 if any(e["kind"] == "qarray" and storage_bits(e["bits"]) == 2 for e in entries) else 1
  with open(tmp, "wb") as f:
    f.write(_PREFIX.pack(MAGIC, version, len(header)))
    f.write(header)
    f.write(data)
  os.replace(tmp, path)


def _repack_v1_int2(values, shape):
  """A version-1 file's 2-bit values (two per byte) packed four per byte, as :class:`QArray`
  stores them now (the flat order is the same)."""
  return pack_bits(unpack_bits(values, (int(np.prod(shape, dtype=np.int64)),), 4), 2)


def _bad(path, why):
  return ValueError(f"{path} is not a qatjax quantized-variables file: {why}")


def load_quantized(path) -> dict:
  """Reads a file written by :func:`save_quantized`; the result runs with ``model.apply``.

  Arrays come back as ``jax.Array`` with the saved dtype and bits (64-bit arrays stay numpy when
  JAX runs without x64), QArrays with their ``shape`` / ``bits`` / ``axis`` / ``group_size``.

  Raises:
    ValueError: naming the file when it is missing, not such a file (magic), from a newer format
      version, truncated, or corrupt (checksum or header mismatch).

  Example:
    >>> import os, tempfile
    >>> qa = QArray.create(jnp.array([[1, -2], [0, 1]], jnp.int8), jnp.float32(0.25), bits=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "w2.qjx")
    >>> save_quantized(path, {"params": {"kernel": qa, "bias": jnp.zeros(2)}})
    >>> back = load_quantized(path)["params"]
    >>> back["kernel"].bits, back["kernel"].unpack().tolist(), back["bias"].dtype
    (2, [[1, -2], [0, 1]], dtype('float32'))
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"quantized-variables file not found: {path}")
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < _PREFIX.size:
    raise _bad(path, f"only {len(blob)} bytes, shorter than the {_PREFIX.size}-byte prefix")
  magic, version, hlen = _PREFIX.unpack_from(blob)
  if magic != MAGIC:
    raise _bad(path, f"magic bytes {magic!r}, expected {MAGIC!r}")
  if version > VERSION or version < 1:
    raise ValueError(
      f"{path} has format version {version}; this qatjax reads versions 1 to {VERSION} "
      "(upgrade qatjax)"
    )
  start = _PREFIX.size
  if start + hlen > len(blob):
    raise ValueError(
      f"{path} is truncated: the header needs {hlen} bytes, the file has "
      f"{len(blob) - start} after the prefix"
    )
  try:
    header = json.loads(blob[start : start + hlen].decode())
    entries, n, crc = header["entries"], header["data_bytes"], header["crc32"]
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise _bad(path, f"unreadable header ({e})") from None
  data = memoryview(blob)[start + hlen :]
  if len(data) != n:
    raise ValueError(f"{path} is truncated or padded: {len(data)} data bytes, the header says {n}")
  if zlib.crc32(data) != crc:
    raise ValueError(f"{path} is corrupt: data checksum mismatch")

  def array(spec, where):
    try:
      dtype = np.dtype(jnp.dtype(spec["dtype"]))
      shape = tuple(int(d) for d in spec["shape"])
      off, nbytes = int(spec["offset"]), int(spec["nbytes"])
      if (
        off < 0
        or off + nbytes > n
        or nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      ):
        raise ValueError("offset / size out of range")
      a = (
        np.frombuffer(data, dtype, count=nbytes // dtype.itemsize, offset=off).reshape(shape).copy()
      )
    except (KeyError, TypeError, ValueError) as e:
      raise _bad(path, f"bad entry {where} ({e})") from None
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
      return a
    return jnp.asarray(a)

  out: dict = {}

  def put(keys, value):
    if not keys or not all(isinstance(k, str) for k in keys):
      raise _bad(path, f"bad entry path {keys!r}")
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value

  for e in entries:
    keys = e.get("path")
    where = "/".join(map(str, keys or []))
    if e.get("kind") == "qarray":
      try:
        values = array(e["values"], where + ".values")
        if version == 1 and storage_bits(int(e["bits"])) == 2:
          values = _repack_v1_int2(values, e["shape"])
        qa = QArray(
          values,
          array(e["scale"], where + ".scale"),
          array(e["zero_point"], where + ".zero_point"),
          tuple(e["shape"]),
          int(e["bits"]),
          e["axis"],
          e["group_size"],
          None if e.get("perm") is None else tuple(e["perm"]),
        )
      except KeyError as err:
        raise _bad(path, f"entry {where} lacks {err}") from None
      put(keys, qa)
    elif e.get("kind") == "array":
      put(keys, array(e, where))
    else:
      raise _bad(path, f"entry {where} has unknown kind {e.get('kind')!r}")
  for keys in header.get("empty", []):
    node = out
    for k in keys:
      node = node.setdefault(k, {})
  return out
