"""Splits on disk, and the committed samples.

:func:`save_split` writes a split as one PNG per image plus ``captions.jsonl``;
:func:`load_split` reads it back and checks it. :func:`write_samples` writes the
samples committed under ``data_samples/``.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

from ..files import write_atomic, write_jsonl_atomic
from .scenes import Scene
from .splits import NOISE_KINDS, NoisySplit, Split, make_dataset, make_noisy

CAPTIONS_FILE = "captions.jsonl"


def save_split(split: Split, folder: str) -> None:
    """Write ``split`` to ``folder``: one PNG per image and ``captions.jsonl``.

    Image i is ``{image_id:06d}.png``. Line i of captions.jsonl is a JSON object
    with keys file, image_id, split, caption, captions (all captions) and scene
    (:meth:`Scene.to_dict`); a NoisySplit adds clean_caption, is_noisy and
    noise_kind. Every file is written atomically.
    """
    if not isinstance(split, Split):
        raise TypeError(f"save_split expects a Split, got {type(split).__name__}")
    if len(split) == 0:
        raise ValueError(f"save_split needs at least one image, split {split.name!r} is empty")
    ids = [int(i) for i in split.image_ids]
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError("save_split needs distinct non-negative image_ids, they name the PNG files")
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, image_id in enumerate(ids):
        file_name = f"{image_id:06d}.png"
        picture = Image.fromarray(split.images[i])
        write_atomic(os.path.join(folder, file_name), lambda file: picture.save(file, format="PNG"))
        record = {
            "file": file_name,
            "image_id": image_id,
            "split": split.name,
            "caption": split.captions[i],
            "captions": list(split.all_captions[i]),
            "scene": split.scenes[i].to_dict(),
        }
        if isinstance(split, NoisySplit):
            record["clean_caption"] = split.clean_captions[i]
            record["is_noisy"] = bool(split.is_noisy[i])
            record["noise_kind"] = split.noise_kind[i]
        records.append(record)
    write_jsonl_atomic(os.path.join(folder, CAPTIONS_FILE), records)


_CLEAN_FIELDS = {
    "file": str, "image_id": int, "split": str, "caption": str, "captions": list, "scene": dict
}
_NOISE_FIELDS = {"clean_caption": str, "is_noisy": bool, "noise_kind": (str, type(None))}


def _read_record(path: str, number: int, line: str) -> dict:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: expected one JSON object, got invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected one JSON object, got {type(record).__name__}")
    noisy = "is_noisy" in record
    expected = {**_CLEAN_FIELDS, **(_NOISE_FIELDS if noisy else {})}
    if set(record) != set(expected):
        raise ValueError(f"{where}: expected keys {sorted(expected)}, got {sorted(record)}")
    for key, kind in expected.items():
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            wanted = getattr(kind, "__name__", "str or null")
            raise ValueError(f"{where}: {key} must be {wanted}, got {type(value).__name__}")
    file_name = record["file"]
    if os.path.basename(file_name) != file_name or not file_name.endswith(".png"):
        raise ValueError(f"{where}: file must be a PNG file name inside the folder, got {file_name!r}")
    captions = record["captions"]
    if not captions or not all(isinstance(c, str) for c in captions) or captions[0] != record["caption"]:
        raise ValueError(f"{where}: captions must be a non-empty list of str starting with caption, "
                         f"got {captions!r}")
    kind = record.get("noise_kind")
    if noisy and (record["is_noisy"] != (kind is not None) or kind not in (None, *NOISE_KINDS)):
        raise ValueError(
            f"{where}: noise_kind must be one of {list(NOISE_KINDS)} when is_noisy and null otherwise, "
            f"got {kind!r} with is_noisy={record['is_noisy']}"
        )
    try:
        record["scene"] = Scene.from_dict(record["scene"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: bad scene: {error}") from None
    return record


def load_split(folder: str) -> Split:
    """Read a folder written by :func:`save_split`; returns a Split or NoisySplit.

    Raises FileNotFoundError naming a missing file, and ValueError naming the
    file and line for a malformed captions.jsonl line or a bad image.
    """
    path = os.path.join(folder, CAPTIONS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected the {CAPTIONS_FILE} written by save_split")
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: expected one JSON object per image, got an empty file")
    records = [_read_record(path, number, line) for number, line in enumerate(lines, start=1)]
    images = []
    for number, record in enumerate(records, start=1):
        where = f"{path} line {number}"
        first = records[0]
        if ("is_noisy" in record) != ("is_noisy" in first) or record["split"] != first["split"]:
            raise ValueError(f"{where}: expected split {first['split']!r} and the same keys as line 1")
        image_path = os.path.join(folder, record["file"])
        if not os.path.isfile(image_path):
            raise FileNotFoundError(f"{image_path}: no such file, listed in {where}")
        with Image.open(image_path) as picture:
            if picture.mode != "RGB":
                raise ValueError(f"{image_path} (from {where}): expected an RGB image, got {picture.mode}")
            image = np.asarray(picture, dtype=np.uint8)
        if image.shape[0] != image.shape[1] or (images and image.shape != images[0].shape):
            expected = "a square image" if not images else f"shape {images[0].shape} like line 1"
            raise ValueError(f"{image_path} (from {where}): expected {expected}, got shape {image.shape}")
        images.append(image)
    fields = {
        "name": records[0]["split"],
        "images": np.stack(images),
        "captions": [r["caption"] for r in records],
        "scenes": [r["scene"] for r in records],
        "image_ids": np.asarray([r["image_id"] for r in records], dtype=np.int64),
        "all_captions": [tuple(r["captions"]) for r in records],
    }
    if "is_noisy" not in records[0]:
        return Split(**fields)
    return NoisySplit(
        **fields,
        clean_captions=[r["clean_caption"] for r in records],
        is_noisy=np.asarray([r["is_noisy"] for r in records], dtype=bool),
        noise_kind=[r["noise_kind"] for r in records],
    )


# ---------------------------------------------------------------------------
# Committed samples
# ---------------------------------------------------------------------------

SAMPLE_SEED = 0
SAMPLE_IMAGES = 24
SAMPLE_CAPTIONS_PER_IMAGE = 3
SAMPLE_NOISE_FRACTION = 0.5
SAMPLE_NOISE_SEED = 1
PHOTO_NAME = "grace_hopper.jpg"


def write_samples(folder: str) -> None:
    """Write the committed samples into ``folder``.

    * ``world_sample/``: the train split of
      ``make_dataset(24, 0, 0, seed=0, captions_per_image=3)``
    * ``world_noisy_sample/``: ``make_noisy(that split, 0.5, seed=1)``
    * ``photos/grace_hopper.jpg``: a copy of matplotlib's sample photograph
    """
    dataset = make_dataset(
        SAMPLE_IMAGES, 0, 0, seed=SAMPLE_SEED, captions_per_image=SAMPLE_CAPTIONS_PER_IMAGE
    )
    save_split(dataset.train, os.path.join(folder, "world_sample"))
    noisy = make_noisy(dataset.train, SAMPLE_NOISE_FRACTION, seed=SAMPLE_NOISE_SEED)
    save_split(noisy, os.path.join(folder, "world_noisy_sample"))

    # matplotlib is imported here only: nothing else in the world needs it.
    import matplotlib

    photos = os.path.join(folder, "photos")
    os.makedirs(photos, exist_ok=True)
    with open(os.path.join(matplotlib.get_data_path(), "sample_data", PHOTO_NAME), "rb") as source:
        write_atomic(os.path.join(photos, PHOTO_NAME), lambda file: shutil.copyfileobj(source, file))
