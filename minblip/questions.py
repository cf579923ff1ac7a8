"""Text about the world for the language model of BLIP-2: questions and answers.

BLIP-2's frozen language model (OPT) was pretrained on web text long before
BLIP-2 existed, and that is what lets it answer questions about an image it
never saw in training: it already knows how questions are answered, and the
soft prompt tells it what the image shows. minblip's language model learns
the same skills from text about the built-in world:

* :func:`scene_questions`: every question a scene answers unambiguously
  (colour, shape, size, count, the shape at a position), with its answer;
* :func:`lm_text` and :func:`lm_corpus`: pretraining documents (a caption, two
  captions of one scene, a caption followed by questions and answers);
* :func:`encode_documents`: documents packed into token ids, ``[CLS] segment
  [SEP]`` after one another, as LLM pretraining packs text;
* :func:`build_lm_tokenizer`: the world's caption words plus the words of the
  questions;
* for the encoder-decoder LM (:mod:`minblip.t5`): :func:`seq2seq_pair` splits a
  document into what the encoder reads and what the decoder writes,
  :func:`seq2seq_corpus` writes a corpus of such pairs, :func:`prefix_split`
  cuts a caption for BLIP-2's prefix language-modelling loss and
  :func:`encode_seq2seq` turns pairs into ids and labels (T5's layout: no BOS,
  every text closed by ``[SEP]``, T5's ``</s>``).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from . import world
from .core import check_rng
from .tokenizer import Tokenizer


QUESTION = "question"
ANSWER = "answer"
NUMBER_WORDS = ("one", "two", "three")
# Words the question-answer text needs beyond the captions' vocabulary.
QA_WORDS = (QUESTION, ANSWER, "colour", "shape", "size", "object", "objects", "how", "many",
            "are", *NUMBER_WORDS)
QUESTION_KINDS = ("colour", "shape", "size", "count", "shape_at")
TEXT_KINDS = ("caption", "qa", "caption_qa", "paraphrase")


def lm_vocabulary() -> list[str]:
    """The world's caption words (same ids as BLIP's tokenizer) followed by QA_WORDS."""
    words = world.vocabulary()
    return words + [w for w in QA_WORDS if w not in words]


def build_lm_tokenizer() -> Tokenizer:
    """The LM's tokenizer. Conventions: ``[CLS]`` is BOS (OPT's ``</s>``), ``[SEP]`` is
    EOS (BLIP-2's "\\n"), ``[PAD]`` = 0 pads on the right."""
    return Tokenizer(lm_vocabulary())


def scene_questions(scene: world.Scene) -> list[tuple[str, str, str]]:
    """Every question the scene answers unambiguously: (kind, question, answer).

    * colour: "what colour is the circle" (only for a shape that occurs once)
    * shape: "what shape is the red object" (only for a colour that occurs once)
    * size: "what size is the red circle" (colour and shape name one object)
    * count: "how many objects are there"
    * shape_at: "what shape is on the left" (a position phrase names one cell)
    Answers are one canonical word ("purple", not "violet"; "large", not "big").
    """
    if not isinstance(scene, world.Scene):
        raise TypeError(f"scene_questions expects a world.Scene, got {type(scene).__name__}")
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    out = []
    for o in scene.objects:
        if shapes[o.shape] == 1:
            out.append(("colour", f"what colour is the {o.shape}", o.colour))
        if colours[o.colour] == 1:
            out.append(("shape", f"what shape is the {o.colour} object", o.shape))
        out.append(("size", f"what size is the {o.colour} {o.shape}", o.size))
        out.append(("shape_at", f"what shape is {world.POSITION_PHRASES[(o.row, o.col)][0]}",
                    o.shape))
    out.append(("count", "how many objects are there", NUMBER_WORDS[len(scene.objects) - 1]))
    return out


def qa_text(question: str, answer: str | None = None) -> str:
    """ "question <question> answer <answer>"; without an answer, the prompt that asks for it."""
    text = f"{QUESTION} {question} {ANSWER}"
    return text if answer is None else f"{text} {answer}"


def answer_choices(kind: str, max_objects: int = world.MAX_OBJECTS) -> tuple[str, ...]:
    """The possible answers of a question kind (chance = 1 / len)."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"question kind must be one of {QUESTION_KINDS}, got {kind!r}")
    if kind == "colour":
        return tuple(world.COLOURS)
    if kind == "size":
        return world.SIZES
    if kind == "count":
        return NUMBER_WORDS[:max_objects]
    return world.SHAPES


def random_scenes(n: int, rng: np.random.Generator, max_objects: int = 2,
                  held_out=world.HELD_OUT_COMBOS) -> list[world.Scene]:
    """n random scenes of the world (repeats allowed), never using a held-out
    (colour, shape) combination, so the compositional split stays unseen."""
    check_rng(rng, optional=False)
    if isinstance(max_objects, bool) or not 1 <= int(max_objects) <= world.MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{world.MAX_OBJECTS}, got {max_objects!r}")
    held = {tuple(c) for c in held_out}
    combos = [(c, s) for c in world.COLOURS for s in world.SHAPES if (c, s) not in held]
    backgrounds = list(world.BACKGROUNDS)
    scenes = []
    for _ in range(int(n)):
        k = int(rng.integers(1, max_objects + 1))
        cells = rng.choice(world.GRID * world.GRID, size=k, replace=False)
        chosen = rng.choice(len(combos), size=k, replace=False)
        objects = tuple(world.Object(combos[j][0], combos[j][1],
                                     world.SIZES[int(rng.integers(len(world.SIZES)))],
                                     int(cell) // world.GRID, int(cell) % world.GRID)
                        for j, cell in zip(chosen, cells))
        scenes.append(world.Scene(objects, backgrounds[int(rng.integers(len(backgrounds)))]))
    return scenes


def lm_text(scene: world.Scene, kind: str, rng: np.random.Generator,
            n_questions: int = 2) -> list[str]:
    """One pretraining document about ``scene``, as a list of segments (each
    becomes ``[CLS] words [SEP]``, see :func:`encode_documents`):

    * "caption": [a caption from ``world.describe``]
    * "qa": ["question <q> answer <a>"], one random question
    * "caption_qa": [caption, "question <q1> answer <a1> question <q2> answer <a2>"]
      with ``n_questions`` different questions (fewer if the scene has fewer).
      The questions are a segment of their own after the caption, so the LM
      learns to answer from what came before its ``[CLS]``: where the soft
      prompt will sit in stage 2. (A caption still ends in ``[SEP]``, so
      captioning stops there.)
    * "paraphrase": [caption, another caption of the same scene]. The second
      is predictable from the first, so the LM learns to describe a scene it
      was told about before its ``[CLS]``: the skill stage 2 relies on when
      it asks the frozen LM to caption the scene a soft prompt describes.
    """
    if kind not in TEXT_KINDS:
        raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {kind!r}")
    caption = world.describe(scene, rng)
    if kind == "caption":
        return [caption]
    if kind == "paraphrase":
        return [caption, world.describe(scene, rng)]
    questions = scene_questions(scene)
    if kind == "qa":
        _, question, answer = questions[int(rng.integers(len(questions)))]
        return [qa_text(question, answer)]
    picks = rng.choice(len(questions), size=min(n_questions, len(questions)), replace=False)
    return [caption, " ".join(qa_text(questions[i][1], questions[i][2]) for i in picks)]


def encode_documents(tokenizer: Tokenizer, documents, max_length: int = 48):
    """documents: N lists of segments (str) -> (ids, attention_mask), int64 (N, max_length):
    each segment ``[CLS] words [SEP]``, the segments of a document one after the
    other (documents packed the way LLM pretraining packs them, BOS/EOS between),
    then ``[PAD]``. A document longer than ``max_length`` tokens raises ValueError."""
    ids = np.full((len(documents), max_length), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((len(documents), max_length), dtype=np.int64)
    for n, segments in enumerate(documents):
        if isinstance(segments, str) or not segments:
            raise TypeError(f"encode_documents: document {n} must be a non-empty list of "
                            f"str segments, got {segments!r}")
        row = []
        for segment in segments:
            seg_ids, _ = tokenizer.encode(segment, max_length=max_length)
            row += seg_ids[0].tolist()
        if len(row) > max_length:
            raise ValueError(f"encode_documents: document {n} has {len(row)} tokens, more than "
                             f"max_length={max_length}: {segments!r}")
        ids[n, :len(row)] = row
        mask[n, :len(row)] = 1
    return ids, mask


def lm_corpus(n: int, rng: np.random.Generator, kinds=TEXT_KINDS, kind_weights=None,
              max_objects: int = 2) -> list[list[str]]:
    """n pretraining documents about random scenes, each of a kind drawn from
    ``kinds`` with probabilities ``kind_weights`` (uniform by default)."""
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds must name at least one of {TEXT_KINDS}")
    for k in kinds:
        if k not in TEXT_KINDS:
            raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {k!r}")
    if kind_weights is None:
        p = np.full(len(kinds), 1.0 / len(kinds))
    else:
        p = np.asarray(kind_weights, dtype=np.float64)
        if p.shape != (len(kinds),) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"kind_weights: expected {len(kinds)} non-negative numbers, "
                             f"not all zero, got {kind_weights!r}")
        p = p / p.sum()
    drawn = rng.choice(len(kinds), size=n, p=p)
    return [lm_text(scene, kinds[k], rng) for scene, k in zip(random_scenes(n, rng, max_objects),
                                                              drawn)]


# ---------------------------------------------------------------------------------------
# Text for the encoder-decoder language model
# ---------------------------------------------------------------------------------------

def prefix_split(text: str, rng: np.random.Generator, min_prefix: int = 1) -> tuple[str, str]:
    """Cut ``text`` into (prefix, suffix) for BLIP-2's prefix language-modelling
    loss: the prefix is the first k words, k drawn uniformly from ``min_prefix`` to
    the midpoint (half the words, rounded down). The released LAVIS code takes the
    two parts as given; the split point is the author's description (LAVIS issue
    #139: "from position 1 to the midpoint"), so ``min_prefix=1`` follows it and
    ``min_prefix=0`` also allows the empty prefix of zero-shot captioning."""
    words = text.split()
    top = max(len(words) // 2, min_prefix)
    k = int(rng.integers(min_prefix, top + 1))
    return " ".join(words[:k]), " ".join(words[k:])


def seq2seq_pair(segments, rng: np.random.Generator, min_prefix: int = 0
                 ) -> tuple[list[str], str]:
    """A pretraining document (segments, :func:`lm_text`) -> (encoder segments,
    decoder text): everything but the end of the last segment goes to the
    encoder. A question-answer segment is cut before its answer (the last word);
    any other is cut by :func:`prefix_split` (at least one word of prefix when
    it is the only segment). The encoder-decoder LM so learns the same three
    skills the decoder-only LM learns from the whole document: to write a
    caption about a scene described before it, to continue one, and to answer."""
    *context, last = segments
    if last.startswith(QUESTION + " "):
        head, answer = last.rsplit(" ", 1)
        return context + [head], answer
    prefix, suffix = prefix_split(last, rng, min_prefix if context else max(min_prefix, 1))
    return context + [prefix], suffix


def seq2seq_corpus(n: int, rng: np.random.Generator, kinds=TEXT_KINDS, kind_weights=None,
                   max_objects: int = 2) -> list[tuple[list[str], str]]:
    """n (encoder segments, decoder text) pairs: the documents of :func:`lm_corpus`
    cut by :func:`seq2seq_pair`."""
    return [seq2seq_pair(doc, rng) for doc in lm_corpus(n, rng, kinds, kind_weights,
                                                        max_objects)]


def encode_seq2seq(tokenizer: Tokenizer, encoder_texts, decoder_texts=None,
                   max_length: int = 48):
    """Pairs -> (enc_ids, enc_mask, labels), int64, in T5's layout.

    ``encoder_texts``: N lists of segments (or N strings, one segment each); each
    segment becomes ``words [SEP]`` (an empty one just ``[SEP]``, as T5's tokenizer
    turns "" into ``</s>``), packed one after the other, right-padded with
    ``[PAD]`` to the longest. ``decoder_texts``: N strings, each ``words [SEP]``,
    padded with -100 (ignored by the loss), or None (no labels). A text longer
    than ``max_length`` tokens raises ValueError."""
    def rows(texts, what):
        out = []
        for n, segments in enumerate(texts):
            segments = [segments] if isinstance(segments, str) else list(segments)
            row = []
            for segment in segments:  # no BOS: T5 closes a text with </s> only
                row += [tokenizer.token_to_id(w) for w in tokenizer.tokenize(segment)]
                row.append(tokenizer.sep_id)
            if len(row) > max_length:
                raise ValueError(f"encode_seq2seq: {what} {n} has {len(row)} tokens, more "
                                 f"than max_length={max_length}: {segments!r}")
            out.append(row)
        return out

    def pack(seqs, fill):
        width = max(len(r) for r in seqs)
        ids = np.full((len(seqs), width), fill, dtype=np.int64)
        for n, r in enumerate(seqs):
            ids[n, :len(r)] = r
        return ids

    enc = rows(encoder_texts, "encoder text")
    enc_ids = pack(enc, tokenizer.pad_id)
    enc_mask = pack([[1] * len(r) for r in enc], 0)
    if decoder_texts is None:
        return enc_ids, enc_mask, None
    if len(decoder_texts) != len(enc):
        raise ValueError(f"encode_seq2seq: {len(enc)} encoder texts but {len(decoder_texts)} "
                         f"decoder texts")
    return enc_ids, enc_mask, pack(rows(decoder_texts, "decoder text"), -100)
