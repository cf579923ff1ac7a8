"""The built-in synthetic image-caption dataset: "the world".

Every image is a small RGB square (``image_size`` pixels, default 32) with a
plain background and one to three flat-coloured objects. The image is cut into
a 3x3 grid and each object sits centred in its own cell, so objects never
overlap. An object is described by five attributes:

* colour: red, green, blue, yellow, purple, orange
* shape: circle, square, triangle (pointing up), cross (a plus sign), diamond
* size: small, large
* row: 0 top, 1 middle, 2 bottom
* col: 0 left, 1 center, 2 right

Captions are generated from a few templates with synonyms, lowercase words and
no punctuation, and are always true of their image:

* one object, absolute position: ``a large red circle on the left``,
  ``there is a big red disc at the left``, ``on the left there is a ...``
* two objects, a relation that holds between them (left of, right of, above,
  below): ``a small blue box to the right of a large red circle``
* three objects, a list: ``a red ... a blue ... and a green ...``

:func:`parse_caption` maps any caption (also a model's output) back to
attributes, and :func:`score_caption` says per attribute whether a caption is
right about a scene, which is how generated captions are evaluated.

:func:`make_dataset` builds train/val/test splits with globally unique scene
contents (so image-text retrieval has exactly one right answer) plus a
compositional split made only of scenes that contain a held-out
(colour, shape) combination never seen in train/val/test. :func:`make_noisy`
corrupts an exact fraction of captions the way web alt-text is wrong, keeping
the ground truth, for the CapFilt experiments. :func:`save_split` and
:func:`load_split` store a split as PNG files plus ``captions.jsonl``.

Run ``python -m minblip.world --write-samples data_samples`` to regenerate the
committed samples.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import numbers
import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .files import write_atomic, write_jsonl_atomic

# ---------------------------------------------------------------------------
# The attributes of the world
# ---------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (210, 210, 210),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COL_NAMES: tuple[str, ...] = ("left", "center", "right")
GRID = 3
MAX_OBJECTS = 3

# Below 30 px a small shape is 3 px wide and circle, diamond and cross become
# the same blob.
MIN_IMAGE_SIZE = 30

# (colour, shape) pairs that never appear in train/val/test scenes; the
# compositional split is made of scenes containing at least one of them.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("green", "square"))

# ---------------------------------------------------------------------------
# Caption language. The first entry of every tuple is the canonical choice.
# ---------------------------------------------------------------------------

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "large": ("large", "big"),
    "small": ("small", "little", "tiny"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus"),
}
# Each phrase names one cell exactly, so "on the left" means the middle-left
# cell and a caption's position can be checked without ambiguity.
POSITION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("at the top left", "in the top left corner"),
    (0, 1): ("at the top", "at the top center"),
    (0, 2): ("at the top right", "in the top right corner"),
    (1, 0): ("on the left", "on the left side", "at the left"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "on the right side", "at the right"),
    (2, 0): ("at the bottom left", "in the bottom left corner"),
    (2, 1): ("at the bottom", "at the bottom center"),
    (2, 2): ("at the bottom right", "in the bottom right corner"),
}
# "a X <relation> b Y" means X is <relation> Y.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
OBJECT_TEMPLATE = "a {size} {colour} {shape}"
SINGLE_TEMPLATES: tuple[str, ...] = ("{obj} {pos}", "there is {obj} {pos}", "{pos} there is {obj}")
PAIR_TEMPLATES: tuple[str, ...] = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}")
TRIPLE_TEMPLATES: tuple[str, ...] = ("{a} {b} and {c}", "{a} with {b} and {c}")
# Uninformative alt-text used by the "filler" noise kind.
FILLER_CAPTIONS: tuple[str, ...] = (
    "a nice picture",
    "check out this image",
    "my favourite photo",
    "look at this",
    "what a great shot",
    "image of the day",
    "just another photo",
    "click here for more",
)
MAX_CAPTION_WORDS = 14

NOISE_KINDS: tuple[str, ...] = ("swap", "attribute", "filler")
CAPTIONS_FILE = "captions.jsonl"


def _check_choice(what: str, value, allowed) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, one of {sorted(allowed)}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{what} must be one of {sorted(allowed)}, got {value!r}")


def _check_int(what: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        wanted = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{what} must be {wanted}, got {value}")
    return value


def _check_image_size(image_size) -> int:
    return _check_int("image_size", image_size, MIN_IMAGE_SIZE)


# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Object:
    """One object: colour, shape and size names, and its grid cell (row, col in 0..2)."""

    colour: str
    shape: str
    size: str
    row: int
    col: int

    def __post_init__(self):
        _check_choice("Object.colour", self.colour, COLOURS)
        _check_choice("Object.shape", self.shape, SHAPES)
        _check_choice("Object.size", self.size, SIZES)
        # numpy integers are accepted but stored as int so scenes compare and
        # serialise the same however they were built.
        object.__setattr__(self, "row", _check_int("Object.row", self.row, 0, GRID - 1))
        object.__setattr__(self, "col", _check_int("Object.col", self.col, 0, GRID - 1))

    def to_dict(self) -> dict:
        """JSON-ready dict with keys colour, shape, size, row, col."""
        return {name: getattr(self, name) for name in ("colour", "shape", "size", "row", "col")}


@dataclass(frozen=True)
class Scene:
    """One to three objects in distinct grid cells on a background.

    Within a scene no two objects share a (colour, shape) combination, so every
    object a caption mentions is identified by its colour and shape. ``objects``
    is stored sorted by (row, col), so scenes with the same content are equal
    whatever order they were built in.
    """

    objects: tuple[Object, ...]
    background: str = "grey"

    def __post_init__(self):
        if not isinstance(self.objects, (tuple, list)):
            raise TypeError(f"Scene.objects must be a tuple of Object, got {type(self.objects).__name__}")
        objects = tuple(self.objects)
        for obj in objects:
            if not isinstance(obj, Object):
                raise TypeError(f"Scene.objects must hold Object instances, got {type(obj).__name__}")
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1..{MAX_OBJECTS} objects, got {len(objects)}")
        cells = [(o.row, o.col) for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects of a scene must be in distinct grid cells, got cells {cells}")
        combos = [(o.colour, o.shape) for o in objects]
        if len(set(combos)) != len(combos):
            raise ValueError(f"objects of a scene must differ in (colour, shape), got {combos}")
        _check_choice("Scene.background", self.background, BACKGROUNDS)
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: (o.row, o.col))))

    def content_key(self) -> str:
        """A string naming the objects only: what a caption can talk about."""
        return ";".join(f"{o.row}{o.col}:{o.size}:{o.colour}:{o.shape}" for o in self.objects)

    def key(self) -> str:
        """A string identifying the whole scene: equal keys render to identical images."""
        return f"{self.background}|{self.content_key()}"

    def to_dict(self) -> dict:
        """JSON-ready dict: {"background": str, "objects": [Object.to_dict(), ...]}."""
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data) -> Scene:
        """Inverse of :meth:`to_dict`; raises ValueError/TypeError on anything else."""
        if not isinstance(data, dict):
            raise TypeError(f"a scene must be a dict (background, objects), got {type(data).__name__}")
        if set(data) != {"background", "objects"}:
            raise ValueError(f"a scene must have exactly the keys background, objects; got {sorted(data)}")
        objects = data["objects"]
        if not isinstance(objects, list):
            raise TypeError(f"scene objects must be a list, got {type(objects).__name__}")
        fields = {"colour", "shape", "size", "row", "col"}
        built = []
        for obj in objects:
            if not isinstance(obj, dict) or set(obj) != fields:
                got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"an object must be a dict with the keys {sorted(fields)}, got {got}")
            built.append(Object(**obj))
        return cls(tuple(built), data["background"])


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def cell_bounds(index: int, image_size: int) -> tuple[int, int]:
    """Pixel range [start, stop) of grid row or column ``index`` (0..2)."""
    return index * image_size // GRID, (index + 1) * image_size // GRID


def object_side(size: str, image_size: int) -> int:
    """Side in pixels of the square box a ``size`` object is drawn in.

    Sides are odd so every shape has a centre pixel and is left-right symmetric.
    A large object leaves at least one background pixel in its cell; a small one
    is about 60% as wide.
    """
    _check_choice("size", size, SIZES)
    large = _odd_floor(_check_image_size(image_size) // GRID - 1)
    return large if size == "large" else _odd_floor(large * 3 // 5)


def _odd_floor(n: int) -> int:
    return n if n % 2 else n - 1


def object_box(obj: Object, image_size: int) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right), bottom/right exclusive, of ``obj``.

    The box is centred in the object's grid cell and lies inside it.
    """
    side = object_side(obj.size, image_size)
    row_start, row_stop = cell_bounds(obj.row, image_size)
    col_start, col_stop = cell_bounds(obj.col, image_size)
    top = row_start + (row_stop - row_start - side) // 2
    left = col_start + (col_stop - col_start - side) // 2
    return top, left, top + side, left + side


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Read-only bool mask (side, side) of the pixels ``shape`` covers in its box.

    A pixel belongs to the shape when its centre is inside, computed in numpy
    so the pixels do not depend on a drawing library's rasteriser version.
    """
    _check_choice("shape", shape, SHAPES)
    _check_int("side", side, 1)
    y, x = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2
    u, v = np.abs(x - centre), np.abs(y - centre)
    if shape == "circle":
        mask = u * u + v * v <= (side / 2) ** 2
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        # Pointing up: the top row is the middle pixel alone, then the rows widen
        # by two pixels every other row, so the bottom row is full.
        mask = u <= (y + 1) / 2
    elif shape == "cross":
        # Arms about a third of the side thick, like a plus sign.
        half_arm = round((side / 3 - 1) / 2)
        mask = (u <= half_arm) | (v <= half_arm)
    else:  # diamond
        mask = u + v <= centre
    mask.setflags(write=False)
    return mask


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
    """Draw ``scene``; returns a uint8 array (image_size, image_size, 3), RGB."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render expects a Scene, got {type(scene).__name__}")
    image_size = _check_image_size(image_size)
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[...] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        top, left, bottom, right = object_box(obj, image_size)
        image[top:bottom, left:right][shape_mask(obj.shape, bottom - top)] = COLOURS[obj.colour]
    return image


