"""BERT WordPiece: basic tokenization, greedy longest-match pieces, [UNK], decoding.

A small hand-written vocab.txt stands in for bert-base-uncased. The comparison
with Hugging Face's BertTokenizer on many strings is in tests/test_torch_parity.py
(it needs transformers).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minblip.wordpiece import (MAX_CHARS_PER_WORD, WordPieceTokenizer, basic_tokenize,
                               wordpiece)

VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "a", "the", "cat", "dog", "un", "##aff", "##able", "play", "##ing", "##ed", "##s",
         "hello", "world", ",", ".", "!", "'", "t", "don", "cafe", "naive", "you", "你", "好",
         "run", "##n", "r", "##u", "-", "$", "5"]


@pytest.fixture
def tok(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_file(path)


def test_vocab_file_ids_and_blip_tokens(tok):
    assert tok.vocab_size == len(VOCAB) + 2  # [DEC] and [ENC] appended, as BLIP does
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    assert (tok.dec_id, tok.enc_id) == (len(VOCAB), len(VOCAB) + 1)
    assert tok.id_to_token(tok.dec_id) == "[DEC]" and tok.token_to_id("zebra") == tok.unk_id
    plain = WordPieceTokenizer(VOCAB, add_blip_tokens=False)
    assert plain.vocab_size == len(VOCAB)
    with pytest.raises(ValueError, match="no \\[DEC\\]"):
        plain.dec_id


@pytest.mark.parametrize("text, pieces", [
    ("unaffable", ["un", "##aff", "##able"]),              # greedy longest match first
    ("The CAT", ["the", "cat"]),                          # lower-cased
    ("Café naïve", ["cafe", "naive"]),                    # accents stripped
    ("hello, world!", ["hello", ",", "world", "!"]),       # punctuation split off
    ("don't", ["don", "'", "t"]),
    ("playing played plays", ["play", "##ing", "play", "##ed", "play", "##s"]),
    ("run runn", ["run", "run", "##n"]),                  # "runn": longest first, not r ##u ##n ##n
    ("dogx", ["[UNK]"]),                                  # a part matches nothing: whole word [UNK]
    ("你好", ["你", "好"]),                                 # CJK characters are words of their own
    ("a\tcat\n\u3000dog", ["a", "cat", "dog"]),           # any whitespace separates
    ("c\x00a\u200bt", ["cat"]),                           # NUL and format characters vanish
    ("$5", ["$", "5"]),                                   # ASCII symbols count as punctuation
    ("a-cat", ["a", "-", "cat"]),
    ("hello [SEP] world [DEC]", ["hello", "[SEP]", "world", "[DEC]"]),  # special tokens whole
    ("hello[SEP]world", ["hello", "[SEP]", "world"]),
    ("[sep]", ["[UNK]", "[UNK]", "[UNK]"]),               # lower case is not the special token
    ("", []),
])
def test_tokenize(tok, text, pieces):
    assert tok.tokenize(text) == pieces


def test_words_longer_than_the_limit_are_unk():
    vocab = {"a", "##a"}
    assert wordpiece("a" * MAX_CHARS_PER_WORD, vocab) == ["a"] + ["##a"] * (MAX_CHARS_PER_WORD - 1)
    assert wordpiece("a" * (MAX_CHARS_PER_WORD + 1), vocab) == ["[UNK]"]


def test_capital_sigma_lowercases_as_transformers_5_or_as_the_legacy_tokenizers():
    # transformers 5's BertTokenizer lower-cases one character at a time: always "σ";
    # str.lower (BERT's Python tokenizers, transformers 4.15) writes a final "ς"
    assert basic_tokenize("ΣΑΣ ΟΔΟΣ σ") == ["σασ", "οδοσ", "σ"]
    assert basic_tokenize("ΣΑΣ ΟΔΟΣ σ", legacy_lowercase=True) == ["σας", "οδος", "σ"]
    assert basic_tokenize("İstanbul") == basic_tokenize("İstanbul", legacy_lowercase=True)
    sigma = WordPieceTokenizer(VOCAB + ["σασ", "σας"])
    legacy = WordPieceTokenizer(VOCAB + ["σασ", "σας"], legacy_lowercase=True)
    assert sigma.tokenize("ΣΑΣ") == ["σασ"] and legacy.tokenize("ΣΑΣ") == ["σας"]


def test_basic_tokenize_keeps_case_when_asked():
    assert basic_tokenize("Café, OK", lower_case=False) == ["Café", ",", "OK"]


def test_encode_layout_truncation_and_padding(tok):
    ids, mask = tok.encode(["the cat", "hello, world! the dog"], max_length=6)
    assert ids.tolist() == [[3, 7, 8, 4, 0, 0], [3, 17, 19, 18, 21, 4]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    ids, _ = tok.encode("a cat", max_length=8, padding="max_length")
    assert ids.shape == (1, 8) and ids.dtype == np.int64


def test_decode_joins_pieces_and_cleans_spaces(tok):
    ids, _ = tok.encode("Unaffable cats don't play, hello world!")
    assert tok.decode(ids[0]) == "unaffable cats don't play, hello world!"
    assert tok.decode(ids[0], skip_special_tokens=False).startswith("[CLS] unaffable")
    assert tok.decode(ids[0], clean_up_tokenization_spaces=False) == \
        "unaffable cats don ' t play , hello world !"
    assert tok.batch_decode(np.array([[3, 7, 8, 4], [3, 9, 4, 0]])) == ["the cat", "dog"]
    assert tok.decode(np.array([], dtype=np.int64)) == ""


def test_bad_input(tok):
    with pytest.raises(TypeError, match="list of str, got int"):
        tok.encode(5)
    with pytest.raises(ValueError, match="empty list"):
        tok.encode([])
    with pytest.raises(ValueError, match="at least 2"):
        tok.encode("a", max_length=1)
    with pytest.raises(ValueError, match="must lie in \\[0, 39\\), got \\[99\\]"):
        tok.decode(np.array([3, 99]))
    with pytest.raises(ValueError, match="lacks \\['\\[CLS\\]'\\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[SEP]"])


def test_save_and_reload(tok, tmp_path):
    tok.save(tmp_path / "v.txt")
    again = WordPieceTokenizer.from_file(tmp_path / "v.txt")
    assert again.tokens == tok.tokens and again.vocab_size == tok.vocab_size


@given(st.lists(st.sampled_from(["the", "cat", "dog", "unaffable", "playing", "hello", ",",
                                 "!", "you", "cafe"]), max_size=12))
def test_decode_inverts_encode_on_vocabulary_words(words):
    tok = WordPieceTokenizer(VOCAB)
    text = " ".join(words)
    ids, _ = tok.encode(text, max_length=64)
    assert tok.decode(ids[0], clean_up_tokenization_spaces=False) == text
