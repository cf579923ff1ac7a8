"""Byte-level BPE, the tokenizer of GPT-2 and OPT (BLIP-2's language model).

Reads the two files a Hugging Face ``GPT2Tokenizer`` folder holds:
``vocab.json`` ({token: id}) and ``merges.txt`` (one merge "a b" per line, the
first line merged first), plus the special tokens named in
``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json``
when they are there. Mirrors the Rust ``tokenizers`` pipeline that
transformers 5's ``GPT2Tokenizer`` builds (``pre_tokenizers.ByteLevel``,
``models.BPE``, ``decoders.ByteLevel``), in four steps:

1. **Special tokens.** The text is cut at every special or added token written
   in it (``</s>``, ``<pad>``, BLIP-2's ``<image>``, ...), longest first; each
   becomes its own id, the pieces between go on.
2. **Pre-tokenization**, GPT-2's pattern, written out below without the
   third-party ``regex`` module (Python's ``re`` has no ``\\p{L}``)::

       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   contractions; letters, digits or other symbols each with at most one
   leading space; a run of whitespace that leaves its last space to the word
   after it; any other whitespace. Letters and digits are Unicode categories
   L* and N*; whitespace is Oniguruma's ``\\s`` (tab to carriage return, NEL
   and the categories Zs, Zl, Zp).
3. **Bytes as characters.** Each piece's UTF-8 bytes become printable
   characters, one per byte (GPT-2's ``bytes_to_unicode``: the 188 printable
   Latin-1 bytes stand for themselves, the other 68 for chr(256 + n)), so a
   space is "Ġ" and no byte is ever unknown.
4. **Merges.** Starting from single characters, the adjacent pair with the
   earliest merge is joined, again and again, until no pair has a merge; the
   resulting symbols are the tokens.

Decoding joins the tokens, maps the characters back to bytes and decodes them
as UTF-8 (an invalid sequence becomes U+FFFD, ``errors="replace"``). OPT's
tokenizer puts ``</s>`` (its BOS) in front of every text
(``add_bos_token``); nothing is added at the end.
"""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import numpy as np

from .tokenizer import row_of_ids

# Oniguruma's \s in Unicode mode: \t \n \v \f \r, NEL, and the separator categories
_SPACE_CONTROLS = frozenset("\t\n\x0b\x0c\r\x85")
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an ASCII apostrophe


def _kind(ch: str) -> str:
    """"s" (whitespace), "L" (letter), "N" (number) or "o" (anything else)."""
    if ch in _SPACE_CONTROLS:
        return "s"
    cat = unicodedata.category(ch)
    if cat in ("Zs", "Zl", "Zp"):
        return "s"
    if cat[0] in "LN":
        return cat[0]
    return "o"


def pre_tokenize(text: str) -> list[str]:
    """Text -> the pieces GPT-2's pattern finds (see the module docstring),
    which together are the whole text."""
    kinds = [_kind(ch) for ch in text]
    n, i, out = len(text), 0, []
    while i < n:
        j = None
        if text[i] == "'":  # 's|'t|'re|'ve|'m|'ll|'d, in that order
            for c in _CONTRACTIONS:
                if text.startswith(c, i + 1):
                    j = i + 1 + len(c)
                    break
        if j is None:
            # ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': at most one space, then a run
            start = i + 1 if text[i] == " " and i + 1 < n and kinds[i + 1] != "s" else i
            kind = kinds[start]
            if kind != "s":
                j = start + 1
                while j < n and kinds[j] == kind:
                    j += 1
        if j is None:  # whitespace: '\s+(?!\S)', else '\s+'
            j = i + 1
            while j < n and kinds[j] == "s":
                j += 1
            if j < n and j - i > 1:
                j -= 1  # the last space stays for the word after it
        out.append(text[i:j])
        i = j
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: the printable bytes of Latin-1 map to
    themselves, the rest (controls, space, 0x7F-0xA0, 0xAD) to chr(256 + n) in order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = bytes_to_unicode()
_CHAR_BYTES = {c: b for b, c in _BYTE_CHARS.items()}