def render_pil(scene: Scene, image_size: int = 32) -> Image.Image:
    """Draw ``scene`` as an RGB PIL image of size (image_size, image_size)."""
    return Image.fromarray(render(scene, image_size))


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def _true_relations(a: Object, b: Object) -> tuple[str, ...]:
    """Relations r for which "a r b" is true: horizontal first, then vertical."""
    relations = []
    if a.col != b.col:
        relations.append("left" if a.col < b.col else "right")
    if a.row != b.row:
        relations.append("above" if a.row < b.row else "below")
    return tuple(relations)


def _caption(scene: Scene, pick: Callable[[Sequence], object]) -> str:
    """Build a caption for ``scene``, letting ``pick`` make every choice."""

    def phrase(obj: Object) -> str:
        return OBJECT_TEMPLATE.format(
            size=pick(SIZE_WORDS[obj.size]),
            colour=pick(COLOUR_WORDS[obj.colour]),
            shape=pick(SHAPE_WORDS[obj.shape]),
        )

    objects = scene.objects
    if len(objects) == 1:
        (obj,) = objects
        template = pick(SINGLE_TEMPLATES)
        return template.format(obj=phrase(obj), pos=pick(POSITION_PHRASES[(obj.row, obj.col)]))
    if len(objects) == 2:
        a, b = pick((objects, objects[::-1]))
        template = pick(PAIR_TEMPLATES)
        relation = pick(_true_relations(a, b))
        return template.format(a=phrase(a), rel=pick(RELATION_PHRASES[relation]), b=phrase(b))
    order = pick(tuple(itertools.permutations(objects)))
    template = pick(TRIPLE_TEMPLATES)
    return template.format(a=phrase(order[0]), b=phrase(order[1]), c=phrase(order[2]))


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A true caption for ``scene`` with template, word order and synonyms drawn from ``rng``."""
    if not isinstance(scene, Scene):
        raise TypeError(f"describe expects a Scene, got {type(scene).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return _caption(scene, lambda options: options[int(rng.integers(len(options)))])


def canonical_caption(scene: Scene) -> str:
    """The deterministic caption of ``scene``: first template and first synonym everywhere.

    For two objects the subject is the first in (row, col) order and the
    relation is horizontal when the columns differ.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"canonical_caption expects a Scene, got {type(scene).__name__}")
    return _caption(scene, lambda options: options[0])


