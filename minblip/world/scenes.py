"""The world's objects and scenes, and how they are drawn.

An image is a small RGB square (``image_size`` pixels, at least
:data:`MIN_IMAGE_SIZE`) with a plain background, cut into a 3x3 grid. Each of
its one to three objects (:class:`Object`: colour, shape, size, grid cell) sits
centred in its own cell, so objects never overlap; a :class:`Scene` holds them
and :func:`render` draws it. The argument checks here (:func:`check_int`,
:func:`check_choice`, :func:`check_image_size`) serve every file of the world.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

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


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def check_choice(what: str, value, allowed) -> None:
    """Raise unless ``value`` is one of ``allowed`` (str names); ``what`` names the argument."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, one of {sorted(allowed)}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{what} must be one of {sorted(allowed)}, got {value!r}")


def check_int(what: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int, checked to be an integer (not a bool) >= ``low`` and, when
    ``high`` is given, <= ``high``; ``what`` names the argument in the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        wanted = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{what} must be {wanted}, got {value}")
    return value


def check_image_size(image_size) -> int:
    """``image_size`` as an int, checked to be an integer >= MIN_IMAGE_SIZE."""
    return check_int("image_size", image_size, MIN_IMAGE_SIZE)


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
        check_choice("Object.colour", self.colour, COLOURS)
        check_choice("Object.shape", self.shape, SHAPES)
        check_choice("Object.size", self.size, SIZES)
        # numpy integers are accepted but stored as int so scenes compare and
        # serialise the same however they were built.
        object.__setattr__(self, "row", check_int("Object.row", self.row, 0, GRID - 1))
        object.__setattr__(self, "col", check_int("Object.col", self.col, 0, GRID - 1))

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
        check_choice("Scene.background", self.background, BACKGROUNDS)
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
    check_choice("size", size, SIZES)
    large = _odd_floor(check_image_size(image_size) // GRID - 1)
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
    check_choice("shape", shape, SHAPES)
    check_int("side", side, 1)
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
    image_size = check_image_size(image_size)
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[...] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        top, left, bottom, right = object_box(obj, image_size)
        image[top:bottom, left:right][shape_mask(obj.shape, bottom - top)] = COLOURS[obj.colour]
    return image


def render_pil(scene: Scene, image_size: int = 32) -> Image.Image:
    """Draw ``scene`` as an RGB PIL image of size (image_size, image_size)."""
    return Image.fromarray(render(scene, image_size))
