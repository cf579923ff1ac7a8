"""Evaluating a BLIP: image-text retrieval, image-text matching and captioning.

Retrieval follows salesforce/BLIP ``train_retrieval.py`` ``evaluation``: the
ITC cosine similarity ranks every pair; the ``k_test`` best candidates of each
query are re-ranked by ``ITM logit (match) + ITC similarity``; the rest keep
a score of -100. Captions are scored per attribute against the scene they
describe with ``minblip.world.score_caption``.
"""
from __future__ import annotations

import numpy as np

from . import world
from .blip import BLIP
from .core import check_finite, check_float
from .generation import generate
from .image import preprocess
from .softmax import softmax
from .tokenizer import Tokenizer, prompt_ids


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def image_features(model: BLIP, pixels, batch_size: int = 128):
    """pixels (N, 3, H, W) -> image_embeds (N, 1+P, D), image_feat (N, E)."""
    embeds, feats = [], []
    for s in _batches(len(pixels), batch_size):
        e, f = model.encode_image(pixels[s])
        embeds.append(e)
        feats.append(f)
    return np.concatenate(embeds), np.concatenate(feats)


def text_features(model: BLIP, ids, mask, batch_size: int = 256):
    """ids, mask (M, T) -> text_feat (M, E) from the unimodal text encoder."""
    return np.concatenate([model.encode_text(ids[s], mask[s])
                           for s in _batches(len(ids), batch_size)])


def itm_match_logits(model: BLIP, tokenizer: Tokenizer, image_embeds, ids, mask,
                     batch_size: int = 256):
    """ITM logits (N, 2) (no-match, match) of the pairs (image_embeds[i], ids[i])."""
    return np.concatenate([model.itm_logits(image_embeds[s], ids[s], mask[s], tokenizer.enc_id)
                           for s in _batches(len(ids), batch_size)])


def recall_at_k(scores, k_values=(1, 5, 10)) -> dict:
    """scores (Q, N): query q's right answer is item q. -> {k: fraction}."""
    correct = scores[np.arange(len(scores)), np.arange(len(scores))][:, None]
    rank = np.sum(scores > correct, axis=1)  # ties count in the query's favour
    return {k: float(np.mean(rank < k)) for k in k_values}


def retrieval_scores(model: BLIP, tokenizer: Tokenizer, pixels, captions, k_test: int = 16,
                     max_length: int = 30):
    """Image-to-text and text-to-image score matrices (N, N) for N paired items.

    Returns (itc_i2t, reranked_i2t, reranked_t2i): the plain ITC similarities
    and the ITM re-ranked scores (BLIP's ``score_matrix_i2t``/``_t2i``).
    """
    ids, mask = tokenizer.encode(captions, max_length=max_length)
    image_embeds, image_feat = image_features(model, pixels)
    text_feat = text_features(model, ids, mask)
    sim = image_feat @ text_feat.T  # (N, N) cosine similarities
    i2t, t2i = rerank_with_itm(
        sim, k_test, lambda img, txt: itm_match_logits(model, tokenizer, image_embeds[img],
                                                       ids[txt], mask[txt])[:, 1])
    return sim, i2t, t2i


def rerank_with_itm(sim, k_test: int, match_logit):
    """BLIP's two-stage retrieval (``evaluation`` in salesforce/BLIP train_retrieval.py):
    each query's ``k_test`` best candidates by ``sim`` (N images, N texts) get the
    score ITM match logit + ``sim``, every other pair -100.

    ``match_logit(img_idx, txt_idx)`` -> (P,) ITM match logits of the P pairs.
    Returns (i2t (N, N), t2i (N, N)).
    """
    N = len(sim)
    k = min(k_test, N)
    # every (image, text) pair that some query short-lists is scored by ITM once
    top_t = np.argsort(-sim, axis=1)[:, :k]    # for each image, its best texts
    top_i = np.argsort(-sim.T, axis=1)[:, :k]  # for each text, its best images
    pairs = sorted({(i, int(t)) for i in range(N) for t in top_t[i]}
                   | {(int(i), t) for t in range(N) for i in top_i[t]})
    img_idx = np.array([p[0] for p in pairs])
    txt_idx = np.array([p[1] for p in pairs])
    score = dict(zip(pairs, match_logit(img_idx, txt_idx) + sim[img_idx, txt_idx]))
    i2t = np.full((N, N), -100.0)
    t2i = np.full((N, N), -100.0)
    for i in range(N):
        for t in top_t[i]:
            i2t[i, t] = score[(i, int(t))]
    for t in range(N):
        for i in top_i[t]:
            t2i[t, i] = score[(int(i), t)]
    return i2t, t2i


def retrieval_metrics(model, tokenizer, pixels, captions, k_test: int = 16) -> dict:
    sim, i2t, t2i = retrieval_scores(model, tokenizer, pixels, captions, k_test)
    out = {}
    for name, scores in (("i2t", i2t), ("t2i", t2i), ("itc_i2t", sim), ("itc_t2i", sim.T)):
        for k, v in recall_at_k(scores).items():
            out[f"{name}_recall@{k}"] = v
    return out


