"""A word-level tokenizer with BLIP's special tokens.

BLIP tokenizes with ``bert-base-uncased`` WordPiece and adds two tokens of its
own (salesforce/BLIP ``models/blip.py init_tokenizer``): ``[DEC]`` as the
beginning-of-sequence token of the image-grounded decoder and ``[ENC]`` as the
first token of the image-grounded encoder. minblip keeps every structural
choice of that tokenizer and replaces WordPiece by a fixed list of whole
words, which is enough for a small synthetic caption world:

* ids 0..5 are ``[PAD] [UNK] [CLS] [SEP] [DEC] [ENC]``; ordinary words follow
  from id 6 in the order given;
* a text becomes ``[CLS] w1 .. wn [SEP]`` followed by ``[PAD]``s, with an
  attention mask of 1 on real tokens and 0 on padding, exactly the layout of
  ``BertTokenizer(text, padding=..., truncation=True, max_length=...)``;
* BLIP then overwrites position 0 with ``[ENC]`` (ITM) or ``[DEC]`` (LM); that
  is the model's job, not the tokenizer's.

The ids differ from BERT's (there ``[PAD]`` = 0, ``[UNK]`` = 100, ``[CLS]`` =
101, ``[SEP]`` = 102, ``[DEC]`` = 30522, ``[ENC]`` = 30523); nothing in the
model depends on their values except ``[PAD]`` = 0.
"""
from __future__ import annotations

import json
import os
import re
import string

import numpy as np

from .files import write_text_atomic

_FORMAT = "minblip-tokenizer"
_VERSION = 1

# Every ASCII punctuation character becomes a space (see ``Tokenizer.clean``).
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")
_SPACES = re.compile(r"\s+")


class Tokenizer:
    """Maps text to ``[CLS] w1 .. wn [SEP] [PAD]..`` id arrays and back.

    ``words`` are the ordinary vocabulary words, lowercase, without spaces or
    punctuation (a word ``clean`` would change could never be matched). They get
    ids 6, 7, ... in the given order; repeats are dropped.
    """

    SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]", "[ENC]")

    def __init__(self, words):
        if isinstance(words, str) or not isinstance(words, (list, tuple)):
            raise TypeError(f"Tokenizer: expected a list of words, got {type(words).__name__}")
        self._tokens: list[str] = list(self.SPECIAL_TOKENS)
        self._ids: dict[str, int] = {t: i for i, t in enumerate(self.SPECIAL_TOKENS)}
        for w in words:
            if not isinstance(w, str):
                raise TypeError(f"Tokenizer: every word must be a str, got {w!r} "
                                f"({type(w).__name__})")
            if w in self.SPECIAL_TOKENS:
                raise ValueError(f"Tokenizer: {w!r} is a special token, not an ordinary word")
            if not w or self.clean(w) != w or " " in w:
                raise ValueError(f"Tokenizer: words must be non-empty, lowercase, without spaces "
                                 f"or punctuation (unchanged by Tokenizer.clean); got {w!r}")
            if w not in self._ids:
                self._ids[w] = len(self._tokens)
                self._tokens.append(w)

    # -- the vocabulary ------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def cls_id(self) -> int:
        return 2

    @property
    def sep_id(self) -> int:
        return 3

    @property
    def dec_id(self) -> int:
        return 4

    @property
    def enc_id(self) -> int:
        return 5

    @property
    def words(self) -> list[str]:
        """The ordinary words, in id order (ids 6, 7, ...)."""
        return self._tokens[len(self.SPECIAL_TOKENS):]

    @property
    def tokens(self) -> list[str]:
        """Every token in id order: the six special tokens, then the words."""
        return list(self._tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int:
        """The id of a token; an unknown token maps to ``[UNK]``."""
        return self._ids.get(token, self.unk_id)

    def id_to_token(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"token id must lie in [0, {self.vocab_size}), got {i}")
        return self._tokens[int(i)]

    # -- text -> ids -----------------------------------------------------------

    @staticmethod
    def clean(text: str, max_words: int | None = None) -> str:
        """Normalise a caption the way BLIP's ``pre_caption`` does
        (salesforce/BLIP ``data/utils.py``): lowercase, punctuation to spaces,
        runs of whitespace to one space, strip; optionally keep ``max_words`` words.

        ``pre_caption`` removes only ``.!"()*#:;~``; BERT's basic tokenizer then
        splits every other punctuation mark off as a token of its own. A word
        vocabulary has no punctuation tokens, so here every ASCII punctuation
        character becomes a space ("t-shirt" -> "t shirt").
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.clean: expected a str, got {type(text).__name__}")
        text = _PUNCTUATION.sub(" ", text.lower())
        text = _SPACES.sub(" ", text).strip()
        if max_words is not None:
            text = " ".join(text.split(" ")[:max_words])
        return text

    def tokenize(self, text: str) -> list[str]:
        """The cleaned words of ``text`` (unknown words included as they are)."""
        cleaned = self.clean(text)
        return cleaned.split(" ") if cleaned else []

    def encode(self, texts, max_length: int = 30, padding: str = "longest"):
        """texts: a str or a list of B str ->
        ``(ids, attention_mask)``, both int64 of shape (B, T).

        Each row is ``[CLS] w1 .. wn [SEP]`` then ``[PAD]``s (mask 0). Unknown
        words become ``[UNK]``. A text longer than ``max_length`` tokens is cut
        to exactly ``max_length`` tokens that still end with ``[SEP]`` (BERT's
        truncation). ``padding="longest"`` pads to the longest row of the batch,
        ``"max_length"`` to ``max_length`` (BLIP pre-training uses the latter
        with ``max_length=30``).
        """
        return encode_texts(self, texts, max_length, padding)

    # -- ids -> text -----------------------------------------------------------

    def _check_ids(self, ids, ndim: int, name: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size == 0:
            ids = ids.astype(np.int64)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
        if ids.ndim != ndim:
            raise ValueError(f"{name}: expected a {ndim}-d array of ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            raise ValueError(f"{name}: token ids must lie in [0, {self.vocab_size}), "
                             f"got {bad.ravel()[:5].tolist()}")
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """1-d ids -> text. Reading stops at the first ``[SEP]`` after position 0
        (the end of a caption, and the generation stop token); the rest is padding
        or garbage. With ``skip_special_tokens`` every special token is dropped,
        ``[UNK]`` included, as in Hugging Face; otherwise they are kept, the
        final ``[SEP]`` too."""
        ids = self._check_ids(ids, 1, "decode")
        out = []
        n_special = len(self.SPECIAL_TOKENS)
        for pos, i in enumerate(ids.tolist()):
            if not (skip_special_tokens and i < n_special):
                out.append(self._tokens[i])
            if i == self.sep_id and pos > 0:
                break
        return " ".join(out)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        """(B, T) ids, or a list of 1-d id sequences of any lengths -> B texts."""
        if isinstance(ids, np.ndarray):
            ids = self._check_ids(ids, 2, "batch_decode")
        elif not isinstance(ids, (list, tuple)):
            raise TypeError(f"batch_decode: expected a (B, T) array or a list of id "
                            f"sequences, got {type(ids).__name__}")
        return [self.decode(row, skip_special_tokens) for row in ids]

    # -- files -----------------------------------------------------------------

    def save(self, path) -> None:
        """Write the vocabulary as JSON to ``path``, atomically (a crash never leaves
        half a file)."""
        data = {"format": _FORMAT, "version": _VERSION,
                "special_tokens": list(self.SPECIAL_TOKENS), "words": self.words}
        write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file written by ``save``; a malformed file raises ValueError naming it."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer file {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"tokenizer file {path!r}: expected a JSON object with "
                             f"\"format\": \"{_FORMAT}\"")
        if data.get("version") != _VERSION:
            raise ValueError(f"tokenizer file {path!r}: expected version {_VERSION}, "
                             f"got {data.get('version')!r}")
        if data.get("special_tokens") != list(cls.SPECIAL_TOKENS):
            raise ValueError(f"tokenizer file {path!r}: expected special_tokens "
                             f"{list(cls.SPECIAL_TOKENS)}, got {data.get('special_tokens')!r}")
        words = data.get("words")
        if not isinstance(words, list):
            raise ValueError(f"tokenizer file {path!r}: expected \"words\" to be a list, "
                             f"got {type(words).__name__}")
        try:
            return cls(words)
        except (TypeError, ValueError) as e:
            raise ValueError(f"tokenizer file {path!r}: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def row_of_ids(ids, who: str = "decode") -> np.ndarray:
    """Ids to decode -> a 1-d integer array (an empty one allowed), or an error
    naming the shape and dtype that came."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return ids.reshape(0).astype(np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{who}: expected a 1-d array of integer ids, got shape "
                         f"{ids.shape} and dtype {ids.dtype}")
    return ids


