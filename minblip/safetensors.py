"""The safetensors checkpoint format in NumPy: read memory-mapped, write atomically.

A safetensors file is::

    8 bytes        N, the header length, unsigned little-endian
    N bytes        a JSON object, UTF-8, padded with spaces:
                     {"__metadata__": {str: str}   (optional)
                      "<name>": {"dtype": "F32", "shape": [2, 16],
                                 "data_offsets": [begin, end]}, ...}
    the rest       the raw tensor bytes, little-endian, C order; tensor <name>
                   is bytes [begin, end) of this part, and the tensors tile it
                   exactly (no gaps, no overlaps)

Nothing in it is executed on reading (a ``pytorch_model.bin`` is a pickle).

Reading without a copy of the file
----------------------------------
:class:`SafetensorsFile` reads only the header when it opens a file. A tensor's
bytes are reached through ``np.memmap``: the operating system maps that part of
the file into the address space and pages it in as it is read, so the file is
never held in memory as a whole, and no second copy of it is made. A tensor
already stored in the working dtype is used in place
(:meth:`SafetensorsFile.tensor` returns the map itself, copy-on-write: the
model's values *are* the file's pages, read when first used, as transformers
does). Any other is converted once, straight from the mapped bytes, into an
array of the working dtype (:meth:`~SafetensorsFile.read`, or
:meth:`~SafetensorsFile.read_into` into an existing array), and its mapping is
dropped again. Loading a model this way holds the model (in the working dtype)
plus one tensor's mapping at a time; reading the file into memory first and
converting it would hold the file, its conversion and the model. For BLIP-2
OPT-2.7b (7.8 GB in float16, 15.5 GB as float32) that is the difference
between fitting a 24 GB machine and not.

float16 is converted by NumPy; bfloat16, which NumPy lacks, is the upper half
of a float32, so it is widened by shifting its 16 bits into place.

The header is checked before any tensor is touched: a known dtype, a shape of
non-negative ints, byte ranges that match the shape (computed with Python
ints, so a shape like ``[2**32, 2**32]`` cannot overflow into a small size) and
that tile the data section, no name twice, and a header of at most
:data:`MAX_HEADER_BYTES` (the reference reader's limit).

Sharded checkpoints (``model.safetensors.index.json`` naming the file of each
tensor) are read by :class:`Checkpoint`, which presents one folder's tensors
as one mapping whatever the files.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import write_atomic

# dtype code -> little-endian dtype of the stored bytes (bfloat16 kept as its raw bits)
STORED = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype("<u2"), "I64": np.dtype("<i8")}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "I64": "int64"}
# the dtype a tensor is handed out in when none is asked for: half precision is widened
_DEFAULT = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
            "F16": np.dtype(np.float32), "BF16": np.dtype(np.float32),
            "I64": np.dtype(np.int64)}
_WRITE_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
                np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}
# The reference writer orders tensors by dtype (its enum order, larger first), then by
# name; following it makes our files byte-identical to safetensors.numpy.save_file.
_DTYPE_RANK = {"I64": 3, "F64": 2, "F32": 1, "F16": 0}
_HEADER_ALIGN = 8
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on N
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype code, shape, and the byte range inside the data section."""

    dtype: str
    shape: tuple
    begin: int
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def dtype_name(self) -> str:
        """The dtype as NumPy (and PyTorch) name it: "float16", "bfloat16", ..."""
        return _NAMES[self.dtype]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the header names {key!r} twice")
        out[key] = value
    return out