def _words(text: str) -> list[str]:
    return re.sub(r"\{\w+\}", " ", text).split()


@lru_cache(maxsize=None)
def _vocabulary() -> tuple[str, ...]:
    phrases = [OBJECT_TEMPLATE, *SINGLE_TEMPLATES, *PAIR_TEMPLATES, *TRIPLE_TEMPLATES, *FILLER_CAPTIONS]
    for table in (SIZE_WORDS, COLOUR_WORDS, SHAPE_WORDS, POSITION_PHRASES, RELATION_PHRASES):
        for options in table.values():
            phrases.extend(options)
    return tuple(sorted({word for text in phrases for word in _words(text)}))


def vocabulary() -> list[str]:
    """Every word any caption (clean, corrupted or filler) can contain, sorted."""
    return list(_vocabulary())


# ---------------------------------------------------------------------------
# Parsing and scoring captions
# ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _lexicon() -> dict[tuple[str, ...], tuple[str, object]]:
    """Map each meaningful word sequence to (kind, canonical value)."""
    lexicon: dict[tuple[str, ...], tuple[str, object]] = {}
    tables = (
        ("size", SIZE_WORDS),
        ("colour", COLOUR_WORDS),
        ("shape", SHAPE_WORDS),
        ("position", POSITION_PHRASES),
        ("relation", RELATION_PHRASES),
    )
    for kind, table in tables:
        for value, options in table.items():
            for option in options:
                lexicon[tuple(option.split())] = (kind, value)
    return lexicon


