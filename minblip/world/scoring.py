"""Reading captions back: the attributes a caption gives, and whether they are right.

:func:`parse_caption` maps any text (also a model's output) to the objects it
mentions; :func:`score_caption` says per attribute whether a caption is right
about a scene, which is how generated captions are evaluated;
:func:`caption_is_true` says whether it is wholly true.
"""
from __future__ import annotations

import itertools
import re
from functools import lru_cache

from .captions import COLOUR_WORDS, POSITION_PHRASES, RELATION_PHRASES, SHAPE_WORDS, SIZE_WORDS
from .scenes import Object, Scene


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
