"""Hugging Face model names (``Salesforce/blip-image-captioning-base``) found in the
local cache, with no network.

``huggingface_hub`` (and so ``transformers``) keeps downloaded models in one
folder, the hub cache::

    <cache>/models--Salesforce--blip-image-captioning-base/
        refs/main                     the commit the name's "main" points to (a hash)
        snapshots/<hash>/config.json  the files of that commit (links into blobs/)
        snapshots/<hash>/model.safetensors
        blobs/...

The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (the
order huggingface_hub uses; ``$HUGGINGFACE_HUB_CACHE`` is its older name).
:func:`resolve_pretrained` turns a folder or a name into the folder to load;
only with ``download=True`` and the optional ``huggingface_hub`` installed does
it fetch a model that is not there, and then only the files minblip reads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# what minblip reads from a model repository (never a pickled pytorch_model.bin)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "vocab.txt", "merges.txt"]


def hub_cache() -> Path:
    """The hub cache folder huggingface_hub would use, from the environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_model_name(text: str) -> bool:
    """ORG/NAME, as the hub writes repository ids."""
    return bool(_NAME.match(text)) and ".." not in text


def cached_snapshot(name: str, revision: str = "main", cache=None) -> Path | None:
    """The snapshot folder of ``name`` at ``revision`` (a branch or tag with a file
    under ``refs/``, or a commit hash) in the hub cache, or None if it is not there."""
    root = Path(cache) if cache is not None else hub_cache()
    repo = root / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    if not re.fullmatch(r"[0-9a-fA-F]{7,64}", commit):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def resolve_pretrained(name_or_folder, *, download: bool = False,
                       revision: str = "main") -> Path:
    """A folder as it is, or a hub name looked up in the local cache (no network).

    With ``download=True`` a name missing from the cache is fetched with
    ``huggingface_hub.snapshot_download`` (only ``*.json``, ``*.safetensors``,
    ``vocab.txt`` and ``merges.txt``); without huggingface_hub that is a
    FileNotFoundError whose one line says how to get it.
    """
    text = os.fspath(name_or_folder)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    if not is_model_name(text):
        raise FileNotFoundError(f"{text}: no such folder, and not a Hugging Face model name "
                                f"(ORG/NAME)")
    snapshot = cached_snapshot(text, revision)
    if snapshot is not None:
        return snapshot
    cache = hub_cache()
    if not download:
        raise FileNotFoundError(f"{text} is not in the local Hugging Face cache ({cache}) nor a "
                                f"folder; add --download to fetch it (needs the optional "
                                f"huggingface_hub), or give the folder you downloaded it to")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(f"{text} is not in the local Hugging Face cache ({cache}), and "
                                f"downloading needs huggingface_hub: pip install "
                                f"huggingface_hub, then add --download again") from None
    path = huggingface_hub.snapshot_download(repo_id=text, revision=revision,
                                             allow_patterns=DOWNLOAD_PATTERNS)
    return Path(path)
