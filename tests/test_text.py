"""BLIP's text side: embeddings, the text transformer in its three uses, the tied LM
head, the decoder, the cached (incremental) forward and encoder-decoder sharing."""
import numpy as np
import pytest

from minblip import Module, Param, check_layer, gradcheck
from minblip.text import (SHARING_MODES, LMHead, TextConfig, TextDecoder, TextEmbeddings,
                          TextTransformer, build_med, parameter_count_table,
                          self_attention_mask, shared_parameter_names)

V, D, S, E = 13, 8, 3, 6  # vocab, width, image tokens, image width


def cfg(**kw):
    base = dict(vocab_size=V, width=D, depth=2, heads=2, mlp_dim=12, max_positions=10,
                encoder_width=E, init_std=0.4)
    base.update(kw)
    return TextConfig(**base)


def randomize(module, seed=0, scale=0.4):
    """Float64 and every Param random (LayerNorm gains around 1), so no gradient is tiny."""
    module.to(np.float64)
    rng = np.random.default_rng(seed)
    for name, p in module.named_params():
        p.data[...] = rng.normal(0.0, scale, p.shape) + (1.0 if name.endswith("gamma") else 0.0)
    return module


def batch(seed=1, B=2, T=6):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    ids[:, 0] = 2
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, T - 2:] = 0  # the second text is padded
    img = rng.standard_normal((B, S, E))
    return ids, mask, img


class Pair(Module):
    """Encoder and decoder in one container, so params() lists a shared Param once."""

    def __init__(self, encoder, decoder):
        self.encoder, self.decoder = encoder, decoder


# ---------------------------------------------------------------------------
# Gradient checks (float64, larger init, loss sum(out * R))
# ---------------------------------------------------------------------------

def test_embeddings_gradcheck_repeated_ids():
    emb = randomize(TextEmbeddings(cfg(), np.random.default_rng(0)))
    ids = np.array([[2, 7, 7, 9, 7], [2, 9, 9, 0, 0]])  # 7 three times, 9 in both rows
    report = check_layer(emb, ids, forward_kwargs={"start": 3})
    assert report.max_rel_err <= 1e-6


def test_embeddings_have_no_token_type_and_pad_row_starts_at_zero():
    emb = TextEmbeddings(cfg(init_std=0.02), np.random.default_rng(0))
    assert [n for n, _ in emb.named_params()] == [
        "word_embeddings.weight", "position_embeddings.weight", "layer_norm.gamma",
        "layer_norm.beta"]
    assert not emb.word_embeddings.weight.data[0].any()


@pytest.mark.parametrize("mode", ["text", "multimodal", "causal_multimodal", "causal_text"])
def test_text_transformer_gradcheck(mode):
    model = randomize(TextTransformer(cfg(), np.random.default_rng(0)))
    ids, mask, img = batch()
    causal = mode.startswith("causal")
    if mode.endswith("multimodal"):
        image_mask = np.array([[1, 1, 1], [1, 1, 0]])
        report = check_layer(model, ids, mask, img,
                             forward_kwargs={"causal": causal, "image_mask": image_mask})
        assert report.rows[-1].name == "input2"  # d image_embeds was checked
    else:
        report = check_layer(model, ids, mask, forward_kwargs={"causal": causal})
    assert report.max_rel_err <= 1e-6
    assert report.directional is not None and report.directional.passed


def test_gradcheck_with_dropout_masks_fixed_by_seed():
    model = randomize(TextTransformer(cfg(dropout=0.2), np.random.default_rng(0)))
    ids, mask, img = batch()
    R = np.random.default_rng(5).standard_normal((2, 6, D))
    x = Param(img, dtype=np.float64)

    def loss_fn(backward):
        h, c = model.forward(ids, mask, x.data, rng=np.random.default_rng(42))
        if backward:
            x.grad += model.backward(R, c)
        return float(np.sum(h * R))

    h1, _ = model.forward(ids, mask, img, rng=np.random.default_rng(42))
    h2, _ = model.forward(ids, mask, img, rng=np.random.default_rng(43))
    h3, _ = model.forward(ids, mask, img)
    assert not np.allclose(h1, h2) and not np.allclose(h1, h3)  # dropout is on with an rng
    gradcheck(loss_fn, model.named_params() + [("image_embeds", x)])


def test_lm_head_gradcheck_tied_weight():
    c = cfg()
    emb = TextEmbeddings(c, np.random.default_rng(0))
    head = LMHead(c, emb.word_embeddings, np.random.default_rng(1))
    randomize(head)
    assert head.weight is emb.word_embeddings.weight
    assert "word_embeddings.weight" in dict(head.named_params())
    h = np.random.default_rng(2).standard_normal((2, 4, D))
    check_layer(head, h)


