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
and the target is left as it was. A process killed outright can leave a
temporary file behind; :func:`remove_stale_temps` clears them.
"""
from __future__ import annotations

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
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(_TEMP_HEX_DIGITS // 2)}.tmp")
    # 0o666 leaves the permissions to the umask, as for any new file; O_EXCL
    # never reuses another writer's temporary file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    handle = os.open(temporary, flags, 0o666)
    try:
        mode, encoding = ("wb", None) if binary else ("w", "utf-8")
        with open(handle, mode, encoding=encoding) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        raise
    if os.name == "posix":  # the rename itself is on disk too; Windows cannot fsync a folder
        folder_handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_handle)
        finally:
            os.close(folder_handle)


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