def _parse_entry(name, info, path: str) -> TensorInfo:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"safetensors file {path!r}: tensor {name!r} needs exactly "
                         f"dtype, shape and data_offsets, got {info!r}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if code not in STORED:
        raise ValueError(f"safetensors file {path!r}: tensor {name!r} has dtype {code}; "
                         f"minblip reads {sorted(STORED)}")

    def is_count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if (not isinstance(shape, list) or not all(is_count(s) for s in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(is_count(o) for o in offsets)):
        raise ValueError(f"safetensors file {path!r}: tensor {name!r} has a malformed "
                         f"shape {shape!r} or data_offsets {offsets!r}")
    begin, end = offsets
    # Python ints: [2**32, 2**32] is 2**64 elements here, never a wrapped-around 0
    want = math.prod(shape) * STORED[code].itemsize
    if end - begin != want:
        raise ValueError(f"safetensors file {path!r}: tensor {name!r} of shape {shape} and "
                         f"dtype {code} needs {want} bytes, its data_offsets {offsets} span "
                         f"{end - begin}")
    return TensorInfo(code, tuple(shape), begin, end)


class SafetensorsFile:
    """One safetensors file, opened by its header; tensors are read on demand.

    ``names`` lists the tensors in file order, ``info(name)`` gives a
    :class:`TensorInfo`, ``metadata`` the ``__metadata__`` dict. Opening checks
    the whole header (see the module docstring) and reads nothing else.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"safetensors file {self.path!r}: {size} bytes, too short for "
                                 f"the 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"safetensors file {self.path!r}: header length {n} exceeds "
                                 f"the limit of {MAX_HEADER_BYTES} bytes")
            if 8 + n > size:
                raise ValueError(f"safetensors file {self.path!r}: header length {n} exceeds "
                                 f"the file size {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"safetensors file {self.path!r}: the header is not valid "
                             f"UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"safetensors file {self.path!r}: the header must be a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str)
                                                     for v in metadata.values()):
            raise ValueError(f"safetensors file {self.path!r}: __metadata__ must map str to str")
        self.metadata = metadata
        self._start = 8 + n
        self._infos = {name: _parse_entry(name, info, self.path) for name, info in header.items()}
        position = 0
        for name, t in sorted(self._infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if t.begin != position:
                raise ValueError(f"safetensors file {self.path!r}: tensor {name!r} starts at "
                                 f"byte {t.begin}, expected {position} (gap or overlap)")
            position = t.end
        if position != size - self._start:
            raise ValueError(f"safetensors file {self.path!r}: the tensors cover {position} "
                             f"bytes of data, the file holds {size - self._start}")

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise KeyError(f"safetensors file {self.path!r} has no tensor {name!r}")
        return self._infos[name]

    def header(self) -> dict:
        """The header as stored: ``{name: {"dtype", "shape", "data_offsets"}}`` plus
        ``__metadata__`` when the file has one."""
        out = {"__metadata__": dict(self.metadata)} if self.metadata else {}
        for name, t in self._infos.items():
            out[name] = {"dtype": t.dtype, "shape": list(t.shape),
                         "data_offsets": [t.begin, t.end]}
        return out

    def mapped(self, name: str, copy_on_write: bool = False) -> np.ndarray:
        """The stored bytes of one tensor as a memory-mapped array of its stored
        dtype (bfloat16 as uint16 bits). Nothing is read until it is used; the
        mapping lasts as long as the array (or a view of it). Read-only, or with
        ``copy_on_write`` writable: a page written to becomes the process's own
        copy, and the file never changes."""
        t = self.info(name)
        stored = STORED[t.dtype]
        if t.size == 0:  # mmap cannot map zero bytes
            return np.empty(t.shape, stored)
        return np.memmap(self.path, dtype=stored, mode="c" if copy_on_write else "r",
                         offset=self._start + t.begin, shape=t.shape)

    def tensor(self, name: str, dtype=None) -> np.ndarray:
        """One tensor in ``dtype`` (default as :meth:`read`), writable, without a
        copy when the file already holds it in that dtype: then it is the file's
        copy-on-write memory map, paged in as it is used. Otherwise (another
        dtype, or bytes not aligned for their dtype) it is converted once, as
        :meth:`read` does."""
        t = self.info(name)
        want = _DEFAULT[t.dtype] if dtype is None or not t.is_float else np.dtype(dtype)
        if t.dtype != "BF16" and STORED[t.dtype] == want.newbyteorder("<"):
            mapped = np.asarray(self.mapped(name, copy_on_write=True))  # a plain ndarray view
            if mapped.flags.aligned and mapped.dtype.isnative:
                return mapped
        return self.read(name, want)

    def read(self, name: str, dtype=None) -> np.ndarray:
        """One tensor converted once into a fresh, writable, native-order array.
        ``dtype``: the float dtype to convert a float tensor to (default: F64 ->
        float64, F32/F16/BF16 -> float32); integer tensors stay int64."""
        t = self.info(name)
        want = _DEFAULT[t.dtype] if dtype is None or not t.is_float else np.dtype(dtype)
        out = np.empty(t.shape, want)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Convert one tensor straight from the mapped file into ``out`` (same
        shape, any float dtype for a float tensor), with no full-size temporary
        when ``out`` is float32 or the stored dtype converts directly."""
        t = self.info(name)
        if out.shape != t.shape:
            raise ValueError(f"safetensors file {self.path!r}: tensor {name!r} has shape "
                             f"{t.shape}, the destination {out.shape}")
        if t.is_float != (out.dtype.kind == "f"):
            raise TypeError(f"safetensors file {self.path!r}: tensor {name!r} ({t.dtype}) "
                            f"cannot be read into a {out.dtype} array")
        raw = self.mapped(name)
        if t.dtype != "BF16":
            np.copyto(out, raw, casting="unsafe")  # converts in small buffers as it copies
        elif out.dtype == np.float32:
            # bfloat16 bits are the top 16 bits of the float32 with the same value
            np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            wide = np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)
            np.copyto(out, wide, casting="unsafe")
        del raw  # drop the mapping now (a view of it would keep the file mapped)