def _token_text(value) -> str | None:
    """A special token as the config files write it: a str or {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_merges(path) -> list[tuple[str, str]]:
    """``merges.txt``: an optional "#version" line, then one "left right" per line."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path} line {number}: expected two tokens separated by one "
                                 f"space, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path, data: dict):
    """The parts of a ``tokenizer.json`` (the Rust tokenizers' whole pipeline) that a
    byte-level BPE needs -> (vocab, merges, added tokens {token: id}, add_bos).
    Anything but GPT-2's pipeline (BPE model, ByteLevel pre-tokenizer with the
    regex and no prefix space) is refused, by name."""
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True)
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or model.get("dropout") or model.get("ignore_merges")):
        raise ValueError(f"{path}: minblip reads GPT-2's byte-level BPE only (a BPE model after "
                         f"a ByteLevel pre-tokenizer with its regex and no prefix space); got "
                         f"model {model.get('type')!r}, pre-tokenizer {pre.get('type')!r}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in model.get("merges") or []]
    added = {t["content"]: t["id"] for t in data.get("added_tokens") or []
             if isinstance(t, dict) and "content" in t and "id" in t}
    post = data.get("post_processor") or {}
    templates = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    add_bos = any(t.get("type") == "TemplateProcessing" and t.get("single")
                  and "SpecialToken" in t["single"][0] for t in templates)
    return model.get("vocab"), merges, added, add_bos


class ByteLevelBPETokenizer:
    """GPT-2 / OPT byte-level BPE over ``vocab`` ({token: id}) and ``merges``
    (a list of (left, right) pairs, earliest first).

    ``special``: the special and added tokens, matched whole in the text and
    dropped by ``decode(skip_special_tokens=True)``; they must be in ``vocab``
    or get ids in ``added`` ({token: id}). ``bos``/``eos``/``pad``/``unk``: the
    special tokens' texts (None if the tokenizer has none); ``add_bos``: put
    BOS in front of every encoded text (OPT's ``add_bos_token``).
    """

    def __init__(self, vocab: dict, merges, *, special=(), added=None, bos=None, eos=None,
                 pad=None, unk=None, add_bos: bool = False):
        if not isinstance(vocab, dict) or not all(
                isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for t, i in vocab.items()):
            raise ValueError("ByteLevelBPETokenizer: vocab must map token strings to ids >= 0")
        self._ids = dict(vocab)
        for token, i in (added or {}).items():
            if token in self._ids and self._ids[token] != i:
                raise ValueError(f"ByteLevelBPETokenizer: added token {token!r} has id {i}, "
                                 f"the vocabulary gives it {self._ids[token]}")
            self._ids[token] = i
        self._tokens = {i: t for t, i in self._ids.items()}
        if len(self._tokens) != len(self._ids):
            raise ValueError("ByteLevelBPETokenizer: two tokens share an id")
        self._ranks = {}
        for rank, pair in enumerate(merges):
            if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
                raise ValueError(f"ByteLevelBPETokenizer: merge {rank} must be two non-empty "
                                 f"strings, got {pair!r}")
            self._ranks.setdefault(tuple(pair), rank)  # a repeated merge keeps its first rank
        names = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
        for role, token in names.items():
            if token is not None and token not in self._ids:
                raise ValueError(f"ByteLevelBPETokenizer: the {role} token {token!r} is not in "
                                 f"the vocabulary")
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos, eos, pad, unk
        self.special_tokens = sorted({t for t in [*special, *names.values()] if t is not None},
                                     key=lambda t: (-len(t), t))  # longest first
        for token in self.special_tokens:
            if token not in self._ids:
                raise ValueError(f"ByteLevelBPETokenizer: special token {token!r} is not in the "
                                 f"vocabulary")
        self._special_ids = {self._ids[t] for t in self.special_tokens}
        self.add_bos = bool(add_bos)
        if self.add_bos and bos is None:
            raise ValueError("ByteLevelBPETokenizer: add_bos needs a bos token")
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_folder(cls, directory) -> "ByteLevelBPETokenizer":
        """A Hugging Face tokenizer folder: ``vocab.json`` and ``merges.txt`` (the
        files of a GPT-2 / OPT hub folder), or else the ``tokenizer.json`` that
        transformers 5's ``save_pretrained`` writes alone; with the special
        tokens and ``add_bos_token`` of ``tokenizer_config.json``,
        ``special_tokens_map.json`` and ``added_tokens.json`` when present."""
        d = Path(directory)

        def read_json(name, default):
            path = d / name
            if not path.is_file():
                return default
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None

        config = read_json("tokenizer_config.json", {})
        special_map = read_json("special_tokens_map.json", {})
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            vocab, merges = read_json("vocab.json", None), _read_merges(d / "merges.txt")
            added = read_json("added_tokens.json", {})
            add_bos = bool(config.get("add_bos_token", False))
        elif (d / "tokenizer.json").is_file():
            vocab, merges, added, add_bos = _read_tokenizer_json(d / "tokenizer.json",
                                                                 read_json("tokenizer.json", {}))
        else:
            raise FileNotFoundError(f"{d}: no vocab.json and merges.txt, and no tokenizer.json "
                                    f"(a byte-level BPE tokenizer needs one or the other)")
        if not isinstance(added, dict):
            raise ValueError(f"{d}: added tokens must map token strings to ids")
        added = dict(added)
        decoder = config.get("added_tokens_decoder") or {}
        for i, entry in decoder.items():
            token = _token_text(entry)
            if token is not None and str(i).isdigit():
                added.setdefault(token, int(i))
        extra = special_map.get("additional_special_tokens") or []
        special = [*added, *(t for t in (_token_text(e) for e in extra) if t)]

        def role(name):
            return _token_text(config.get(name)) or _token_text(special_map.get(name))

        try:
            return cls(vocab, merges, special=special, added=added, bos=role("bos_token"),
                       eos=role("eos_token"), pad=role("pad_token"), unk=role("unk_token"),
                       add_bos=add_bos)
        except ValueError as e:
            raise ValueError(f"tokenizer folder {os.fspath(d)!r}: {e}") from None

    # -- the vocabulary --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids need not be contiguous)."""
        return max(self._tokens) + 1

    def __len__(self) -> int:
        return len(self._ids)

    def _id_of(self, token):
        return None if token is None else self._ids[token]

    @property
    def bos_id(self):
        return self._id_of(self.bos_token)

    @property
    def eos_id(self):
        return self._id_of(self.eos_token)

    @property
    def pad_id(self):
        return self._id_of(self.pad_token)

    @property
    def unk_id(self):
        return self._id_of(self.unk_token)

    def token_to_id(self, token: str):
        """The id of a token, or None if it is not in the vocabulary."""
        return self._ids.get(token)

    def id_to_token(self, i: int) -> str:
        if int(i) not in self._tokens:
            raise ValueError(f"no token has id {i}")
        return self._tokens[int(i)]

    # -- text -> tokens -> ids ----------------------------------------------------

    def _bpe(self, piece: str) -> list[str]:
        """One pre-tokenized piece, as byte characters -> its merged symbols."""
        if piece in self._cache:
            return self._cache[piece]
        symbols = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            ranked = [(self._ranks[pair], k) for k, pair in enumerate(zip(symbols, symbols[1:]))
                      if pair in self._ranks]
            if not ranked:
                break
            _, k = min(ranked)  # the earliest merge; its leftmost place on a tie
            pair = (symbols[k], symbols[k + 1])
            merged, k = [], 0
            while k < len(symbols):  # join every occurrence of the pair, left to right
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
        self._cache[piece] = symbols
        return symbols

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """Text -> [(part, is_special)], special tokens cut out whole, longest first."""
        parts, start, i = [], 0, 0
        while i < len(text):
            for token in self.special_tokens:
                if text.startswith(token, i):
                    if start < i:
                        parts.append((text[start:i], False))
                    parts.append((token, True))
                    i = start = i + len(token)
                    break
            else:
                i += 1
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def tokenize(self, text: str) -> list[str]:
        """Text -> tokens (no BOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize: expected a str, got {type(text).__name__}")
        out = []
        for part, special in self._split_special(text):
            if special:
                out.append(part)
            else:
                for piece in pre_tokenize(part):
                    out += self._bpe(piece)
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Text -> ids (int64, 1-d), with BOS first when the tokenizer adds it (OPT)
        and ``add_special_tokens``. A symbol missing from the vocabulary becomes
        the unknown token, or is an error when there is none."""
        ids = [self.bos_id] if add_special_tokens and self.add_bos else []
        for token in self.tokenize(text):
            i = self._ids.get(token, self.unk_id)
            if i is None:
                raise ValueError(f"encode: {token!r} is not in the vocabulary and the "
                                 f"tokenizer has no unknown token")
            ids.append(i)
        return np.array(ids, dtype=np.int64)

    # -- ids -> text ---------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """1-d ids -> text: tokens joined, byte characters back to bytes, UTF-8
        decoded (invalid bytes become U+FFFD); special tokens dropped if asked,
        else written as they are."""
        ids = row_of_ids(ids)
        unknown = [i for i in ids.tolist() if i not in self._tokens]
        if unknown:
            raise ValueError(f"decode: no token has id {unknown[:5]}")
        text, pending = [], bytearray()
        for i in ids.tolist():
            if i in self._special_ids:
                text.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
                if not skip_special_tokens:
                    text.append(self._tokens[i])
                continue
            token = self._tokens[i]
            pending += bytes(_CHAR_BYTES[c] for c in token if c in _CHAR_BYTES)
        text.append(pending.decode("utf-8", errors="replace"))
        return "".join(text)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in ids]

    def __repr__(self) -> str:
        return (f"ByteLevelBPETokenizer({len(self)} tokens, {len(self._ranks)} merges, "
                f"add_bos={self.add_bos})")
