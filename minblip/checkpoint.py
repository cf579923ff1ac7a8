"""Checkpoints: one ``.npz`` file with the model, the optimiser and the run's state.

Layout of the archive (every entry a plain NumPy array; nothing is pickled):

==========================  ===============================================
``__format__``              the marker string ``"minblip-checkpoint"``
``__version__``             the format version (int64 scalar)
``step``                    the training step (int64 scalar)
``config``                  the model/run configuration as JSON text
``extra``                   free JSON state, e.g. random-generator states
``param/<name>``            every Param by its ``named_params()`` name
``optim/<key>``             the optimiser's ``state_dict()`` (optional)
==========================  ===============================================

A tied Param appears once, under the first name ``named_params`` gives it, and
loading writes into the existing Param objects, so ties survive a round trip.

Saving is atomic (:func:`minblip.files.write_atomic`): the archive is written to
a temporary file in the same folder, flushed to disk, then renamed over ``path``.
A crash at any point leaves either the old checkpoint or the new one, never a
torn file.
Loading checks everything (format, version, configuration, names, shapes,
optimiser state) before it changes anything. Every array's ``.npy`` header is
read first and must account for exactly the bytes the archive stores, so a
forged header cannot make NumPy allocate more than the file holds;
:func:`read_header` gives the configuration and the stored shapes without
reading any array, so a caller can check a configuration before building a
model from it. NaN or inf weights are neither saved nor loaded.
"""
from __future__ import annotations

import errno
import json
import math
import os
import zipfile

import numpy as np

from .core import Module, nonfinite_params
from .files import write_atomic
from .optim import AdamW

FORMAT_MARKER = "minblip-checkpoint"
FORMAT_VERSION = 1
_PARAM = "param/"
_OPTIM = "optim/"
# A stored configuration is a few hundred bytes of JSON; anything far larger is
# not one, and is refused before it is read.
_MAX_CONFIG_BYTES = 1 << 20


