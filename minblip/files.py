"""Writing files atomically: a reader sees the old file or the new one, never half of one.

The package's writers (checkpoints, safetensors, configurations and
vocabularies, tokenizers, report JSON, JSON lines and figures, the world's PNGs
and captions) all go through :func:`write_atomic`:

1. the bytes go to a temporary file ``.<name>.<16 hex digits>.tmp`` in the
   folder of the target, so the final rename stays within one file system;
2. the temporary file is flushed and fsynced, so its bytes are on disk before a
   name points at them;
3. ``os.replace`` renames it over the target, and on POSIX the folder is
   fsynced, so the rename itself survives a power cut.

The temporary file is created with mode ``0o666`` minus the umask, the mode of
any file the process creates with ``open``, never ``tempfile.mkstemp``'s private
``0o600``. If the write fails or is interrupted, the temporary file is removed
and the target is left as it was; an OSError about the temporary file (a
full disk, a read-only folder) names the target. A process killed outright can
leave a temporary file behind; :func:`remove_stale_temps` clears them.

:func:`probe_writable` writes and removes such a temporary file before a long
job starts, so a folder that cannot take the job's result fails at once.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
from typing import Callable

_TEMP_HEX_DIGITS = 16


def write_atomic(path, write: Callable, *, binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it over ``path``.

    ``path`` is a str or path-like; its folder must exist. ``file`` is open for
    writing bytes, or UTF-8 text with ``binary=False``. Whatever ``write``
    returns is ignored. When ``write`` (or anything after it) raises, the
    temporary file is removed, ``path`` is untouched and the error propagates.
    """
    if not callable(write):
        raise TypeError(f"write must be a callable taking an open file, got {type(write).__name__}")
    temporary, handle = _open_temporary(path)
    try:
        mode, encoding = ("wb", None) if binary else ("w", "utf-8")
        with open(handle, mode, encoding=encoding) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        _raise_naming(err, path, temporary)
    if os.name == "posix":  # the rename itself is on disk too; Windows cannot fsync a folder
        folder_handle = os.open(os.path.dirname(temporary), os.O_RDONLY)
        try:
            os.fsync(folder_handle)
        finally:
            os.close(folder_handle)


def _open_temporary(path) -> tuple[str, int]:
    """A new temporary file ``.<name>.<16 hex digits>.tmp`` next to ``path``:
    (its path, an open writable handle)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(_TEMP_HEX_DIGITS // 2)}.tmp")
    # 0o666 leaves the permissions to the umask, as for any new file; O_EXCL
    # never reuses another writer's temporary file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        return temporary, os.open(temporary, flags, 0o666)
    except OSError as err:
        _raise_naming(err, path, temporary)


def _raise_naming(err: BaseException, path, temporary: str):
    """Re-raise ``err``; an OSError about the temporary file, or about no file (a
    full disk during ``write``), as the same error about ``path``: the name the
    caller knows."""
    if (isinstance(err, OSError) and err.errno is not None
            and err.filename in (None, temporary)):
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from err
    raise err


def probe_writable(path, nbytes: int = 1) -> None:
    """Check now that ``path`` can be written, as :func:`write_atomic` will write it:
    create its folder (and parents) if needed, write ``nbytes`` zero bytes to a
    temporary file beside it, fsync, and remove it. A read-only or full disk, a
    folder without write permission or a path through a file raises the OSError
    here, naming ``path``, before any work whose result would be lost. A probe
    killed halfway leaves a temporary file that :func:`remove_stale_temps`
    (``path``) removes. ``path`` itself is never created or changed."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", folder)
    os.makedirs(folder, exist_ok=True)  # an error names the part of the path that failed
    temporary, handle = _open_temporary(path)
    try:
        with open(handle, "wb") as file:
            chunk = bytes(min(nbytes, 1 << 20))
            for start in range(0, nbytes, len(chunk) or 1):
                file.write(chunk[:nbytes - start])
            file.flush()
            os.fsync(file.fileno())  # a delayed allocation fails here on a full disk
    except OSError as err:
        _raise_naming(err, path, temporary)
    finally:
        os.remove(temporary)


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically."""
    write_atomic(path, lambda file: file.write(data))


def write_text_atomic(path, text: str, encoding: str = "utf-8") -> None:
    """Write the str ``text`` to ``path`` atomically, encoded with ``encoding``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` to ``path`` atomically as JSON: keys sorted, indented by two
    spaces, ASCII only (other characters escaped), one trailing newline."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path, records) -> None:
    """Write ``records`` (an iterable of JSON-ready objects) to ``path`` atomically,
    one ``json.dumps`` line each (keys in their order, ASCII only)."""
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def remove_stale_temps(path) -> list[str]:
    """Remove the temporary files an interrupted :func:`write_atomic` of ``path`` left.

    Only names of the exact form ``.<name of path>.<16 hex digits>.tmp`` in the
    folder of ``path`` are removed: never ``path`` itself, nor the temporary
    files of another target. Call it when nothing else is writing ``path``.
    Returns the removed paths, sorted; a missing folder removes nothing.
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{{_TEMP_HEX_DIGITS}}}\.tmp")
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return []
    removed = []
    for entry in sorted(entries):
        candidate = os.path.join(folder, entry)
        if pattern.fullmatch(entry) and os.path.isfile(candidate):
            try:
                os.remove(candidate)
            except FileNotFoundError:
                continue
            removed.append(candidate)
    return removed