def _empty_parsed() -> dict:
    return dict.fromkeys(("colour", "shape", "size", "row", "col", "relation", "relative_to"))


def parse_caption(text: str) -> list[dict]:
    """The objects a caption mentions, in order, with the attributes it gives them.

    Input is any text; case and punctuation are ignored and unknown words
    skipped, so model output can be parsed too. Returns one dict per object,
    with canonical values and None where the caption says nothing:

    * ``colour``, ``shape``, ``size``: names as in COLOURS, SHAPES, SIZES
    * ``row``, ``col``: ints 0..2 from an absolute position phrase
    * ``relation`` ("left", "right", "above", "below") and ``relative_to``
      (index into the returned list): "this object is <relation> that one"

    An object ends at its shape word; a position phrase belongs to the object
    just before it, or to the next one when the caption starts with it.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_caption expects a str, got {type(text).__name__}")
    words = re.sub(r"[^a-z]+", " ", text.lower()).split()
    lexicon = _lexicon()
    longest = max(len(phrase) for phrase in lexicon)
    objects: list[dict] = []
    pending: dict = {}
    pending_position = None
    pending_relation = None

    def finish() -> None:
        nonlocal pending, pending_position, pending_relation
        obj = _empty_parsed()
        obj.update(pending)
        if pending_position is not None:
            obj["row"], obj["col"] = pending_position
            pending_position = None
        objects.append(obj)
        if pending_relation is not None:
            subject, relation = pending_relation
            objects[subject]["relation"] = relation
            objects[subject]["relative_to"] = len(objects) - 1
            pending_relation = None
        pending = {}

    i = 0
    while i < len(words):
        for length in range(min(longest, len(words) - i), 0, -1):
            match = lexicon.get(tuple(words[i : i + length]))
            if match is not None:
                break
        else:
            i += 1
            continue
        i += length
        kind, value = match
        if kind in ("size", "colour", "shape"):
            # A repeated attribute before any shape word means a new object began.
            if kind in pending:
                finish()
            pending[kind] = value
            if kind == "shape":
                finish()
        elif kind == "position":
            if not pending and objects and objects[-1]["row"] is None and pending_relation is None:
                objects[-1]["row"], objects[-1]["col"] = value
            else:
                pending_position = value
        else:
            if pending:
                finish()
            if objects:
                pending_relation = (len(objects) - 1, value)
    if pending or pending_position is not None:
        finish()
    if pending_relation is not None:
        subject, relation = pending_relation
        objects[subject]["relation"] = relation
    return objects


def _relation_holds(relation: str, a: Object, b: Object) -> bool:
    if relation == "left":
        return a.col < b.col
    if relation == "right":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    return a.row > b.row


def _alignments(n_parsed: int, n_objects: int):
    """Every way to pair as many parsed objects as possible with distinct scene objects.

    Yields tuples of length n_parsed holding a scene index or None.
    """
    matched = min(n_parsed, n_objects)
    for chosen in itertools.combinations(range(n_parsed), matched):
        for targets in itertools.permutations(range(n_objects), matched):
            alignment = [None] * n_parsed
            for i, target in zip(chosen, targets):
                alignment[i] = target
            yield tuple(alignment)


def _marks(parsed: list[dict], objects: tuple[Object, ...], alignment: tuple) -> dict[str, list[bool]]:
    marks: dict[str, list[bool]] = {"colour": [], "shape": [], "size": [], "position": []}
    for i, mention in enumerate(parsed):
        target = None if alignment[i] is None else objects[alignment[i]]
        for attribute in ("colour", "shape", "size"):
            if mention[attribute] is not None:
                right = target is not None and getattr(target, attribute) == mention[attribute]
                marks[attribute].append(right)
        if mention["row"] is not None:
            right = target is not None and (target.row, target.col) == (mention["row"], mention["col"])
            marks["position"].append(right)
        if mention["relation"] is not None:
            j = mention["relative_to"]
            other = None if j is None or alignment[j] is None else objects[alignment[j]]
            right = None not in (target, other) and _relation_holds(mention["relation"], target, other)
            marks["position"].append(right)
    return marks


def score_caption(scene: Scene, text: str) -> dict[str, bool | None]:
    """Per-attribute correctness of ``text`` as a caption of ``scene``.

    Mentioned objects are matched one-to-one to scene objects in the way that
    makes the most mentions right. Returns a dict:

    * ``count``: the caption mentions as many objects as the scene has
    * ``colour``, ``shape``, ``size``: every mention of it is right, or None if
      the caption never gives it
    * ``position``: every absolute position and relation is right, or None
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"score_caption expects a Scene, got {type(scene).__name__}")
    parsed = parse_caption(text)
    best, best_right = None, -1
    for alignment in _alignments(len(parsed), len(scene.objects)):
        marks = _marks(parsed, scene.objects, alignment)
        right = sum(sum(values) for values in marks.values())
        if right > best_right:
            best, best_right = marks, right
    scores: dict[str, bool | None] = {"count": len(parsed) == len(scene.objects)}
    for attribute, values in best.items():
        scores[attribute] = all(values) if values else None
    return scores