def _to_json(value, what: str) -> str:
    """JSON text of ``value``; NumPy scalars and arrays become numbers and lists."""
    def plain(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
    try:
        return json.dumps(value, default=plain, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable (dicts, lists, str, numbers): {e}") from None


def _flatten(d, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so a config difference names the nested key."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_checkpoint(path, model: Module, config: dict, step: int,
                    optimizer: AdamW | None = None, extra: dict | None = None,
                    include_frozen: bool = False) -> None:
    """Write ``model`` (and optionally ``optimizer``) to the ``.npz`` file ``path``, atomically.

    The model's trainable Params are stored; ``include_frozen=True`` stores its
    frozen ones too (a whole model, e.g. BLIP-2 with its frozen ViT and LM).

    ``config`` (a dict) and ``extra`` (a dict or None, e.g.
    ``{"rng": rng_state(rng)}``) must be JSON-serialisable; they are stored as
    JSON text in a NumPy unicode array. ``step`` is the number of training
    steps taken. An existing file at ``path`` is replaced only once the new
    one is complete on disk.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a Module, got {type(model).__name__}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    if optimizer is not None and not isinstance(optimizer, AdamW):
        raise TypeError(f"optimizer must be an AdamW or None, got {type(optimizer).__name__}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")

    arrays = {
        "__format__": np.array(FORMAT_MARKER),
        "__version__": np.array(FORMAT_VERSION, dtype=np.int64),
        "step": np.array(step, dtype=np.int64),
        "config": np.array(_to_json(config, "config")),
        "extra": np.array(_to_json(extra, "extra")),
    }
    named = model.named_params(include_frozen=include_frozen)
    optim_state = optimizer.state_dict() if optimizer is not None else {}
    bad = nonfinite_params(named) + nonfinite_params(
        (f"optimiser {key}", value) for key, value in optim_state.items())
    if bad:
        raise ValueError(f"not writing the checkpoint {os.fspath(path)} (step {step}): NaN or "
                         f"inf in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                         f"the file on disk, if any, is unchanged")
    for name, p in named:
        arrays[_PARAM + name] = p.data
    for key, value in optim_state.items():
        arrays[_OPTIM + key] = value

    write_atomic(path, lambda file: np.savez(file, **arrays))


def _unreadable(path, err) -> ValueError:
    return ValueError(
        f"{path}: cannot read the checkpoint: the file is truncated, corrupt or not "
        f"a .npz archive ({type(err).__name__}: {err})")


def _array_headers(path: str) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (shape, dtype)} of every array in the ``.npz`` at ``path``, read from
    the zip directory and each ``.npy`` header only: no array data is read.

    Each header must account for exactly the bytes stored for it (shape
    product times item size, in Python integers: no overflow), and no array
    may hold Python objects; a ValueError names the file and the key.
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            magic = file.read(6)
        if magic == b"\x93NUMPY":
            raise ValueError(f"{path}: not a minblip checkpoint (a single .npy array, not a .npz)")
        raise _unreadable(path, ValueError("not a zip archive"))
    entries = []  # (archive key, shape, dtype, bytes stored after the header)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(member)
                    key = info.filename.removesuffix(".npy")
                    entries.append((key, shape, dtype, info.file_size - member.tell()))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise _unreadable(path, err) from None
    headers = {}
    for key, shape, dtype, stored in entries:
        if dtype.hasobject:
            raise ValueError(f"{path}: array {key!r} holds Python objects ({dtype}); "
                             f"checkpoints hold plain numbers and text only")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != stored:
            raise ValueError(f"{path}: array {key!r}: its header says shape {shape} {dtype} "
                             f"({nbytes:,} bytes), the archive stores {stored:,} bytes")
        headers[key] = (shape, dtype)
    return headers


def _read_archive(path: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, or a ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    _array_headers(path)  # every header fits the bytes stored: no allocation beyond the file
    try:
        with np.load(path, allow_pickle=False) as archive:
            # reading every member now checks every CRC before anything is used
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise _unreadable(path, e) from None


def _config_diff(expected: dict, found: dict) -> list[str]:
    exp = _flatten(json.loads(_to_json(expected, "config")))  # same JSON normalisation as saving
    got = _flatten(found)
    return [f"{k}: expected {exp.get(k, '<absent>')!r}, found {got.get(k, '<absent>')!r}"
            for k in sorted(set(exp) | set(got))
            if k not in exp or k not in got or exp[k] != got[k]]


def load_checkpoint(path, model: Module, config: dict | None = None,
                    optimizer: AdamW | None = None, include_frozen: bool = False) -> dict:
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``) in place.
    ``include_frozen`` must be what the checkpoint was saved with: True when it
    holds the model's frozen Params too.

    Checks, in order, and raises before changing anything:

    * the file exists (FileNotFoundError) and is a complete, readable ``.npz``;
    * it carries the minblip format marker and a supported version;
    * if ``config`` is given, it equals the stored configuration (compared
      after the JSON round trip; the message lists every differing key);
    * the stored Params are exactly the model's ``named_params(include_frozen)``
      names with the same shapes (the message lists missing, unexpected and
      mismatched);
    * if ``optimizer`` is given, the stored optimiser state fits it.

    Then every value is written into the existing arrays (``p.data[...] =``),
    so each Param keeps its dtype, identity and ties.

    Returns ``{"step": int, "config": dict, "extra": dict | None}``.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, AdamW):
        raise TypeError(f"optimizer must be an AdamW or None, got {type(optimizer).__name__}")
    path = os.fspath(path)
    data = _read_archive(path)

    marker = data.get("__format__")
    if marker is None or marker.dtype.kind != "U" or str(marker) != FORMAT_MARKER:
        raise ValueError(
            f"{path}: not a minblip checkpoint (no {FORMAT_MARKER!r} marker); "
            f"it holds {sorted(data)[:8]}")
    version = data.get("__version__")
    if version is None or version.shape != () or int(version) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version}, this minblip reads "
            f"version {FORMAT_VERSION}")
    try:
        stored_config = json.loads(str(data["config"]))
        extra = json.loads(str(data["extra"]))
        step = int(data["step"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({type(e).__name__}: {e})") from None

    if config is not None:
        diff = _config_diff(config, stored_config)
        if diff:
            raise ValueError(
                f"{path}: the checkpoint was saved with another configuration: "
                + "; ".join(diff))

    named = model.named_params(include_frozen=include_frozen)
    stored = {k[len(_PARAM):]: v for k, v in data.items() if k.startswith(_PARAM)}
    names = [name for name, _ in named]
    missing = [n for n in names if n not in stored]
    unexpected = sorted(set(stored) - set(names))
    mismatched = [f"{n}: model {p.shape}, checkpoint {stored[n].shape} {stored[n].dtype}"
                  for n, p in named if n in stored
                  and (stored[n].shape != p.shape or not np.issubdtype(stored[n].dtype, np.floating))]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: the checkpoint does not fit the model: missing {missing}, "
            f"unexpected {unexpected}, shape mismatch {mismatched}")

    if optimizer is not None:
        optim_state = {k[len(_OPTIM):]: v for k, v in data.items() if k.startswith(_OPTIM)}
        if not optim_state:
            raise ValueError(f"{path}: the checkpoint holds no optimiser state")
        try:
            optimizer.validate_state_dict(optim_state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    bad = nonfinite_params((n, stored[n]) for n in names) + nonfinite_params(
        (f"optimiser {k}", v) for k, v in (optim_state.items() if optimizer is not None else ()))
    if bad:
        raise ValueError(f"{path}: NaN or inf in {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}: these weights are unusable (a "
                         f"run that diverged writes such values); use an earlier checkpoint")

    for name, p in named:
        p.data[...] = stored[name]
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    return {"step": step, "config": stored_config, "extra": extra}


def read_header(path) -> dict:
    """What the checkpoint at ``path`` holds, without reading its weights:
    ``{"config": dict, "step": int, "arrays": {key: (shape, dtype)}}``, the
    arrays by their archive keys (``param/<name>``, ``optim/<key>``, ...).

    Only the zip directory, the ``.npy`` headers and the small metadata arrays
    are read, so a caller can check a stored configuration against the stored
    shapes, in milliseconds, before it builds anything from it. Raises
    FileNotFoundError, or a ValueError naming the file: not a minblip
    checkpoint, another format version, a header that does not fit its bytes,
    a configuration that is not a JSON object.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a folder, not a checkpoint file", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    arrays = _array_headers(path)
    for key, kind in (("__format__", "U"), ("__version__", "i"), ("step", "i"), ("config", "U")):
        if key not in arrays or arrays[key][0] != () or arrays[key][1].kind != kind:
            raise ValueError(f"{path}: not a minblip checkpoint (no scalar {key!r}); it holds "
                             f"{sorted(arrays)[:8]}")
    if arrays["config"][1].itemsize > _MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: its stored config is {arrays['config'][1].itemsize:,} bytes, "
                         f"more than any configuration ({_MAX_CONFIG_BYTES:,})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            marker, version = str(archive["__format__"]), int(archive["__version__"])
            step, text = int(archive["step"]), str(archive["config"])
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise _unreadable(path, e) from None
    if marker != FORMAT_MARKER:
        raise ValueError(f"{path}: not a minblip checkpoint (marker {marker!r})")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version}, this minblip reads "
                         f"version {FORMAT_VERSION}")
    try:
        config = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: its stored config is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its stored config must be a JSON object of options, got "
                         f"{type(config).__name__}")
    return {"config": config, "step": step, "arrays": arrays}


def read_config(path) -> dict:
    """The configuration stored in the checkpoint at ``path``, without loading its
    weights (:func:`read_header`); a FileNotFoundError or a ValueError naming
    the file otherwise."""
    return read_header(path)["config"]


def rng_state(rng: np.random.Generator) -> dict:
    """The state of a NumPy Generator as a JSON-serialisable dict (for ``extra``)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng_state expects a np.random.Generator, got {type(rng).__name__}")
    # MT19937 keeps its key as an array; PCG64 (the default) has plain ints only
    return json.loads(_to_json(rng.bit_generator.state, "generator state"))


_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def rng_from_state(state: dict) -> np.random.Generator:
    """A new Generator continuing exactly where the one ``rng_state`` saw left off."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise ValueError(
            f"generator state must name one of {list(_BIT_GENERATORS)} under 'bit_generator', "
            f"got {name!r}")
    bit_generator = getattr(np.random, name)()
    if name == "MT19937":
        state = {**state, "state": {**state["state"],
                                    "key": np.asarray(state["state"]["key"], dtype=np.uint32)}}
    bit_generator.state = state
    return np.random.Generator(bit_generator)