def test_text_decoder_gradcheck():
    dec = randomize(TextDecoder(cfg(), np.random.default_rng(0)))
    ids, mask, img = batch()
    report = check_layer(dec, ids, mask, img)
    assert report.max_rel_err <= 1e-6


def test_tied_weight_gets_lookup_plus_head_gradient():
    dec = randomize(TextDecoder(cfg(), np.random.default_rng(0)))
    ids, mask, img = batch()
    W = dec.head.weight
    assert W is dec.bert.embeddings.word_embeddings.weight
    R = np.random.default_rng(3).standard_normal((2, 6, V))
    logits, cache = dec.forward(ids, mask, img)
    c_bert, c_head = cache
    dec.zero_grad()
    dh = dec.head.backward(R, c_head)
    from_head = W.grad.copy()
    dec.zero_grad()
    dec.bert.backward(dh, c_bert)
    from_lookup = W.grad.copy()
    dec.zero_grad()
    dec.backward(R, cache)
    np.testing.assert_allclose(W.grad, from_head + from_lookup, rtol=1e-12, atol=1e-12)
    assert np.abs(from_head).max() > 1e-3 and np.abs(from_lookup).max() > 1e-3
    assert not from_lookup[[i for i in range(V) if i not in ids]].any()  # only looked-up rows


# ---------------------------------------------------------------------------
# Masks: causality, padding, text mode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_causal_later_tokens_never_change_earlier_states(with_image, with_mask):
    model = randomize(TextTransformer(cfg(), np.random.default_rng(0)))
    ids, _, img = batch(T=7)
    img = img if with_image else None
    mask = np.ones_like(ids) if with_mask else None
    h, _ = model.forward(ids, mask, img, causal=True)
    for k in range(1, 7):
        changed = ids.copy()
        changed[:, k] = (changed[:, k] + 1 + np.arange(2)) % V
        h2, _ = model.forward(changed, mask, img, causal=True)
        np.testing.assert_allclose(h2[:, :k], h[:, :k], rtol=0, atol=1e-13)
        assert not np.allclose(h2[:, k], h[:, k])  # the changed position itself does change
    hb, _ = model.forward(changed, mask, img, causal=False)
    assert not np.allclose(hb[:, 0], h[:, 0])  # without the causal mask, it would


@pytest.mark.parametrize("causal", [False, True])
def test_padded_tokens_do_not_change_real_tokens(causal):
    model = randomize(TextTransformer(cfg(), np.random.default_rng(0)))
    ids, mask, img = batch()
    h, _ = model.forward(ids, mask, img, causal=causal)
    changed = ids.copy()
    changed[1, 4:] = [5, 11]  # the padded positions of text 1
    h2, _ = model.forward(changed, mask, img, causal=causal)
    np.testing.assert_allclose(h2[mask == 1], h[mask == 1], rtol=0, atol=1e-13)
    h3, _ = model.forward(changed, None, img, causal=causal)
    if not causal:  # without the padding mask the pads leak into every position
        assert not np.allclose(h3[1, :4], h[1, :4])


def test_self_attention_masks():
    mask = np.array([[1, 1, 1, 0]])
    enc = self_attention_mask(mask)
    dec = self_attention_mask(mask, causal=True)
    np.testing.assert_array_equal(enc[0], np.tile([1, 1, 1, 0], (4, 1)))
    np.testing.assert_array_equal(dec[0], [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                                           [1, 1, 1, 0]])


def test_text_mode_ignores_cross_attention():
    model = randomize(TextTransformer(cfg(), np.random.default_rng(0)))
    ids, mask, _ = batch()
    h, cache = model.forward(ids, mask)
    model.zero_grad()
    assert model.backward(np.ones_like(h), cache) is None
    for name, p in model.named_params():
        if ".cross_attn" in name:
            assert not p.grad.any(), name
        elif name.endswith(".W") or name.endswith("weight"):
            assert p.grad.any(), name
    for layer in model.layers:
        for p in layer.cross_attn.params() + layer.cross_attn_ln.params():
            p.data += 1.0
    h2, _ = model.forward(ids, mask)
    np.testing.assert_array_equal(h2, h)


def test_eval_forward_is_deterministic_and_keeps_no_state():
    model = TextTransformer(cfg(dropout=0.3), np.random.default_rng(0))
    ids, mask, img = batch()
    before = {k: v for k, v in vars(model).items()}
    h1, _ = model.forward(ids, mask, img)
    h2, _ = model.forward(ids, mask, img)
    np.testing.assert_array_equal(h1, h2)
    assert {k: v for k, v in vars(model).items()} == before


