"""The word-level tokenizer: special ids, layout, truncation, padding, decoding, files."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minblip.tokenizer import Tokenizer

WORDS = ["a", "red", "dog", "on", "the", "grass", "blue", "cat", "sits"]


@pytest.fixture
def tok():
    return Tokenizer(WORDS)


def test_special_ids_come_first_in_order(tok):
    assert Tokenizer.SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]", "[ENC]")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.dec_id, tok.enc_id) == \
        (0, 1, 2, 3, 4, 5)
    assert [tok.id_to_token(i) for i in range(6)] == list(Tokenizer.SPECIAL_TOKENS)
    assert tok.vocab_size == len(tok) == 6 + len(WORDS)


def test_words_get_ids_from_6_in_order_without_repeats():
    tok = Tokenizer(["dog", "cat", "dog", "sun"])
    assert tok.words == ["dog", "cat", "sun"]
    assert [tok.token_to_id(w) for w in ("dog", "cat", "sun")] == [6, 7, 8]
    assert tok.token_to_id("zebra") == tok.unk_id
    assert tok.vocab_size == 9


@pytest.mark.parametrize("bad, err", [
    (["Dog"], ValueError), (["red dog"], ValueError), (["dog."], ValueError),
    (["[SEP]"], ValueError), ([""], ValueError), ([3], TypeError), ("dog cat", TypeError),
    (None, TypeError)])
def test_bad_vocabulary_is_refused(bad, err):
    with pytest.raises(err):
        Tokenizer(bad)


def test_clean_follows_pre_caption():
    assert Tokenizer.clean("  A Red DOG!!  on the grass.\n") == "a red dog on the grass"
    assert (Tokenizer.clean('"Two" (small) cats: one; two~ #three*')
            == "two small cats one two three")
    assert Tokenizer.clean("a t-shirt, isn't it?") == "a t shirt isn t it"
    assert Tokenizer.clean("one two three four", max_words=2) == "one two"
    assert Tokenizer.clean("...") == ""
    with pytest.raises(TypeError):
        Tokenizer.clean(5)


def test_encode_layout(tok):
    ids, mask = tok.encode(["A red dog.", "the cat"])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    np.testing.assert_array_equal(ids, [[2, 6, 7, 8, 3], [2, 10, 13, 3, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    one, one_mask = tok.encode("a dog")
    assert one.shape == (1, 4) and one_mask.all()
    empty, _ = tok.encode("")
    np.testing.assert_array_equal(empty, [[tok.cls_id, tok.sep_id]])


def test_unknown_words_become_unk(tok):
    ids, _ = tok.encode("a purple dog")
    np.testing.assert_array_equal(ids, [[2, 6, tok.unk_id, 8, 3]])
    assert tok.decode(ids[0]) == "a dog"
    assert tok.decode(ids[0], skip_special_tokens=False) == "[CLS] a [UNK] dog [SEP]"


def test_truncation_keeps_sep(tok):
    text = " ".join(["dog"] * 50)
    ids, mask = tok.encode([text, "a cat"], max_length=7)
    assert ids.shape == (2, 7)
    np.testing.assert_array_equal(ids[0], [2, 8, 8, 8, 8, 8, 3])
    assert mask[0].all()
    ids2, _ = tok.encode(text, max_length=2)
    np.testing.assert_array_equal(ids2, [[tok.cls_id, tok.sep_id]])


def test_padding_modes(tok):
    longest, m1 = tok.encode(["a", "a red dog"], max_length=10, padding="longest")
    fixed, m2 = tok.encode(["a", "a red dog"], max_length=10, padding="max_length")
    assert longest.shape == (2, 5) and fixed.shape == (2, 10)
    np.testing.assert_array_equal(fixed[:, :5], longest)
    assert (fixed[:, 5:] == tok.pad_id).all() and (m2[:, 5:] == 0).all()
    np.testing.assert_array_equal(m1.sum(1), [3, 5])
    np.testing.assert_array_equal(m2.sum(1), [3, 5])


@pytest.mark.parametrize("args, err", [
    ((5,), TypeError), (([1, "a"],), TypeError), ((["a"], 1), ValueError),
    ((["a"], 2.0), TypeError), ((["a"], 10, "left"), ValueError), (([],), ValueError)])
def test_encode_bad_input(tok, args, err):
    with pytest.raises(err):
        tok.encode(*args)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS), max_size=12), min_size=1, max_size=4))
def test_round_trip(sentences):
    tok = Tokenizer(WORDS)
    texts = [" ".join(s) for s in sentences]
    ids, mask = tok.encode(texts, max_length=16)
    assert tok.batch_decode(ids) == texts
    for row, m, s in zip(ids, mask, sentences):
        assert m.sum() == len(s) + 2 and row[0] == tok.cls_id and row[len(s) + 1] == tok.sep_id


def test_decode_stops_at_first_sep_after_position_0(tok):
    ids = [tok.dec_id, 6, 8, tok.sep_id, 9, 10, tok.pad_id]
    assert tok.decode(ids) == "a dog"
    assert tok.decode(ids, skip_special_tokens=False) == "[DEC] a dog [SEP]"
    assert tok.decode([tok.sep_id, 6, tok.sep_id, 7]) == "a"
    assert tok.batch_decode([[6, 3, 7], [8]]) == ["a", "dog"]


@pytest.mark.parametrize("ids, err", [
    ([1.0, 2.0], TypeError), ([[2, 3]], ValueError), ([2, 99], ValueError), ([-1], ValueError)])
def test_decode_bad_input(tok, ids, err):
    with pytest.raises(err):
        tok.decode(ids)


def test_batch_decode_bad_input(tok):
    with pytest.raises(ValueError):
        tok.batch_decode(np.array([2, 3]))
    with pytest.raises(TypeError):
        tok.batch_decode("2 3")


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.tokens == tok.tokens
    assert os.listdir(tmp_path) == ["tok.json"]  # the temporary file was renamed, not left over
    tok2 = Tokenizer(["sun"])
    tok2.save(path)  # overwrites
    assert Tokenizer.load(str(path)).words == ["sun"]


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2]", json.dumps({"format": "other", "words": []}),
    json.dumps({"format": "minblip-tokenizer", "version": 1,
                "special_tokens": list(Tokenizer.SPECIAL_TOKENS), "words": "dog"}),
    json.dumps({"format": "minblip-tokenizer", "version": 1,
                "special_tokens": list(Tokenizer.SPECIAL_TOKENS), "words": ["Dog"]}),
    json.dumps({"format": "minblip-tokenizer", "version": 1,
                "special_tokens": ["[PAD]"], "words": ["dog"]}),
    json.dumps({"format": "minblip-tokenizer", "version": 7,
                "special_tokens": list(Tokenizer.SPECIAL_TOKENS), "words": ["dog"]})])
def test_load_malformed_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(path)
