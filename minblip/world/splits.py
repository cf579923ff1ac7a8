"""Datasets: splits of distinct scenes with true captions, and noisy copies of them.

:func:`make_dataset` builds train/val/test splits with globally unique scene
contents plus a compositional split of scenes that contain a held-out
(colour, shape) combination; :func:`make_noisy` corrupts an exact fraction of a
split's captions the way web alt-text is wrong, keeping the ground truth.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .captions import FILLER_CAPTIONS, describe
from .scenes import (BACKGROUNDS, COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES, Object, Scene,
                     check_choice, check_image_size, check_int, render)
from .scoring import caption_is_true

# (colour, shape) pairs that never appear in train/val/test scenes; the
# compositional split is made of scenes containing at least one of them.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("green", "square"))
# The ways make_noisy makes a caption wrong.
NOISE_KINDS: tuple[str, ...] = ("swap", "attribute", "filler")


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
        check_choice("held-out colour", combo[0], COLOURS)
        check_choice("held-out shape", combo[1], SHAPES)
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
    max_objects = check_int("max_objects", max_objects, 1, MAX_OBJECTS)
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
    n_train = check_int("n_train", n_train, 0)
    n_val = check_int("n_val", n_val, 0)
    n_test = check_int("n_test", n_test, 0)
    if n_compositional is None:
        n_compositional = n_test
    n_compositional = check_int("n_compositional", n_compositional, 0)
    seed = check_int("seed", seed, 0)
    image_size = check_image_size(image_size)
    max_objects = check_int("max_objects", max_objects, 1, MAX_OBJECTS)
    captions_per_image = check_int("captions_per_image", captions_per_image, 1)
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
    seed = check_int("seed", seed, 0)
    if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)):
        raise TypeError(f"kinds must be a sequence of noise kind names, got {type(kinds).__name__}")
    if not kinds:
        raise ValueError(f"kinds must name at least one of {list(NOISE_KINDS)}, got none")
    for kind in kinds:
        check_choice("noise kind", kind, NOISE_KINDS)
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