def encode_texts(tokenizer, texts, max_length: int, padding: str):
    """``encode`` of :class:`Tokenizer` and of ``minblip.wordpiece.WordPieceTokenizer``:
    the input checks, BERT's truncation (keep ``max_length - 2`` tokens, then
    [SEP]) and the padding, with ``tokenizer``'s ``tokenize``, ``token_to_id``
    and special ids. Returns ``(ids, attention_mask)``, int64 (B, T)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"encode: expected a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError("encode: expected at least one text, got an empty list")
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"encode: every text must be a str, got {t!r} ({type(t).__name__})")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise TypeError(f"encode: max_length must be an int, got {max_length!r}")
    if max_length < 2:
        raise ValueError(f"encode: max_length must be at least 2 (room for [CLS] and "
                         f"[SEP]), got {max_length}")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"encode: padding must be 'longest' or 'max_length', got {padding!r}")
    rows = []
    for t in texts:
        tokens = [tokenizer.token_to_id(w) for w in tokenizer.tokenize(t)][:max_length - 2]
        rows.append([tokenizer.cls_id] + tokens + [tokenizer.sep_id])
    width = max_length if padding == "max_length" else max(len(r) for r in rows)
    ids = np.full((len(rows), width), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
        mask[b, :len(r)] = 1
    return ids, mask


def prompt_ids(tokenizer, prompt: str) -> np.ndarray:
    """``[CLS] prompt`` as 1-d int64 ids for generation to continue: no ``[SEP]``,
    and never cut, whatever its length (``encode`` would silently truncate it to
    its ``max_length``; ``minblip.generation.generate`` instead refuses a prompt
    that leaves no room under its ``max_length``, which counts the prompt).
    ``tokenizer``: a :class:`Tokenizer` or a WordPiece tokenizer."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
    ids, _ = tokenizer.encode(prompt, max_length=len(tokenizer.tokenize(prompt)) + 2)
    return ids[0, :-1]