def itm_metrics(model: BLIP, tokenizer: Tokenizer, pixels, captions,
                rng: np.random.Generator, max_length: int = 30) -> dict:
    """ITM accuracy on positives, random negatives and hard negatives.

    ``itm_accuracy`` is balanced: the mean of the accuracy on the N positive
    pairs and on N pairs of an image with a random other caption. The hard
    negative of an image is the caption with the highest ITC similarity among
    the wrong ones; its accuracy is reported separately.
    """
    N = len(captions)
    ids, mask = tokenizer.encode(captions, max_length=max_length)
    image_embeds, image_feat = image_features(model, pixels)
    text_feat = text_features(model, ids, mask)
    sim = image_feat @ text_feat.T
    random_neg = (np.arange(N) + rng.integers(1, N, size=N)) % N  # never the positive
    sim_wrong = sim.copy()
    np.fill_diagonal(sim_wrong, -np.inf)
    hard_neg = np.argmax(sim_wrong, axis=1)
    pos = itm_match_logits(model, tokenizer, image_embeds, ids, mask)
    rnd = itm_match_logits(model, tokenizer, image_embeds, ids[random_neg], mask[random_neg])
    hard = itm_match_logits(model, tokenizer, image_embeds, ids[hard_neg], mask[hard_neg])
    acc_pos = float(np.mean(pos[:, 1] > pos[:, 0]))
    acc_rnd = float(np.mean(rnd[:, 0] >= rnd[:, 1]))
    acc_hard = float(np.mean(hard[:, 0] >= hard[:, 1]))
    return {"itm_accuracy": 0.5 * (acc_pos + acc_rnd), "itm_positive_accuracy": acc_pos,
            "itm_random_negative_accuracy": acc_rnd, "itm_hard_negative_accuracy": acc_hard,
            "itm_hard_balanced_accuracy": 0.5 * (acc_pos + acc_hard)}


def match_probability(model: BLIP, tokenizer: Tokenizer, pixels, captions,
                      max_length: int = 30):
    """p(match) = softmax(ITM logits)[:, 1] of each (image i, caption i) pair."""
    ids, mask = tokenizer.encode(captions, max_length=max_length)
    image_embeds, _ = image_features(model, pixels)
    return softmax(itm_match_logits(model, tokenizer, image_embeds, ids, mask))[:, 1]


def caption_images(model: BLIP, tokenizer: Tokenizer, pixels, method: str = "beam",
                   prompt: str = "", max_length: int = 20, min_length: int = 5,
                   rng: np.random.Generator | None = None, batch_size: int = 64,
                   num_beams: int = 3) -> list[str]:
    """One caption per image of ``pixels`` (N, 3, H, W), finite. The prompt (BLIP's
    captioner uses "a picture of") is fed after [DEC] and stripped from the
    output; ``max_length`` counts it, and a prompt that fills it is refused."""
    check_finite(check_float(pixels, "caption_images: pixels"), "caption_images: pixels")
    start = prompt_ids(tokenizer, prompt)
    start[0] = tokenizer.dec_id  # [DEC] a picture of
    texts = []
    for s in _batches(len(pixels), batch_size):
        embeds, _ = model.encode_image(pixels[s])
        out = generate(model.text_decoder, embeds, start, sep_id=tokenizer.sep_id,
                       method=method, max_length=max_length, min_length=min_length,
                       num_beams=num_beams, rng=rng)
        texts += [tokenizer.decode(t) for t in out.tokens]
    return texts


ATTRIBUTES = ("colour", "shape", "size", "position")


def caption_metrics(scenes, captions) -> dict:
    """Per-attribute accuracy of generated captions against their scenes.

    An attribute counts as right when the caption states it and every mention
    is right (an omitted attribute counts as wrong); ``caption_exact_match`` is
    the fraction of captions fully true of their scene (every object named,
    nothing wrong); ``caption_attribute_accuracy`` averages the four attributes.
    """
    scores = [world.score_caption(s, c) for s, c in zip(scenes, captions)]
    out = {f"caption_{a}_accuracy": float(np.mean([sc[a] is True for sc in scores]))
           for a in ATTRIBUTES}
    out["caption_object_count_accuracy"] = float(np.mean([sc["count"] for sc in scores]))
    out["caption_attribute_accuracy"] = float(np.mean([out[f"caption_{a}_accuracy"]
                                                       for a in ATTRIBUTES]))
    out["caption_exact_match"] = float(np.mean([world.caption_is_true(s, c)
                                                for s, c in zip(scenes, captions)]))
    return out


def evaluate_split(model: BLIP, tokenizer: Tokenizer, split: world.Split, image_size: int,
                   seed: int = 0, k_test: int = 16, caption_method: str = "beam") -> dict:
    """Every measure on one split: retrieval, ITM and captioning."""
    pixels = preprocess(split.images, image_size).astype(model.dtype)
    rng = np.random.default_rng(seed)
    metrics = {"n_pairs": len(split)}
    metrics.update(retrieval_metrics(model, tokenizer, pixels, split.captions, k_test))
    metrics.update(itm_metrics(model, tokenizer, pixels, split.captions, rng))
    captions = caption_images(model, tokenizer, pixels, method=caption_method)
    metrics.update(caption_metrics(split.scenes, captions))
    return metrics, captions
