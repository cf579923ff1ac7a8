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

One file per job, every public name importable from ``minblip.world``:

* :mod:`~minblip.world.scenes`: the attributes, :class:`Object`, :class:`Scene`
  and :func:`render`;
* :mod:`~minblip.world.captions`: the caption language, :func:`describe`,
  :func:`canonical_caption` and :func:`vocabulary`;
* :mod:`~minblip.world.scoring`: :func:`parse_caption` maps any caption (also a
  model's output) back to attributes, and :func:`score_caption` says per
  attribute whether a caption is right about a scene, which is how generated
  captions are evaluated;
* :mod:`~minblip.world.splits`: :func:`make_dataset` builds train/val/test
  splits with globally unique scene contents (so image-text retrieval has
  exactly one right answer) plus a compositional split made only of scenes that
  contain a held-out (colour, shape) combination never seen in train/val/test;
  :func:`make_noisy` corrupts an exact fraction of captions the way web alt-text
  is wrong, keeping the ground truth, for the CapFilt experiments;
* :mod:`~minblip.world.storage`: :func:`save_split` and :func:`load_split`
  store a split as PNG files plus ``captions.jsonl``; :func:`write_samples`
  writes the committed samples.

Run ``python -m minblip.world --write-samples data_samples`` to regenerate the
committed samples.
"""
from .captions import (COLOUR_WORDS, FILLER_CAPTIONS, MAX_CAPTION_WORDS, OBJECT_TEMPLATE,
                       PAIR_TEMPLATES, POSITION_PHRASES, RELATION_PHRASES, SHAPE_WORDS,
                       SINGLE_TEMPLATES, SIZE_WORDS, TRIPLE_TEMPLATES, canonical_caption, describe,
                       vocabulary)
from .scenes import (BACKGROUNDS, COL_NAMES, COLOURS, GRID, MAX_OBJECTS, MIN_IMAGE_SIZE, ROW_NAMES,
                     SHAPES, SIZES, Object, Scene, cell_bounds, check_choice, check_image_size,
                     check_int, object_box, object_side, render, render_pil, shape_mask)
from .scoring import caption_is_true, parse_caption, score_caption
from .splits import (HELD_OUT_COMBOS, NOISE_KINDS, NoisySplit, Split, WorldDataset, count_scenes,
                     make_dataset, make_noisy)
from .storage import (CAPTIONS_FILE, PHOTO_NAME, SAMPLE_CAPTIONS_PER_IMAGE, SAMPLE_IMAGES,
                      SAMPLE_NOISE_FRACTION, SAMPLE_NOISE_SEED, SAMPLE_SEED, load_split, save_split,
                      write_samples)