def caption_is_true(scene: Scene, text: str) -> bool:
    """True when ``text`` mentions every object of ``scene`` and says nothing wrong about them."""
    return all(value is not False for value in score_caption(scene, text).values())


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class Split:
    """N images with their captions and scenes.

    * ``images``: uint8 (N, H, W, 3)
    * ``captions``: list of N str, the first caption of each image (the one
      used as the retrieval query for val/test)
    * ``scenes``: list of N Scene
    * ``image_ids``: int64 (N,), unique across all splits of a dataset
    * ``all_captions``: list of N tuples of str, every caption of each image
      (``captions[i] == all_captions[i][0]``)

    Training code uses :meth:`pairs` for all stored (image, caption) pairs, or
    :meth:`sample_captions` for fresh captions each epoch.
    """

    name: str
    images: np.ndarray
    captions: list[str]
    scenes: list[Scene]
    image_ids: np.ndarray
    all_captions: list[tuple[str, ...]]

    def __post_init__(self):
        images = self.images
        if not isinstance(images, np.ndarray):
            raise TypeError(f"Split.images must be a uint8 array (N, H, W, 3), got {type(images).__name__}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise TypeError(f"Split.images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        n = len(images)
        names = ("captions", "scenes", "image_ids", "all_captions")
        lengths = {name: len(getattr(self, name)) for name in names}
        bad = {name: length for name, length in lengths.items() if length != n}
        if bad:
            raise ValueError(f"Split fields must all have one entry per image ({n}), got lengths {bad}")
        for options, caption in zip(self.all_captions, self.captions):
            if not options or options[0] != caption:
                raise ValueError(f"Split.all_captions[i] must start with captions[i], got {options!r}")

    def __len__(self) -> int:
        return len(self.scenes)

    def pairs(self) -> tuple[np.ndarray, list[str]]:
        """All stored (image, caption) pairs: int64 image indices (M,) and M captions.

        Pair m is ``images[indices[m]]`` with ``captions[m]``, M = sum of the
        captions per image.
        """
        indices = [i for i, options in enumerate(self.all_captions) for _ in options]
        captions = [caption for options in self.all_captions for caption in options]
        return np.asarray(indices, dtype=np.int64), captions

    def sample_captions(self, rng: np.random.Generator) -> list[str]:
        """One freshly drawn caption per image (N str), e.g. a new set every epoch."""
        return [describe(scene, rng) for scene in self.scenes]


@dataclass(eq=False)
class NoisySplit(Split):
    """A split whose ``captions`` are partly wrong, with the ground truth kept.

    * ``clean_captions``: list of N true captions
    * ``is_noisy``: bool (N,), True where ``captions[i]`` was replaced
    * ``noise_kind``: list of N, None or one of NOISE_KINDS
    """

    clean_captions: list[str]
    is_noisy: np.ndarray
    noise_kind: list[str | None]

    def __post_init__(self):
        super().__post_init__()
        n = len(self.images)
        if len(self.clean_captions) != n or len(self.is_noisy) != n or len(self.noise_kind) != n:
            raise ValueError(f"NoisySplit noise fields must have one entry per image ({n})")
        for flag, kind in zip(self.is_noisy, self.noise_kind):
            if bool(flag) != (kind is not None) or kind not in (None, *NOISE_KINDS):
                raise ValueError(
                    f"noise_kind must be one of {list(NOISE_KINDS)} where is_noisy and None elsewhere, "
                    f"got {kind!r} with is_noisy={bool(flag)}"
                )


@dataclass(eq=False)
class WorldDataset:
    """The four splits of one :func:`make_dataset` call and the settings that made them."""

    train: Split
    val: Split
    test: Split
    compositional: Split
    seed: int
    image_size: int
    max_objects: int
    held_out: tuple[tuple[str, str], ...]


def _check_held_out(held_out) -> tuple[tuple[str, str], ...]:
    if isinstance(held_out, str) or not isinstance(held_out, (tuple, list, set, frozenset)):
        raise TypeError(
            f"held-out combinations must be a sequence of (colour, shape) pairs, "
            f"got {type(held_out).__name__}"
        )
    combos = []
    for combo in held_out:
        if not isinstance(combo, (tuple, list)) or len(combo) != 2:
            raise ValueError(f"each held-out combination must be a (colour, shape) pair, got {combo!r}")
        _check_choice("held-out colour", combo[0], COLOURS)
        _check_choice("held-out shape", combo[1], SHAPES)
        combos.append((combo[0], combo[1]))
    return tuple(sorted(set(combos)))


def _all_combos() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def _stratum_sizes(max_objects: int, held_out: tuple) -> tuple[list[int], list[int]]:
    """Distinct scene contents per object count k = 1..max_objects.

    Returns (without any held-out combination, with at least one). A content is
    k cells, then distinct (colour, shape) pairs assigned to the cells in order,
    then a size for each.
    """
    n_all = len(_all_combos())
    n_allowed = n_all - len(held_out)
    allowed, compositional = [], []
    for k in range(1, max_objects + 1):
        per_layout = math.comb(GRID * GRID, k) * len(SIZES) ** k
        allowed.append(per_layout * math.perm(n_allowed, k))
        compositional.append(per_layout * (math.perm(n_all, k) - math.perm(n_allowed, k)))
    return allowed, compositional


def count_scenes(max_objects: int = 2, held_out=HELD_OUT_COMBOS, compositional: bool = False) -> int:
    """Number of distinct scene contents (backgrounds not counted) with 1..max_objects objects.

    With ``compositional=False`` the scenes avoiding every held-out combination
    (the pool for train/val/test), otherwise those containing at least one.
    """
    max_objects = _check_int("max_objects", max_objects, 1, MAX_OBJECTS)
    allowed, comp = _stratum_sizes(max_objects, _check_held_out(held_out))
    return sum(comp if compositional else allowed)


def _object_counts(n: int, available: list[int], rng: np.random.Generator) -> np.ndarray:
    """How many of n scenes get k = 1, 2, ... objects: uniform, within what exists.

    There are only a few hundred one-object scenes, so what does not fit in a
    count is moved to larger counts, then (if still left) back to smaller ones.
    """
    counts = np.bincount(rng.integers(0, len(available), size=n), minlength=len(available)).astype(np.int64)
    spare = 0
    for k in [*range(len(available)), *reversed(range(len(available)))]:
        counts[k] += spare
        spare = max(0, int(counts[k]) - available[k])
        counts[k] -= spare
    return counts


def _draw_scenes(
    n: int,
    available: list[int],
    combos: list[tuple[str, str]],
    required: frozenset | None,
    rng: np.random.Generator,
) -> list[Scene]:
    """n scenes with distinct contents, object counts mixed, uniform within each count.

    Objects use ``combos``; when ``required`` is given every scene contains one
    of those combinations. Contents are drawn at random and redrawn when taken
    or lacking a required combination; ``available`` guarantees this ends.
    """
    counts = _object_counts(n, available, rng)
    object_counts = np.repeat(np.arange(1, len(counts) + 1), counts)
    rng.shuffle(object_counts)
    backgrounds = list(BACKGROUNDS)
    seen: set[str] = set()
    scenes = []
    for k in object_counts:
        while True:
            cells = rng.choice(GRID * GRID, size=k, replace=False)
            chosen = [combos[i] for i in rng.choice(len(combos), size=k, replace=False)]
            sizes = rng.integers(0, len(SIZES), size=k)
            if required is not None and not required.intersection(chosen):
                continue
            scene = Scene(
                tuple(
                    Object(colour, shape, SIZES[size], cell // GRID, cell % GRID)
                    for (colour, shape), size, cell in zip(chosen, sizes, cells)
                ),
                backgrounds[int(rng.integers(len(backgrounds)))],
            )
            if scene.content_key() not in seen:
                seen.add(scene.content_key())
                scenes.append(scene)
                break
    return scenes


def _build_split(
    name: str,
    scenes: list[Scene],
    first_id: int,
    image_size: int,
    captions_per_image: int,
    rng: np.random.Generator,
) -> Split:
    images = np.empty((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene, image_size)
    all_captions = [tuple(describe(scene, rng) for _ in range(captions_per_image)) for scene in scenes]
    return Split(
        name=name,
        images=images,
        captions=[options[0] for options in all_captions],
        scenes=list(scenes),
        image_ids=np.arange(first_id, first_id + len(scenes), dtype=np.int64),
        all_captions=all_captions,
    )


def make_dataset(
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    image_size: int = 32,
    max_objects: int = 2,
    captions_per_image: int = 1,
    n_compositional: int | None = None,
    compositional_holdout=HELD_OUT_COMBOS,
) -> WorldDataset:
    """Generate train, val, test and compositional splits.

    * Each scene has 1..max_objects objects (counts drawn uniformly, moved to
      other counts when a count runs out of distinct scenes).
    * Every scene content (objects, ignoring background) occurs once in the
      whole dataset, so each caption describes exactly one image.
    * train/val/test never contain a ``compositional_holdout`` (colour, shape)
      combination; every compositional scene contains at least one.
      ``n_compositional`` defaults to ``n_test``.
    * Each image gets ``captions_per_image`` captions drawn with :func:`describe`
      (they may repeat when a scene has few phrasings).
    * ``image_ids`` run 0.. through train, val, test, compositional.

    The compositional scenes do not depend on the other split sizes, and no
    scene depends on ``captions_per_image`` or ``image_size``. Raises
    ValueError if more distinct scenes are requested than exist (see
    :func:`count_scenes`).
    """
    n_train = _check_int("n_train", n_train, 0)
    n_val = _check_int("n_val", n_val, 0)
    n_test = _check_int("n_test", n_test, 0)
    if n_compositional is None:
        n_compositional = n_test
    n_compositional = _check_int("n_compositional", n_compositional, 0)
    seed = _check_int("seed", seed, 0)
    image_size = _check_image_size(image_size)
    max_objects = _check_int("max_objects", max_objects, 1, MAX_OBJECTS)
    captions_per_image = _check_int("captions_per_image", captions_per_image, 1)
    held_out = _check_held_out(compositional_holdout)

    allowed, comp = _stratum_sizes(max_objects, held_out)
    n_main = n_train + n_val + n_test
    if n_main > sum(allowed):
        raise ValueError(
            f"n_train + n_val + n_test must be at most {sum(allowed)}, the number of distinct scenes with "
            f"1..{max_objects} objects and no held-out combination, got {n_main}"
        )
    if n_compositional > sum(comp):
        raise ValueError(
            f"n_compositional must be at most {sum(comp)}, the number of distinct scenes with "
            f"1..{max_objects} objects containing a held-out combination {list(held_out)}, "
            f"got {n_compositional}"
        )

    # Separate streams: the compositional scenes do not depend on the other
    # split sizes, and no scene depends on captions_per_image or image_size.
    main_seq, comp_seq, caption_seq = np.random.SeedSequence(seed).spawn(3)
    held_set = frozenset(held_out)
    allowed_combos = [combo for combo in _all_combos() if combo not in held_set]
    main_scenes = _draw_scenes(n_main, allowed, allowed_combos, None, np.random.default_rng(main_seq))
    comp_rng = np.random.default_rng(comp_seq)
    comp_scenes = _draw_scenes(n_compositional, comp, _all_combos(), held_set, comp_rng)

    parts = {
        "train": main_scenes[:n_train],
        "val": main_scenes[n_train : n_train + n_val],
        "test": main_scenes[n_train + n_val :],
        "compositional": comp_scenes,
    }
    splits = {}
    first_id = 0
    for (name, scenes), seq in zip(parts.items(), caption_seq.spawn(len(parts))):
        rng = np.random.default_rng(seq)
        splits[name] = _build_split(name, scenes, first_id, image_size, captions_per_image, rng)
        first_id += len(scenes)
    return WorldDataset(
        **splits, seed=seed, image_size=image_size, max_objects=max_objects, held_out=held_out
    )


# ---------------------------------------------------------------------------
# Noisy web captions
# ---------------------------------------------------------------------------


def _wrong_attribute_caption(scene: Scene, held_out: frozenset, rng: np.random.Generator) -> str:
    """Caption of ``scene`` with one object's colour or shape changed to one absent from the scene.

    The new value is absent from the whole scene, so no matching of caption to
    objects can make the caption true; held-out combinations are never formed.
    """
    for index in rng.permutation(len(scene.objects)):
        obj = scene.objects[index]
        for attribute in ("colour", "shape") if rng.integers(2) == 0 else ("shape", "colour"):
            present = {getattr(o, attribute) for o in scene.objects}
            values = COLOURS if attribute == "colour" else SHAPES
            options = []
            for value in values:
                changed = {"colour": obj.colour, "shape": obj.shape, attribute: value}
                if value not in present and (changed["colour"], changed["shape"]) not in held_out:
                    options.append(value)
            if options:
                value = options[int(rng.integers(len(options)))]
                objects = list(scene.objects)
                objects[index] = Object(**{**obj.to_dict(), attribute: value})
                return describe(Scene(tuple(objects), scene.background), rng)
    raise ValueError(f"no colour or shape is free to make a wrong caption for scene {scene.key()}")


def _swapped_caption(split: Split, i: int, rng: np.random.Generator) -> str:
    """The caption of another image that is false for image i."""
    scene = split.scenes[i]
    for j in rng.permutation(len(split)):
        if j != i and split.scenes[j].content_key() != scene.content_key():
            if not caption_is_true(scene, split.captions[j]):
                return split.captions[j]
    raise ValueError(f"'swap' noise needs another image whose caption is false for image {i}, found none")


def make_noisy(
    split: Split,
    noise_fraction: float,
    seed: int,
    kinds: Sequence[str] = NOISE_KINDS,
    held_out=HELD_OUT_COMBOS,
) -> NoisySplit:
    """Replace exactly ``round(noise_fraction * N)`` captions with wrong ones.

    Which captions, and the kind for each (uniform over ``kinds``), come from
    ``seed``. Kinds:

    * ``swap``: the caption of another image, checked to be false for this one
    * ``attribute``: a caption of this scene with one colour or shape changed
      to a value not present in the scene (never forming a ``held_out``
      combination, so noise cannot leak the compositional test)
    * ``filler``: uninformative alt-text from FILLER_CAPTIONS

    Returns a NoisySplit with the same images, one caption per image, and
    ``clean_captions``, ``is_noisy``, ``noise_kind`` as ground truth.
    """
    if isinstance(split, NoisySplit):
        raise ValueError("make_noisy expects a clean Split, got a NoisySplit (its captions are corrupted)")
    if not isinstance(split, Split):
        raise TypeError(f"make_noisy expects a Split, got {type(split).__name__}")
    if isinstance(noise_fraction, bool) or not isinstance(noise_fraction, numbers.Real):
        raise TypeError(f"noise_fraction must be a number in [0, 1], got {type(noise_fraction).__name__}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    seed = _check_int("seed", seed, 0)
    if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)):
        raise TypeError(f"kinds must be a sequence of noise kind names, got {type(kinds).__name__}")
    if not kinds:
        raise ValueError(f"kinds must name at least one of {list(NOISE_KINDS)}, got none")
    for kind in kinds:
        _check_choice("noise kind", kind, NOISE_KINDS)
    held_set = frozenset(_check_held_out(held_out))

    rng = np.random.default_rng(seed)
    n = len(split)
    captions = list(split.captions)
    is_noisy = np.zeros(n, dtype=bool)
    noise_kind: list[str | None] = [None] * n
    for i in np.sort(rng.choice(n, size=round(noise_fraction * n), replace=False)):
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "swap":
            captions[i] = _swapped_caption(split, i, rng)
        elif kind == "attribute":
            captions[i] = _wrong_attribute_caption(split.scenes[i], held_set, rng)
        else:
            captions[i] = FILLER_CAPTIONS[int(rng.integers(len(FILLER_CAPTIONS)))]
        is_noisy[i] = True
        noise_kind[i] = kind
    return NoisySplit(
        name=f"{split.name}_noisy",
        images=split.images.copy(),
        captions=captions,
        scenes=list(split.scenes),
        image_ids=split.image_ids.copy(),
        all_captions=[(caption,) for caption in captions],
        clean_captions=list(split.captions),
        is_noisy=is_noisy,
        noise_kind=noise_kind,
    )


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minblip.world", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-samples", metavar="FOLDER", required=True, help="write the committed samples into FOLDER"
    )
    args = parser.parse_args(argv)
    write_samples(args.write_samples)


if __name__ == "__main__":
    main()