def read_safetensors_header(path) -> dict:
    """The parsed JSON header of a safetensors file (tensor entries and
    ``__metadata__``), checked for a valid layout."""
    return SafetensorsFile(path).header()


def read_safetensors(path, dtype=None) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, by name, each a fresh, writable copy in
    native byte order (F64 -> float64, F32/F16/BF16 -> float32 unless ``dtype``
    says otherwise; I64 -> int64). Read through memory maps, one tensor at a time."""
    f = SafetensorsFile(path)
    return {name: f.read(name, dtype) for name in f.names}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: array}`` (float64, float32, float16 or int64) as a safetensors
    file, atomically (a temporary file in the same folder renamed over ``path``).

    ``metadata`` is an optional ``{str: str}`` stored as ``__metadata__``
    (PyTorch checkpoints carry ``{"format": "pt"}``).
    """
    path = os.fspath(path)
    entries = []
    for name, a in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"write_safetensors: invalid tensor name {name!r}")
        a = np.asarray(a)
        if a.dtype not in _WRITE_CODES:
            raise TypeError(f"write_safetensors: tensor {name!r} has dtype {a.dtype}; expected "
                            f"one of {[str(d) for d in _WRITE_CODES]}")
        entries.append((name, a, _WRITE_CODES[a.dtype]))
    entries.sort(key=lambda e: (-_DTYPE_RANK[e[2]], e[0]))
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("write_safetensors: metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, a, code in entries:
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _HEADER_ALIGN)  # pad so the data starts 8-byte aligned

    def write(file):
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)
        for _, a, _ in entries:
            file.write(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())

    write_atomic(path, write)


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder, one file or sharded.

    ``model.safetensors``, or ``model.safetensors.index.json`` whose
    ``weight_map`` names the shard of every tensor. Only headers are read when
    it opens; ``names``, ``info(name)``, ``read(name, dtype)``,
    ``tensor(name, dtype)`` and ``read_into(name, out)`` work as on
    :class:`SafetensorsFile`, across shards.
    The index and the shards' headers must agree exactly: each listed tensor
    in its shard, no tensor in a shard that the index does not list.
    """

    def __init__(self, directory):
        d = Path(directory)
        self.directory = d
        single, index = d / SINGLE_FILE, d / INDEX_FILE
        if single.is_file():
            f = SafetensorsFile(single)
            self.files = [f]
            self._where = {name: f for name in f.names}
            self.source = str(single)
            return
        if not index.is_file():
            if (d / "pytorch_model.bin").is_file():
                raise ValueError(f"{d}: only pytorch_model.bin, a pickle; minblip reads "
                                 f"safetensors only (convert it with safetensors.torch.save_file)")
            raise FileNotFoundError(f"{d}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.source = str(index)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ValueError(f"{index}: not a JSON object with a weight_map ({e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
        shards = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # a shard lives beside the index, nowhere else
                raise ValueError(f"{index}: shard {shard!r} is not a file name in {d}")
            if not (d / shard).is_file():
                raise FileNotFoundError(f"{index} lists shard {shard!r}, which is not in {d}")
            shards[shard] = SafetensorsFile(d / shard)
        self.files = list(shards.values())
        self._where = {}
        for shard, f in shards.items():
            listed = {n for n, s in weight_map.items() if s == shard}
            missing, extra = sorted(listed - set(f.names)), sorted(set(f.names) - listed)
            if missing or extra:
                raise ValueError(f"{index} and shard {shard!r} disagree: "
                                 + "; ".join(part for part in (
                                     f"listed but absent: {missing[:5]}" if missing else "",
                                     f"present but not listed: {extra[:5]}" if extra else "")
                                             if part))
            self._where.update({name: f for name in f.names})

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        if name not in self._where:
            raise KeyError(f"{self.source} has no tensor {name!r}")
        return self._where[name].info(name)

    def shapes(self) -> dict[str, tuple]:
        return {name: f.info(name).shape for name, f in self._where.items()}

    def read(self, name: str, dtype=None) -> np.ndarray:
        return self._where[name].read(name, dtype)

    def tensor(self, name: str, dtype=None) -> np.ndarray:
        return self._where[name].tensor(name, dtype)

    def read_into(self, name: str, out: np.ndarray) -> None:
        self._where[name].read_into(name, out)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in all the files."""
        return sum(f.info(n).end - f.info(n).begin for n, f in self._where.items())
