"""Captions: the words and templates of the world's language, and true captions of a scene.

Captions use lowercase words and no punctuation. :func:`describe` draws a
template, an order and synonyms with a random generator; :func:`canonical_caption`
takes the first choice everywhere; :func:`vocabulary` lists every word a caption
(clean, corrupted or filler) can contain.
"""
from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from .scenes import Object, Scene

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
