"""BERT's WordPiece tokenizer, as BLIP uses it (``bert-base-uncased`` + [DEC] + [ENC]).

Text becomes tokens in two stages, mirroring Hugging Face ``BertTokenizer``
(``BasicTokenizer`` then ``WordpieceTokenizer``) and Google's original
``tokenization.py``:

1. **Basic tokenization.** Drop NUL, U+FFFD and control characters, turn every
   whitespace character into a space; put spaces around CJK ideographs; split
   on whitespace; lower-case each word and strip its accents (Unicode NFD, then
   drop the combining marks); split every punctuation character off as a word
   of its own ("don't" -> "don", "'", "t").

   Lower-casing is done one character at a time, as transformers 5's
   ``BertTokenizer`` (the Rust ``BertNormalizer``) does: a capital sigma always
   becomes "σ". BERT's Python tokenizers, among them the transformers 4.15 one
   salesforce/BLIP ran with, call ``str.lower`` on the word, which writes a
   word-final sigma as "ς"; ``legacy_lowercase=True`` does that.
2. **WordPiece.** Each word is cut greedily into the longest prefix found in the
   vocabulary, then the longest continuation found as "##piece", and so on
   ("unaffable" -> "un", "##aff", "##able"). A word with a part no vocabulary
   entry matches, or longer than 100 characters, becomes a single [UNK].

Special tokens written in the text ("[SEP]", "[DEC]", ...) are kept whole, as
Hugging Face keeps its special tokens. Decoding joins the pieces back:
tokens are separated by spaces, " ##" is removed, and Hugging Face's clean-up
attaches punctuation (" ." -> ".", " n't" -> "n't", ...).

BLIP's tokenizer (salesforce/BLIP ``models/blip.py init_tokenizer``) is
``bert-base-uncased`` with ``[DEC]`` (the decoder's beginning of sequence) and
``[ENC]`` (the first token for ITM) appended, ids 30522 and 30523 of a 30524
vocabulary. ``WordPieceTokenizer`` appends them when the vocabulary lacks them.

The interface follows :class:`minblip.tokenizer.Tokenizer` (``encode``,
``decode``, ``batch_decode``, the ``*_id`` properties), with one difference:
``decode`` does not stop at [SEP], as Hugging Face's does not.
"""
from __future__ import annotations

import os
import re
import unicodedata

import numpy as np

from .files import write_text_atomic
from .tokenizer import encode_texts, row_of_ids

MAX_CHARS_PER_WORD = 100  # BERT's max_input_chars_per_word
BLIP_TOKENS = ("[DEC]", "[ENC]")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") + BLIP_TOKENS

# Hugging Face's clean_up_tokenization: spaces before these are removed when decoding
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


# ---------------------------------------------------------------------------------------
# Character classes (BERT's _is_whitespace, _is_control, _is_punctuation)
# ---------------------------------------------------------------------------------------

