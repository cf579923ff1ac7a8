"""Tests for the synthetic image-caption world (minblip.world)."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minblip import world
from minblip.world import Object, Scene

IMAGE_SIZES = (32, 48, 64)
VOCAB = set(world.vocabulary())
ALL_COMBOS = [(colour, shape) for colour in world.COLOURS for shape in world.SHAPES]
SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"


@st.composite
def scenes(draw, max_objects=world.MAX_OBJECTS):
    k = draw(st.integers(1, max_objects))
    cells = draw(st.lists(st.integers(0, 8), min_size=k, max_size=k, unique=True))
    combos = draw(st.lists(st.sampled_from(ALL_COMBOS), min_size=k, max_size=k, unique=True))
    sizes = draw(st.lists(st.sampled_from(world.SIZES), min_size=k, max_size=k))
    background = draw(st.sampled_from(sorted(world.BACKGROUNDS)))
    objects = tuple(
        Object(colour, shape, size, cell // 3, cell % 3)
        for (colour, shape), size, cell in zip(combos, sizes, cells)
    )
    return Scene(objects, background)


@pytest.fixture(scope="module")
def dataset():
    return world.make_dataset(240, 40, 40, seed=7, max_objects=3, captions_per_image=2)


@pytest.fixture(scope="module")
def demo():
    return world.make_dataset(200, 30, 30, seed=3)


def all_splits(data):
    return [data.train, data.val, data.test, data.compositional]


def assert_true_caption(scene, caption):
    """Check a caption against its scene without going through score_caption."""
    words = caption.split()
    assert caption == " ".join(words) and all(word.isalpha() and word.islower() for word in words), caption
    assert set(words) <= VOCAB, caption
    assert len(words) <= world.MAX_CAPTION_WORDS, caption
    parsed = world.parse_caption(caption)
    assert len(parsed) == len(scene.objects), caption
    by_combo = {(o.colour, o.shape): o for o in scene.objects}
    matched = [by_combo[(mention["colour"], mention["shape"])] for mention in parsed]
    assert len({id(o) for o in matched}) == len(matched), caption
    for mention, obj in zip(parsed, matched):
        assert mention["size"] == obj.size, caption
        if mention["row"] is not None:
            assert (mention["row"], mention["col"]) == (obj.row, obj.col), caption
        if mention["relation"] is not None:
            other = matched[mention["relative_to"]]
            down, across = other.row - obj.row, other.col - obj.col
            holds = {"left": across > 0, "right": across < 0, "above": down > 0, "below": down < 0}
            assert holds[mention["relation"]], caption
    if len(scene.objects) == 1:
        assert parsed[0]["row"] is not None, caption
    if len(scene.objects) == 2:
        assert sum(mention["relation"] is not None for mention in parsed) == 1, caption
    assert world.caption_is_true(scene, caption), caption


# --- vocabulary -------------------------------------------------------------


def test_vocabulary_is_small_sorted_lowercase_words():
    vocab = world.vocabulary()
    assert vocab == sorted(set(vocab))
    assert len(vocab) < 80
    assert all(word.isalpha() and word.islower() for word in vocab)
    assert world.vocabulary() == vocab


def test_vocabulary_is_exactly_the_words_captions_use(dataset):
    used = set()
    for split in all_splits(dataset):
        for options in split.all_captions:
            for caption in options:
                used.update(caption.split())
    rng = np.random.default_rng(0)
    for scene in dataset.train.scenes:
        for _ in range(5):
            used.update(world.describe(scene, rng).split())
    for filler in world.FILLER_CAPTIONS:
        used.update(filler.split())
    assert used == VOCAB


# --- scenes -----------------------------------------------------------------


def test_scene_key_ignores_object_order_and_names_background():
    a = Object("red", "circle", "large", 0, 0)
    b = Object("blue", "square", "small", 2, 1)
    assert Scene((a, b), "grey") == Scene((b, a), "grey")
    assert Scene((a, b), "grey").key() == Scene((b, a), "grey").key()
    assert Scene((a, b), "grey").key() != Scene((a, b), "white").key()
    assert Scene((a, b), "grey").content_key() == Scene((a, b), "white").content_key()


@given(scene=scenes())
def test_scene_dict_round_trip(scene):
    assert Scene.from_dict(scene.to_dict()) == scene


@given(scene=scenes(), image_size=st.sampled_from(IMAGE_SIZES))
def test_same_key_renders_identically(scene, image_size):
    rebuilt = Scene(tuple(reversed(scene.objects)), scene.background)
    assert rebuilt.key() == scene.key()
    assert np.array_equal(world.render(rebuilt, image_size), world.render(scene, image_size))


# --- rendering --------------------------------------------------------------


@given(scene=scenes(), image_size=st.sampled_from(IMAGE_SIZES))
def test_render_matches_scene_attributes(scene, image_size):
    image = world.render(scene, image_size)
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    background = np.array(world.BACKGROUNDS[scene.background])
    covered = np.zeros((image_size, image_size), dtype=bool)
    for obj in scene.objects:
        top, left, bottom, right = world.object_box(obj, image_size)
        colour = np.array(world.COLOURS[obj.colour])
        assert np.array_equal(image[(top + bottom) // 2, (left + right) // 2], colour)
        row_start, row_stop = world.cell_bounds(obj.row, image_size)
        col_start, col_stop = world.cell_bounds(obj.col, image_size)
        assert row_start <= top < bottom <= row_stop and col_start <= left < right <= col_stop
        # The object's pixels span its whole box and nothing else in the box.
        inside = image[top:bottom, left:right]
        is_object = np.all(inside == colour, axis=-1)
        assert np.all(is_object | np.all(inside == background, axis=-1))
        assert is_object.any(axis=1).all() and is_object.any(axis=0).all()
        covered[top:bottom, left:right] = True
    assert np.all(image[~covered] == background)


def test_render_pil_is_the_same_image():
    scene = Scene((Object("orange", "diamond", "large", 1, 2),), "white")
    picture = world.render_pil(scene, 48)
    assert picture.mode == "RGB" and picture.size == (48, 48)
    assert np.array_equal(np.asarray(picture), world.render(scene, 48))


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("shape", world.SHAPES)
def test_large_objects_cover_more_pixels_than_small(image_size, shape):
    counts = {}
    for size in world.SIZES:
        image = world.render(Scene((Object("red", shape, size, 1, 1),), "white"), image_size)
        counts[size] = int(np.all(image == world.COLOURS["red"], axis=-1).sum())
    assert counts["large"] > counts["small"] > 0


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("size", world.SIZES)
def test_shapes_are_distinguishable(image_size, size):
    masks = {}
    for shape in world.SHAPES:
        obj = Object("blue", shape, size, 1, 1)
        top, left, bottom, right = world.object_box(obj, image_size)
        crop = world.render(Scene((obj,), "white"), image_size)[top:bottom, left:right]
        masks[shape] = np.all(crop == world.COLOURS["blue"], axis=-1)
    side = len(masks["square"])
    mid = side // 2
    corners = lambda m: [m[0, 0], m[0, -1], m[-1, 0], m[-1, -1]]  # noqa: E731
    edge_middles = lambda m: [m[0, mid], m[mid, 0], m[mid, -1], m[-1, mid]]  # noqa: E731
    assert all(corners(masks["square"]))
    assert not any(corners(masks["circle"])) and all(edge_middles(masks["circle"]))
    assert not any(corners(masks["diamond"])) and all(edge_middles(masks["diamond"]))
    assert not any(corners(masks["cross"])) and all(edge_middles(masks["cross"]))
    triangle = masks["triangle"]
    assert not triangle[0, 0] and not triangle[0, -1] and triangle[-1, 0] and triangle[-1, -1]
    assert triangle[0].sum() == 1 and triangle[-1].all()
    # A pixel on the diagonal about halfway to the corner is in a diamond, not in a cross.
    quarter = (mid + 1) // 2
    assert masks["diamond"][quarter, quarter] and not masks["cross"][quarter, quarter]
    for a, b in [(a, b) for a in world.SHAPES for b in world.SHAPES if a < b]:
        assert not np.array_equal(masks[a], masks[b]), (a, b)


# --- captions ---------------------------------------------------------------


def test_canonical_captions():
    red_circle = Object("red", "circle", "large", 1, 0)
    blue_square = Object("blue", "square", "small", 1, 2)
    green_triangle = Object("green", "triangle", "small", 2, 1)
    assert world.canonical_caption(Scene((red_circle,))) == "a large red circle on the left"
    pair = Scene((blue_square, red_circle))
    assert world.canonical_caption(pair) == "a large red circle left of a small blue square"
    top = Object("yellow", "cross", "large", 0, 1)
    column = Scene((green_triangle, top))
    assert world.canonical_caption(column) == "a large yellow cross above a small green triangle"
    diagonal = Object("purple", "diamond", "small", 0, 2)
    assert (
        world.canonical_caption(Scene((diagonal, green_triangle)))
        == "a small purple diamond right of a small green triangle"
    )
    assert (
        world.canonical_caption(Scene((red_circle, blue_square, green_triangle)))
        == "a large red circle a small blue square and a small green triangle"
    )


def test_every_dataset_caption_is_true(dataset):
    for split in all_splits(dataset):
        for scene, options in zip(split.scenes, split.all_captions):
            assert len(options) == 2
            for caption in options:
                assert_true_caption(scene, caption)


@given(scene=scenes(), seed=st.integers(0, 2**32 - 1))
def test_described_and_canonical_captions_are_true(scene, seed):
    assert_true_caption(scene, world.canonical_caption(scene))
    rng = np.random.default_rng(seed)
    for _ in range(3):
        assert_true_caption(scene, world.describe(scene, rng))


def test_describe_uses_templates_and_synonyms():
    scene = Scene((Object("purple", "diamond", "small", 0, 0),))
    rng = np.random.default_rng(0)
    captions = {world.describe(scene, rng) for _ in range(300)}
    assert len(captions) > 20
    assert any(caption.startswith("in the top left corner there is") for caption in captions)
    assert any("little violet rhombus" in caption for caption in captions)


def test_parse_caption_ignores_case_punctuation_and_maps_synonyms():
    parsed = world.parse_caption("A BIG Violet Rhombus, on the left side!")
    assert parsed == [{
        "colour": "purple", "shape": "diamond", "size": "large", "row": 1, "col": 0,
        "relation": None, "relative_to": None,
    }]
    leading = world.parse_caption("in the top right corner there is a tiny yellow plus")
    assert [(p["shape"], p["size"], p["row"], p["col"]) for p in leading] == [("cross", "small", 0, 2)]
    relation = world.parse_caption("there is a little red box to the right of a big blue disc")
    assert [(p["colour"], p["shape"], p["relation"], p["relative_to"]) for p in relation] == [
        ("red", "square", "right", 1),
        ("blue", "circle", None, None),
    ]
    assert world.parse_caption("check out this image") == []
    assert world.parse_caption("") == []


def test_parse_caption_of_partial_model_output():
    parsed = world.parse_caption("a red a blue circle under")
    assert [(p["colour"], p["shape"]) for p in parsed] == [("red", None), ("blue", "circle")]
    assert parsed[1]["relation"] == "below" and parsed[1]["relative_to"] is None


def test_score_caption_per_attribute():
    scene = Scene((Object("red", "circle", "large", 1, 0),))
    assert world.score_caption(scene, "a large red circle on the left") == {
        "count": True, "colour": True, "shape": True, "size": True, "position": True
    }
    assert world.score_caption(scene, "a large blue circle on the left") == {
        "count": True, "colour": False, "shape": True, "size": True, "position": True
    }
    assert world.score_caption(scene, "a small red disc at the top") == {
        "count": True, "colour": True, "shape": True, "size": False, "position": False
    }
    assert world.score_caption(scene, "a red square") == {
        "count": True, "colour": True, "shape": False, "size": None, "position": None
    }
    assert world.score_caption(scene, "a red circle left of a blue square")["count"] is False
    assert not world.caption_is_true(scene, "a nice picture")


def test_score_caption_checks_relations_against_the_scene():
    scene = Scene((Object("red", "circle", "large", 1, 0), Object("blue", "square", "small", 1, 2)))
    assert world.caption_is_true(scene, "a big red disc to the left of a tiny blue box")
    assert world.caption_is_true(scene, "a blue square right of a red circle")
    wrong = world.score_caption(scene, "a red circle right of a blue square")
    assert wrong["position"] is False and wrong["colour"] and wrong["shape"]
    assert world.score_caption(scene, "a red circle above a blue square")["position"] is False


# --- splits -----------------------------------------------------------------


def test_same_seed_same_dataset_and_other_seed_differs():
    a = world.make_dataset(60, 10, 10, seed=11)
    b = world.make_dataset(60, 10, 10, seed=11)
    c = world.make_dataset(60, 10, 10, seed=12)
    for x, y in zip(all_splits(a), all_splits(b)):
        assert np.array_equal(x.images, y.images)
        assert x.captions == y.captions and x.scenes == y.scenes
        assert np.array_equal(x.image_ids, y.image_ids)
    assert a.train.captions != c.train.captions
    assert not np.array_equal(a.train.images, c.train.images)


def test_image_size_and_caption_count_do_not_change_scenes():
    small = world.make_dataset(50, 10, 10, seed=5)
    large = world.make_dataset(50, 10, 10, seed=5, image_size=64, captions_per_image=3)
    assert large.train.images.shape == (50, 64, 64, 3)
    for x, y in zip(all_splits(small), all_splits(large)):
        assert x.scenes == y.scenes


def test_compositional_split_does_not_depend_on_other_sizes():
    a = world.make_dataset(50, 10, 10, seed=5, n_compositional=20)
    b = world.make_dataset(80, 0, 30, seed=5, n_compositional=20)
    assert a.compositional.scenes == b.compositional.scenes


def test_split_layout(dataset):
    assert [len(s) for s in all_splits(dataset)] == [240, 40, 40, 40]
    assert [s.name for s in all_splits(dataset)] == ["train", "val", "test", "compositional"]
    for split in all_splits(dataset):
        n = len(split)
        assert split.images.shape == (n, 32, 32, 3) and split.images.dtype == np.uint8
        assert len(split.captions) == len(split.scenes) == len(split.all_captions) == n
        assert split.image_ids.shape == (n,) and split.image_ids.dtype == np.int64
        assert split.captions == [options[0] for options in split.all_captions]
        for image, scene in zip(split.images, split.scenes):
            assert np.array_equal(image, world.render(scene, 32))
    ids = np.concatenate([s.image_ids for s in all_splits(dataset)])
    assert np.array_equal(ids, np.arange(len(ids)))


def test_scene_contents_and_images_are_unique_across_splits(dataset):
    scenes = [scene for split in all_splits(dataset) for scene in split.scenes]
    assert len({scene.content_key() for scene in scenes}) == len(scenes)
    images = np.concatenate([s.images for s in all_splits(dataset)])
    assert len({image.tobytes() for image in images}) == len(images)


def test_held_out_combinations_only_in_compositional_split(dataset):
    held_out = set(world.HELD_OUT_COMBOS)
    assert dataset.held_out == tuple(sorted(held_out))
    for split in (dataset.train, dataset.val, dataset.test):
        for scene in split.scenes:
            assert not held_out & {(o.colour, o.shape) for o in scene.objects}
    for scene in dataset.compositional.scenes:
        assert held_out & {(o.colour, o.shape) for o in scene.objects}


def test_custom_holdout():
    data = world.make_dataset(40, 0, 0, seed=2, n_compositional=30, compositional_holdout=[("red", "cross")])
    combos = lambda scene: {(o.colour, o.shape) for o in scene.objects}  # noqa: E731
    assert all(("red", "cross") not in combos(scene) for scene in data.train.scenes)
    assert all(("red", "cross") in combos(scene) for scene in data.compositional.scenes)


def test_default_setting_mixes_one_and_two_objects(demo):
    counts = [len(scene.objects) for split in all_splits(demo) for scene in split.scenes]
    assert set(counts) == {1, 2}
    assert 0.25 < counts.count(1) / len(counts) < 0.75


def test_count_scenes():
    # 9 cells x 28 allowed (colour, shape) pairs x 2 sizes for one object.
    assert world.count_scenes(1) == 9 * 28 * 2
    assert world.count_scenes(2) == 9 * 28 * 2 + 36 * 28 * 27 * 4
    assert world.count_scenes(1, compositional=True) == 9 * 2 * 2
    assert world.count_scenes(1, held_out=()) == 9 * 30 * 2


def test_every_scene_can_be_requested_but_not_one_more():
    n = world.count_scenes(1)
    n_comp = world.count_scenes(1, compositional=True)
    data = world.make_dataset(n - 4, 2, 2, seed=0, max_objects=1, n_compositional=n_comp)
    keys = {scene.content_key() for split in all_splits(data) for scene in split.scenes}
    assert len(keys) == n + n_comp
    with pytest.raises(ValueError, match=f"at most {n}.*got {n + 1}"):
        world.make_dataset(n - 3, 2, 2, seed=0, max_objects=1, n_compositional=0)
    with pytest.raises(ValueError, match=f"n_compositional must be at most {n_comp}"):
        world.make_dataset(1, 1, 1, seed=0, max_objects=1, n_compositional=n_comp + 1)


def test_pairs_and_sampled_captions(dataset):
    split = dataset.train
    indices, captions = split.pairs()
    assert indices.shape == (2 * len(split),) and len(captions) == 2 * len(split)
    for index, caption in zip(indices, captions):
        assert caption in split.all_captions[index]
    fresh = split.sample_captions(np.random.default_rng(1))
    assert fresh == split.sample_captions(np.random.default_rng(1))
    for scene, caption in zip(split.scenes, fresh):
        assert_true_caption(scene, caption)


def test_generating_2000_scenes_is_fast():
    start = time.perf_counter()
    data = world.make_dataset(2000, 0, 0, seed=0)
    assert len(data.train) == 2000
    assert time.perf_counter() - start < 10.0


# --- noisy web captions -----------------------------------------------------


@given(fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_noisy_split_corrupts_exactly_the_fraction(demo, fraction, seed):
    split = demo.train
    noisy = world.make_noisy(split, fraction, seed)
    assert int(noisy.is_noisy.sum()) == round(fraction * len(split))
    assert noisy.clean_captions == split.captions
    assert np.array_equal(noisy.images, split.images) and noisy.scenes == split.scenes
    assert noisy.all_captions == [(caption,) for caption in noisy.captions]
    held_out = set(world.HELD_OUT_COMBOS)
    for i, (scene, caption, kind) in enumerate(zip(split.scenes, noisy.captions, noisy.noise_kind)):
        assert (kind is not None) == bool(noisy.is_noisy[i])
        assert set(caption.split()) <= VOCAB
        if kind is None:
            assert caption == split.captions[i]
            continue
        assert caption != split.captions[i]
        if kind == "filler":
            assert caption in world.FILLER_CAPTIONS and world.parse_caption(caption) == []
            continue
        assert not world.caption_is_true(scene, caption)
        if kind == "swap":
            donor = split.captions.index(caption)
            assert donor != i and split.scenes[donor].content_key() != scene.content_key()
        else:
            parsed = world.parse_caption(caption)
            assert len(parsed) == len(scene.objects)
            assert not held_out & {(p["colour"], p["shape"]) for p in parsed}
            wrong = world.score_caption(scene, caption)
            assert wrong["colour"] is False or wrong["shape"] is False


def test_noisy_split_is_deterministic_and_uses_requested_kinds(demo):
    a = world.make_noisy(demo.train, 0.4, seed=9)
    b = world.make_noisy(demo.train, 0.4, seed=9)
    assert a.captions == b.captions and a.noise_kind == b.noise_kind
    assert {kind for kind in a.noise_kind if kind} == set(world.NOISE_KINDS)
    only = world.make_noisy(demo.train, 0.3, seed=9, kinds=("attribute",))
    assert {kind for kind in only.noise_kind if kind} == {"attribute"}
    assert only.name == "train_noisy"


# --- files ------------------------------------------------------------------


def assert_same_split(a, b):
    assert type(a) is type(b) and a.name == b.name
    assert np.array_equal(a.images, b.images) and a.images.dtype == b.images.dtype
    assert a.captions == b.captions and a.scenes == b.scenes and a.all_captions == b.all_captions
    assert np.array_equal(a.image_ids, b.image_ids) and a.image_ids.dtype == b.image_ids.dtype
    if isinstance(a, world.NoisySplit):
        assert a.clean_captions == b.clean_captions and a.noise_kind == b.noise_kind
        assert np.array_equal(a.is_noisy, b.is_noisy) and b.is_noisy.dtype == bool


def test_save_load_round_trip(tmp_path, dataset):
    split = dataset.val
    world.save_split(split, tmp_path / "clean")
    assert_same_split(split, world.load_split(tmp_path / "clean"))
    names = sorted(os.listdir(tmp_path / "clean"))
    assert names == sorted([f"{i:06d}.png" for i in split.image_ids] + ["captions.jsonl"])

    noisy = world.make_noisy(split, 0.5, seed=0)
    world.save_split(noisy, tmp_path / "noisy")
    assert_same_split(noisy, world.load_split(tmp_path / "noisy"))


def test_save_overwrites_in_place(tmp_path, dataset):
    world.save_split(dataset.val, tmp_path)
    world.save_split(dataset.val, tmp_path)
    assert len(os.listdir(tmp_path)) == len(dataset.val) + 1
    assert_same_split(dataset.val, world.load_split(tmp_path))


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected one JSON object, got list"),
        ('{"file": "x.png"}', "expected keys"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(tmp_path, dataset, bad_line, message):
    world.save_split(dataset.val, tmp_path)
    path = tmp_path / "captions.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = bad_line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"captions.jsonl line 3: .*{message}"):
        world.load_split(tmp_path)


def test_bad_scene_or_field_in_jsonl_names_line(tmp_path, dataset):
    world.save_split(dataset.val, tmp_path)
    path = tmp_path / "captions.jsonl"
    original = path.read_text()
    path.write_text(original.replace('"colour": "red"', '"colour": "pink"', 1))
    line = next(i for i, text in enumerate(original.splitlines(), 1) if '"colour": "red"' in text)
    with pytest.raises(ValueError, match=f"line {line}: bad scene: .*'pink'"):
        world.load_split(tmp_path)
    first = int(dataset.val.image_ids[0])
    path.write_text(original.replace(f'"image_id": {first},', f'"image_id": "{first}",', 1))
    with pytest.raises(ValueError, match="line 1: image_id must be int, got str"):
        world.load_split(tmp_path)
    path.write_text(original.replace(f'"file": "{first:06d}.png"', f'"file": "../{first:06d}.png"', 1))
    with pytest.raises(ValueError, match="line 1: file must be a PNG file name"):
        world.load_split(tmp_path)


def test_missing_files_are_named(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        world.load_split(tmp_path / "nowhere")
    world.save_split(dataset.val, tmp_path)
    first = f"{dataset.val.image_ids[0]:06d}.png"
    os.remove(tmp_path / first)
    with pytest.raises(FileNotFoundError, match=f"{first}.*line 1"):
        world.load_split(tmp_path)


# --- bad arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(image_size=16), ValueError, "image_size must be >= 30, got 16"),
        (dict(n_train=-1), ValueError, "n_train must be >= 0, got -1"),
        (dict(n_val=2.5), TypeError, "n_val must be an int, got float"),
        (dict(max_objects=4), ValueError, r"max_objects must be in 1..3, got 4"),
        (dict(captions_per_image=0), ValueError, "captions_per_image must be >= 1, got 0"),
        (dict(seed=-3), ValueError, "seed must be >= 0, got -3"),
        (dict(compositional_holdout=[("pink", "circle")]), ValueError, "held-out colour must be one of"),
        (dict(compositional_holdout="purple"), TypeError, "held-out combinations must be a sequence"),
        (dict(n_train=10**6), ValueError, "must be at most 109368"),
    ],
)
def test_make_dataset_rejects_bad_arguments(kwargs, error, message):
    arguments = dict(n_train=4, n_val=2, n_test=2, seed=0) | kwargs
    with pytest.raises(error, match=message):
        world.make_dataset(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(noise_fraction=1.5), ValueError, r"noise_fraction must be in \[0, 1\], got 1.5"),
        (dict(noise_fraction=-0.1), ValueError, r"noise_fraction must be in \[0, 1\], got -0.1"),
        (dict(noise_fraction="half"), TypeError, "noise_fraction must be a number"),
        (dict(kinds=("bogus",)), ValueError, "noise kind must be one of"),
        (dict(kinds="swap"), TypeError, "kinds must be a sequence"),
        (dict(kinds=()), ValueError, "kinds must name at least one"),
    ],
)
def test_make_noisy_rejects_bad_arguments(demo, kwargs, error, message):
    arguments = dict(noise_fraction=0.2, seed=0) | kwargs
    with pytest.raises(error, match=message):
        world.make_noisy(demo.val, **arguments)


def test_make_noisy_rejects_noisy_input(demo):
    noisy = world.make_noisy(demo.val, 0.2, seed=0)
    with pytest.raises(ValueError, match="got a NoisySplit"):
        world.make_noisy(noisy, 0.2, seed=0)


def test_scene_and_render_reject_bad_input():
    red = Object("red", "circle", "large", 0, 0)
    with pytest.raises(ValueError, match="Object.colour must be one of .* got 'pink'"):
        Object("pink", "circle", "large", 0, 0)
    with pytest.raises(ValueError, match="Object.row must be in 0..2, got 3"):
        Object("red", "circle", "large", 3, 0)
    with pytest.raises(ValueError, match="distinct grid cells"):
        Scene((red, Object("blue", "square", "small", 0, 0)))
    with pytest.raises(ValueError, match=r"differ in \(colour, shape\)"):
        Scene((red, Object("red", "circle", "small", 1, 1)))
    with pytest.raises(ValueError, match="1..3 objects, got 0"):
        Scene(())
    with pytest.raises(ValueError, match="Scene.background must be one of"):
        Scene((red,), "black")
    with pytest.raises(ValueError, match="image_size must be >= 30, got 29"):
        world.render(Scene((red,)), 29)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got int"):
        world.describe(Scene((red,)), 0)
    with pytest.raises(TypeError, match="parse_caption expects a str, got NoneType"):
        world.parse_caption(None)


# --- committed samples ------------------------------------------------------


def test_committed_samples_regenerate_exactly(tmp_path):
    world.write_samples(tmp_path)
    for name in ("world_sample", "world_noisy_sample"):
        committed = SAMPLES / name
        regenerated = (tmp_path / name / "captions.jsonl").read_text()
        assert regenerated == (committed / "captions.jsonl").read_text()
        assert_same_split(world.load_split(committed), world.load_split(tmp_path / name))
    photo = Path("photos") / world.PHOTO_NAME
    assert (tmp_path / photo).read_bytes() == (SAMPLES / photo).read_bytes()
