"""Byte-level BPE (GPT-2, OPT): the pre-tokenizer, the byte alphabet, merges, and
transformers' GPT2Tokenizer's ids and decodes on 65 odd strings, stored by
reference/make_hf_fixtures.py in tests/fixtures/hf/reference/bpe.json."""
import json
from pathlib import Path

import numpy as np
import pytest

from minblip.bpe import ByteLevelBPETokenizer, bytes_to_unicode, pre_tokenize

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
REFERENCE = json.loads((FIXTURES / "reference" / "bpe.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=["bpe", "bpe_json"])
def tok(request):
    """The same tokenizer as an OPT hub folder (vocab.json + merges.txt) and as
    transformers 5 saves it (tokenizer.json only)."""
    return ByteLevelBPETokenizer.from_folder(FIXTURES / request.param)


@pytest.mark.parametrize("text, pieces", [
    ("Hello world", ["Hello", " world"]),
    ("don't  stop", ["don", "'t", " ", " stop"]),           # a space left for the word after
    ("I'M 'll", ["I", "'", "M", " '", "ll"]),              # contractions: lower case only
    (" 12abc!!  ", [" 12", "abc", "!!", "  "]),              # trailing spaces stay together
    ("a\tb", ["a", "\t", "b"]),                             # one non-space whitespace alone
    ("x\n\n  y", ["x", "\n\n ", " y"]),
    ("你好 世界", ["你好", " 世界"]),                         # CJK are letters
    ("½²٣", ["½²٣"]),                                       # numbers of every script
    ("😀😀 ok", ["😀😀", " ok"]),                             # symbols run together
    ("\u3000x", ["\u3000", "x"]),                            # an ideographic space is whitespace
    ("", []),
])
def test_pre_tokenize_follows_gpt2s_pattern(text, pieces):
    assert pre_tokenize(text) == pieces
    assert "".join(pre_tokenize(text)) == text


def test_byte_alphabet_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())


def test_merges_apply_earliest_first_and_every_occurrence():
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "ab", "abc", "bc", "</s>"])}
    tok = ByteLevelBPETokenizer(vocab, [("a", "b"), ("ab", "c"), ("b", "c")], bos="</s>",
                                add_bos=True)
    assert tok.tokenize("abcab") == ["abc", "ab"]  # (a b) first everywhere, then (ab c)
    assert tok.tokenize("bcb") == ["bc", "b"]
    assert tok.encode("abc").tolist() == [6, 4]  # BOS first
    assert tok.decode(tok.encode("abcab")) == "abcab"
    with pytest.raises(ValueError, match="'d' is not in the vocabulary and the tokenizer has "
                                         "no unknown token"):
        tok.encode("d")


def test_ids_and_decodes_equal_transformers_gpt2_tokenizer(tok):
    texts = [c for c in REFERENCE["cases"] if c["text"] is not None]
    assert len(texts) >= 50
    for case in REFERENCE["cases"]:
        if case["text"] is not None:
            assert tok.encode(case["text"]).tolist() == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["decoded"], case["ids"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == \
            case["decoded_with_special"], case["ids"]


def test_special_tokens_and_roles(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 2, 1)
    assert tok.token_to_id("<image>") == 400 and tok.vocab_size == 401
    ids = tok.encode("<image><image> a</s>")
    assert ids[:3].tolist() == [2, 400, 400] and ids[-1] == 2  # cut out whole
    assert tok.decode(ids) == " a"
    assert tok.encode("<s>").tolist()[1:] != [0]  # "<s>" is not special in OPT: plain text


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocab.json and merges.txt, and no "
                                                "tokenizer.json"):
        ByteLevelBPETokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="merges.txt line 2: expected two tokens"):
        ByteLevelBPETokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("a b\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>"}))
    with pytest.raises(ValueError, match="the bos token '</s>' is not in the vocabulary"):
        ByteLevelBPETokenizer.from_folder(tmp_path)
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / f).unlink()
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordPiece", "vocab": {}},
         "pre_tokenizer": {"type": "BertPreTokenizer"}}))
    with pytest.raises(ValueError, match="GPT-2's byte-level BPE only"):
        ByteLevelBPETokenizer.from_folder(tmp_path)


def test_decode_checks_its_input(tok):
    with pytest.raises(ValueError, match="no token has id \\[999\\]"):
        tok.decode(np.array([5, 999]))
    with pytest.raises(ValueError, match="1-d array of integer ids"):
        tok.decode(np.ones((2, 2), dtype=np.int64))
    assert tok.decode(np.array([], dtype=np.int64)) == ""