def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":  # whitespace to BERT, not control
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    """Every non-alphanumeric ASCII character counts ("$", "^", "`" are not
    Unicode punctuation), plus every Unicode P* character."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    """The CJK Unified Ideographs blocks (not Hiragana, Katakana or Hangul, which
    are written with spaces)."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str, lower_case: bool = True, legacy_lowercase: bool = False
                   ) -> list[str]:
    """Stage 1: text -> words and punctuation marks (see the module docstring)."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    text = unicodedata.normalize("NFC", "".join(chars))
    words = []
    for word in text.split():
        if lower_case:
            # per character (transformers 5), or str.lower's final-sigma rule (legacy)
            word = word.lower() if legacy_lowercase else "".join(c.lower() for c in word)
            word = "".join(c for c in unicodedata.normalize("NFD", word)
                           if unicodedata.category(c) != "Mn")
        current = []
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
    return words


def wordpiece(word: str, vocab, unk: str = "[UNK]") -> list[str]:
    """Stage 2: one word -> its greedy longest-match-first pieces, or [unk]."""
    if len(word) > MAX_CHARS_PER_WORD:
        return [unk]
    pieces = []
    start = 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:  # not even one character matched here
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


class WordPieceTokenizer:
    """BERT WordPiece over a vocabulary list (``vocab.txt``: one token per line,
    line i = id i).

    ``tokens``: the vocabulary in id order. It must contain [PAD], [UNK], [CLS]
    and [SEP]; ``add_blip_tokens`` appends [DEC] and [ENC] if missing.
    ``legacy_lowercase``: lower-case as BERT's Python tokenizers did (see the
    module docstring).
    """

    def __init__(self, tokens, lower_case: bool = True, add_blip_tokens: bool = True,
                 legacy_lowercase: bool = False):
        if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)):
            raise TypeError(f"WordPieceTokenizer: expected a list of tokens, got "
                            f"{type(tokens).__name__}")
        self._tokens = list(tokens)
        if add_blip_tokens:
            self._tokens += [t for t in BLIP_TOKENS if t not in self._tokens]
        self._ids: dict[str, int] = {}
        for i, t in enumerate(self._tokens):
            if not isinstance(t, str) or not t or t != t.strip():
                raise ValueError(f"WordPieceTokenizer: token {i} must be a non-empty str "
                                 f"without surrounding whitespace, got {t!r}")
            self._ids.setdefault(t, i)  # a repeated line keeps its first id, as HF does
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self._ids]
        if missing:
            raise ValueError(f"WordPieceTokenizer: the vocabulary lacks {missing}")
        self.lower_case = lower_case
        self.legacy_lowercase = legacy_lowercase
        self._special = [t for t in SPECIAL_TOKENS if t in self._ids]
        self._special_ids = {self._ids[t] for t in self._special}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self._special) + ")")

    @classmethod
    def from_file(cls, path, **kw) -> "WordPieceTokenizer":
        """Read a ``vocab.txt`` (UTF-8, one token per line)."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n").rstrip("\r") for line in f]
        if tokens and tokens[-1] == "":
            tokens.pop()
        try:
            return cls(tokens, **kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"vocabulary file {path!r}: {e}") from None

    def save(self, path) -> None:
        """Write the vocabulary as ``vocab.txt`` (BLIP's two tokens included), atomically."""
        write_text_atomic(path, "".join(t + "\n" for t in self._tokens))

    # -- the vocabulary ------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[str]:
        return list(self._tokens)

    def _id_of(self, token: str) -> int:
        if token not in self._ids:
            raise ValueError(f"the vocabulary has no {token} token")
        return self._ids[token]

    @property
    def pad_id(self) -> int:
        return self._id_of("[PAD]")

    @property
    def unk_id(self) -> int:
        return self._id_of("[UNK]")

    @property
    def cls_id(self) -> int:
        return self._id_of("[CLS]")

    @property
    def sep_id(self) -> int:
        return self._id_of("[SEP]")

    @property
    def mask_id(self) -> int:
        return self._id_of("[MASK]")

    @property
    def dec_id(self) -> int:
        return self._id_of("[DEC]")

    @property
    def enc_id(self) -> int:
        return self._id_of("[ENC]")

    def token_to_id(self, token: str) -> int:
        """The id of a token; an unknown token maps to [UNK]."""
        return self._ids.get(token, self.unk_id)

    def id_to_token(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"token id must lie in [0, {self.vocab_size}), got {i}")
        return self._tokens[int(i)]

    # -- text -> ids -----------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """Text -> WordPiece tokens (no [CLS]/[SEP] added)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize: expected a str, got {type(text).__name__}")
        out = []
        for part in self._split.split(text):
            if part in self._special:
                out.append(part)
                continue
            for word in basic_tokenize(part, self.lower_case, self.legacy_lowercase):
                out += wordpiece(word, self._ids)
        return out

    def encode(self, texts, max_length: int = 30, padding: str = "longest"):
        """texts: a str or a list of B str -> ``(ids, attention_mask)``, int64 (B, T).

        Each row is ``[CLS] pieces [SEP]`` then [PAD]s (mask 0), cut to
        ``max_length`` tokens that still end with [SEP]; ``padding`` is
        "longest" (the batch's longest row) or "max_length". Like
        ``tokenizer(texts, padding=..., truncation=True, max_length=...)``.
        """
        return encode_texts(self, texts, max_length, padding)

    # -- ids -> text -----------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = True) -> str:
        """1-d ids -> text: pieces joined, "##" continuations glued to the piece
        before, special tokens dropped if ``skip_special_tokens``."""
        ids = row_of_ids(ids)
        if ids.size == 0:
            return ""
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            raise ValueError(f"decode: token ids must lie in [0, {self.vocab_size}), got "
                             f"{bad[:5].tolist()}")
        tokens = [self._tokens[i] for i in ids.tolist()
                  if not (skip_special_tokens and i in self._special_ids)]
        text = " ".join(tokens).replace(" ##", "").strip()
        if clean_up_tokenization_spaces:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        """(B, T) ids or a list of 1-d id sequences -> B texts."""
        if not isinstance(ids, (np.ndarray, list, tuple)):
            raise TypeError(f"batch_decode: expected a (B, T) array or a list of id "
                            f"sequences, got {type(ids).__name__}")
        return [self.decode(row, skip_special_tokens) for row in ids]

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"