# ---------------------------------------------------------------------------
# The incremental (cached) forward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_image", [False, True])
def test_incremental_equals_full_causal_forward(with_image):
    dec = randomize(TextDecoder(cfg(), np.random.default_rng(0)))
    ids, _, img = batch(T=8)
    img = img if with_image else None
    logits, cache = dec.forward(ids, None, img)
    hidden, _ = dec.bert.forward(ids, None, img, causal=True)
    kv = dec.image_kv(img) if with_image else None

    past, steps, hs = None, [], []
    for t in range(8):  # token by token
        lg, past = dec.forward_incremental(ids[:, t:t + 1], past, image_kv=kv, start=t)
        h, _ = dec.bert.forward_incremental(ids[:, :t + 1], None, image_kv=kv)
        steps.append(lg)
        hs.append(h[:, -1:])
    assert past[0][0].shape == (2, 2, 8, D // 2)
    np.testing.assert_allclose(np.concatenate(steps, 1), logits, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(hs, 1), hidden, rtol=0, atol=1e-12)

    lg3, past = dec.forward_incremental(ids[:, :3], None, image_embeds=img)  # a prompt, then 1 by 1
    np.testing.assert_allclose(lg3, logits[:, :3], rtol=0, atol=1e-12)
    for t in range(3, 8):
        lg, past = dec.forward_incremental(ids[:, t:t + 1], past, image_kv=kv, start=t)
        np.testing.assert_allclose(lg, logits[:, t:t + 1], rtol=0, atol=1e-12)


def test_incremental_bad_input():
    dec = TextDecoder(cfg(), np.random.default_rng(0))
    ids, _, img = batch()
    _, past = dec.forward_incremental(ids[:, :2], None, image_embeds=img)
    with pytest.raises(ValueError, match="start"):
        dec.forward_incremental(ids[:, 2:3], past)
    with pytest.raises(ValueError, match="not both"):
        dec.forward_incremental(ids[:, :1], image_kv=dec.image_kv(img), image_embeds=img)
    with pytest.raises(ValueError, match="past"):
        dec.forward_incremental(ids[:1, 2:3], past, start=2)  # past holds 2 rows, ids 1
    with pytest.raises(ValueError, match="image_kv"):
        dec.forward_incremental(ids[:1, :1], image_kv=dec.image_kv(img))
    with pytest.raises(ValueError, match="max_positions"):
        dec.forward_incremental(np.full((2, 9), 6), past, start=2)


# ---------------------------------------------------------------------------
# Encoder-decoder sharing
# ---------------------------------------------------------------------------

def test_sharing_all_but_self_attention():
    enc, dec = build_med(cfg(), np.random.default_rng(0))
    assert dec.bert is not enc and dec.bert.embeddings is enc.embeddings
    for e, d in zip(enc.layers, dec.bert.layers):
        assert d is not e
        for name in ("cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
            assert getattr(d, name) is getattr(e, name)
        assert d.self_attn is not e.self_attn and d.self_attn_ln is not e.self_attn_ln
        enc_ids = {id(p) for p in e.self_attn.params() + e.self_attn_ln.params()}
        assert not enc_ids & {id(p) for p in d.self_attn.params() + d.self_attn_ln.params()}
    assert dec.head.weight is enc.embeddings.word_embeddings.weight
    names = shared_parameter_names(enc, dec)
    assert not [n for n in names if "self_attn" in n]
    expected = [n for n, _ in enc.named_params() if "self_attn" not in n]
    assert names == expected


def test_sharing_all_and_none():
    enc, dec = build_med(cfg(), np.random.default_rng(0), "all")
    assert dec.bert is enc and dec.head.weight is enc.embeddings.word_embeddings.weight
    assert shared_parameter_names(enc, dec) == [n for n, _ in enc.named_params()]
    enc, dec = build_med(cfg(), np.random.default_rng(0), "none")
    assert shared_parameter_names(enc, dec) == []
    assert dec.head.weight is dec.bert.embeddings.word_embeddings.weight
    assert dec.head.weight is not enc.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="sharing"):
        build_med(cfg(), np.random.default_rng(0), "some")


@pytest.mark.parametrize("mode", SHARING_MODES)
def test_params_listed_once_and_count_table(mode):
    c = cfg()
    enc, dec = build_med(c, np.random.default_rng(0), mode)
    pair = Pair(enc, dec)
    params = pair.params()
    assert len(params) == len({id(p) for p in params})
    unique = {}
    for m in (enc, dec):
        for p in m.params():
            unique[id(p)] = p.size
    row = {r["mode"]: r for r in parameter_count_table(c)}[mode]
    enc_ids = {id(p) for p in enc.params()}
    assert row["total_params"] == sum(unique.values()) == pair.param_count()
    assert row["encoder_params"] == sum(p.size for p in enc.params())
    assert row["decoder_only_params"] == sum(s for i, s in unique.items() if i not in enc_ids)
    assert row["shared_params"] + row["decoder_only_params"] == dec.param_count()


def test_joint_encoder_decoder_loss_gradcheck():
    """ITC-style text pass + ITM-style multimodal pass + LM pass, one loss: shared Params
    receive the sum of the three contributions, the image the sum of two."""
    enc, dec = build_med(cfg(), np.random.default_rng(0))
    pair = randomize(Pair(enc, dec))
    ids, mask, img = batch()
    rng = np.random.default_rng(4)
    R1, R2, R3 = (rng.standard_normal((2, 6, D)), rng.standard_normal((2, 6, D)),
                  rng.standard_normal((2, 6, V)))
    x_img = Param(img, dtype=np.float64)
    parts = {"text", "itm", "lm"}

    def loss_fn(backward):
        x = x_img.data
        h1, c1 = enc.forward(ids, mask)
        h2, c2 = enc.forward(ids, mask, x)
        lg, c3 = dec.forward(ids, mask, x)
        loss = 0.0
        if "text" in parts:
            loss += float(np.sum(h1 * R1))
        if "itm" in parts:
            loss += float(np.sum(h2 * R2))
        if "lm" in parts:
            loss += float(np.sum(lg * R3))
        if backward:
            if "lm" in parts:
                x_img.grad += dec.backward(R3, c3)
            if "itm" in parts:
                x_img.grad += enc.backward(R2, c2)
            if "text" in parts:
                enc.backward(R1, c1)
        return loss

    gradcheck(loss_fn, pair.named_params() + [("image_embeds", x_img)])

    shared = dict(enc.named_params())["layers.0.ffn.fc1.W"]
    grads = {}
    for only in ("text", "itm", "lm"):
        parts.clear()
        parts.add(only)
        pair.zero_grad()
        loss_fn(True)
        grads[only] = shared.grad.copy()
        assert np.abs(grads[only]).max() > 1e-3
    parts.update({"text", "itm", "lm"})
    pair.zero_grad()
    loss_fn(True)
    np.testing.assert_allclose(shared.grad, grads["text"] + grads["itm"] + grads["lm"],
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_bad_input():
    model = TextTransformer(cfg(), np.random.default_rng(0))
    ids, mask, img = batch()
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        model.forward(np.array([[2, 13]]))
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        model.forward(np.array([[2, -1]]))
    with pytest.raises(TypeError, match="integer"):
        model.forward(ids.astype(np.float64))
    with pytest.raises(ValueError, match="2-d"):
        model.forward(ids[0])
    with pytest.raises(ValueError, match="max_positions=10"):
        model.forward(np.full((1, 11), 6))
    with pytest.raises(ValueError, match="encoder_width=6"):
        model.forward(ids, mask, np.zeros((2, S, 5)))
    with pytest.raises(ValueError, match="batch size"):
        model.forward(ids, mask, img[:1])
    with pytest.raises(ValueError, match="attention_mask"):
        model.forward(ids, mask[:1])
    with pytest.raises(ValueError, match="0/1"):
        model.forward(ids, mask * 2)
    with pytest.raises(ValueError, match="image_mask"):
        model.forward(ids, mask, img, image_mask=np.ones((2, S + 1)))
    with pytest.raises(ValueError, match="image_mask"):
        model.forward(ids, mask, image_mask=np.ones((2, S)))
    with pytest.raises(TypeError, match="floating"):
        model.forward(ids, mask, img.astype(np.int64))
    with pytest.raises(TypeError, match="Generator"):
        model.forward(ids, mask, img, rng=0)
    h, cache = model.forward(ids, mask, img)
    with pytest.raises(ValueError, match="dhidden"):
        model.backward(h[:, :-1], cache)
    head = LMHead(cfg(), model.embeddings.word_embeddings, np.random.default_rng(0))
    with pytest.raises(ValueError, match="8"):
        head.forward(np.zeros((2, 3, 7)))
    with pytest.raises(ValueError, match="word embedding"):
        LMHead(cfg(vocab_size=V + 1), model.embeddings.word_embeddings, np.random.default_rng(0))
    with pytest.raises(ValueError, match="heads must divide"):
        cfg(heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        cfg(vocab_size=0)
