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
optimiser state) before it changes anything.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from .core import Module
from .files import write_atomic
from .optim import AdamW

FORMAT_MARKER = "minblip-checkpoint"
FORMAT_VERSION = 1
_PARAM = "param/"
_OPTIM = "optim/"


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
    for name, p in model.named_params(include_frozen=include_frozen):
        arrays[_PARAM + name] = p.data
    if optimizer is not None:
        for key, value in optimizer.state_dict().items():
            arrays[_OPTIM + key] = value

    write_atomic(path, lambda file: np.savez(file, **arrays))


def _read_archive(path: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, or a ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
        if isinstance(archive, np.lib.npyio.NpzFile):
            with archive:
                # reading every member now checks every CRC before anything is used
                return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ValueError(
            f"{path}: cannot read the checkpoint: the file is truncated, corrupt or not "
            f"a .npz archive ({type(e).__name__}: {e})") from None
    raise ValueError(f"{path}: not a minblip checkpoint (a single .npy array, not a .npz)")


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

    for name, p in named:
        p.data[...] = stored[name]
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    return {"step": step, "config": stored_config, "extra": extra}


def read_config(path) -> dict:
    """The configuration stored in the checkpoint at ``path``, without loading its
    weights; a FileNotFoundError or a ValueError naming the file otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"'{path}' is not a readable checkpoint: the file is truncated, corrupt "
                         f"or not a .npz archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"'{path}' is a single array, not a minblip checkpoint")
    with archive:
        if "config" not in archive.files:
            raise ValueError(f"'{path}' is not a minblip checkpoint (no config)")
        try:
            return json.loads(str(archive["config"]))
        except ValueError as err:
            raise ValueError(f"'{path}': its stored config is not valid JSON ({err})") from None


def read_shapes(path) -> dict[str, tuple[tuple, np.dtype]]:
    """The name, shape and dtype of every array in the ``.npz`` at ``path``, read from
    the archive's directory and each array's ``.npy`` header, without reading any
    array: what a loader checks against a configuration before it allocates a
    model. An array whose header announces more bytes than its member holds (a
    truncated or forged file) raises a ValueError naming it, as does a file that
    is not a readable ``.npz``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not a .npy array")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = reader(member)
                    header_bytes = member.tell()
                if dtype.hasobject:
                    raise ValueError(f"array {info.filename!r} holds Python objects "
                                     f"(minblip stores plain numbers only)")
                needed = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if info.file_size != needed:
                    raise ValueError(f"array {info.filename!r} announces shape {shape} "
                                     f"{dtype} ({needed} bytes with its header) but holds "
                                     f"{info.file_size} bytes")
                shapes[info.filename[:-len(".npy")]] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the checkpoint: the file is truncated, corrupt "
                         f"or not a .npz archive ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a valid minblip checkpoint: {e}") from None
    return shapes


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
