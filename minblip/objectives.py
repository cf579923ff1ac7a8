"""The pretraining objectives of BLIP and BLIP-2, side by side.

Both papers train with the same three ideas, and a reader comparing them finds
each pair here:

* **ITC**, image-text contrast. BLIP (salesforce/BLIP ``blip_pretrain.py``)
  compares the ViT's [CLS] feature with the text's: :func:`itc_forward` /
  :func:`itc_backward`. BLIP-2 (salesforce/LAVIS ``blip2_qformer.py``) has one
  feature per learned query and takes the *maximum over the queries*:
  :func:`itc_max_forward` / :func:`itc_max_backward`. BLIP clamps its
  temperature to [0.001, 0.5]; BLIP-2 does not clamp it.
* **ITM negatives**, drawn from the ITC similarities, one negative image per
  text and one negative text per image. The weights differ:
  :func:`hard_negative_weights` (BLIP: softmax + 1e-4, the positive zeroed
  *after* the softmax) and :func:`blip2_negative_weights` (BLIP-2: the positive
  set to -10000 *before* the softmax). One sampler, :func:`sample_negatives`,
  draws from either. The ITM loss itself is a plain 2-way cross-entropy.
* **LM / ITG**, the next-token loss of the captioning decoder (BLIP's LM, with
  label smoothing 0.1), of the Q-Former's image-grounded text generation
  (BLIP-2's ITG, label smoothing 0.1) and of the frozen language model of
  BLIP-2 stage 2 (OPT's plain cross-entropy): :class:`NextTokenLoss`, with
  :func:`causal_lm_targets` for a language model read after a soft prompt.

Every function here is a loss or a piece of one: ``*_forward`` returns
``(loss, cache)`` and ``*_backward`` the input gradients, adding into the
temperature Param it was given, as a layer adds into its own.
"""
from __future__ import annotations

import numpy as np

from .core import Module, Param, check_ndim, check_rng
from .softmax import CrossEntropyLoss, softmax

IGNORE_INDEX = -100  # a target that is not predicted (PyTorch's cross-entropy default)


# ---------------------------------------------------------------------------------------
# ITC: BLIP
# ---------------------------------------------------------------------------------------

def itc_forward(image_feat, text_feat, temp: Param, image_bank=None, text_bank=None,
                soft_i2t=None, soft_t2i=None):
    """BLIP's image-text contrastive loss.

    image_feat, text_feat: (B, E) L2-normalised online features.
    With no banks, every image is contrasted with every text of the batch (the
    n x n similarity matrix, plain InfoNCE). BLIP's momentum distillation
    passes ``text_bank``/``image_bank`` (K, E): momentum features of the batch
    first, then the queue; they are constants. ``soft_i2t``/``soft_t2i`` (B, K)
    replace the one-hot targets (positives are column b of row b in both layouts).

    loss = (CE(image_feat @ text_all.T / temp) + CE(text_feat @ image_all.T / temp)) / 2

    Returns (loss, cache): ``cache["sim_i2t"]`` and ``cache["sim_t2i"]`` are the
    logits (B, K) divided by temp (``pretrain_step`` samples the ITM negatives from
    them); ``cache["loss"]`` holds whatever :func:`itc_backward` needs. Exercise 5.1
    (notebooks/05_itc).
    """
    B = image_feat.shape[0]
    if text_feat.shape[0] != B:
        raise ValueError(f"ITC: {B} images but {text_feat.shape[0]} texts")
    ### BEGIN SOLUTION
    text_all = text_feat if text_bank is None else text_bank
    image_all = image_feat if image_bank is None else image_bank
    t = temp.data
    sim_i2t = image_feat @ text_all.T  # (B, E) @ (E, K) -> (B, K) cosine similarities
    sim_t2i = text_feat @ image_all.T
    ce = CrossEntropyLoss()
    hard = np.arange(B)
    loss_i2t, c_i2t = ce.forward(sim_i2t / t, hard if soft_i2t is None else soft_i2t)
    loss_t2i, c_t2i = ce.forward(sim_t2i / t, hard if soft_t2i is None else soft_t2i)
    loss = 0.5 * (loss_i2t + loss_t2i)
    cache = (image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
             text_bank is None, image_bank is None)
    return loss, {"loss": cache, "sim_i2t": sim_i2t / t, "sim_t2i": sim_t2i / t}
    ### END SOLUTION


def itc_backward(dloss: float, cache, temp: Param):
    """-> (d image_feat (B, E), d text_feat (B, E)); adds d temp into temp.grad.
    Exercise 5.1 (notebooks/05_itc)."""
    ### BEGIN SOLUTION
    (image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
     text_online, image_online) = cache["loss"]
    ce = CrossEntropyLoss()
    dlog_i2t = ce.backward(0.5 * dloss, c_i2t)  # undoes loss = (loss_i2t + loss_t2i) / 2
    dlog_t2i = ce.backward(0.5 * dloss, c_t2i)
    if temp.trainable:  # undoes / t
        temp.grad += -(np.sum(dlog_i2t * sim_i2t) + np.sum(dlog_t2i * sim_t2i)) / (t * t)
    dsim_i2t, dsim_t2i = dlog_i2t / t, dlog_t2i / t
    d_image = dsim_i2t @ text_all  # undoes sim_i2t = image_feat @ text_all.T
    d_text = dsim_t2i @ image_all  # undoes sim_t2i = text_feat @ image_all.T
    if text_online:  # text_all was text_feat itself: its second use
        d_text += dsim_i2t.T @ image_feat
    if image_online:
        d_image += dsim_t2i.T @ text_feat
    return d_image, d_text
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# ITC: BLIP-2, the maximum over the queries
# ---------------------------------------------------------------------------------------

def itc_max_forward(image_feats, text_feat, temp: Param, label_smoothing: float = 0.1):
    """BLIP-2's image-text contrastive loss (blip2_qformer.py ``loss_itc``).

    image_feats (B, Q, E) and text_feat (B, E), L2-normalised. The similarity
    of image b and text c is ``max_q image_feats[b, q] . text_feat[c]``; both
    directions read this one (B, B) matrix S (text-to-image reads S^T):

        loss = (CE(S / temp, diag) + CE(S^T / temp, diag)) / 2,  label smoothing 0.1

    Returns loss and a cache holding ``sim`` (B, B) logits S / temp and
    ``best_query`` (B, B), the query that won each maximum.
    """
    check_ndim(image_feats, 3, "ITC image_feats", "(B, Q, E)")
    check_ndim(text_feat, 2, "ITC text_feat", "(B, E)")
    B = image_feats.shape[0]
    if text_feat.shape != (B, image_feats.shape[2]):
        raise ValueError(f"ITC: expected text_feat of shape {(B, image_feats.shape[2])} for "
                         f"image_feats {image_feats.shape}, got {text_feat.shape}")
    sim_q = np.einsum("bqe,ce->bcq", image_feats, text_feat)  # (B, B, Q): image b, text c, query q
    best = np.argmax(sim_q, axis=-1)  # (B, B)
    sim = np.take_along_axis(sim_q, best[..., None], axis=-1)[..., 0]  # (B, B) max over queries
    t = temp.data
    ce = CrossEntropyLoss(label_smoothing=label_smoothing)
    labels = np.arange(B)
    loss_i2t, c_i2t = ce.forward(sim / t, labels)
    loss_t2i, c_t2i = ce.forward(sim.T / t, labels)
    cache = (image_feats, text_feat, best, sim, t, ce, c_i2t, c_t2i)
    return 0.5 * (loss_i2t + loss_t2i), {"loss": cache, "sim": sim / t, "best_query": best}


def itc_max_backward(dloss: float, cache, temp: Param):
    """-> (d image_feats (B, Q, E), d text_feat (B, E)); adds d temp into temp.grad.
    Only the winning query of each (image, text) pair receives gradient.

    ``cache["loss"]`` holds image_feats (B, Q, E), text_feat (B, E), best (B, B)
    (the winning query of pair (image b, text c)), sim (B, B) the maxima before
    the temperature, t (a float), the CrossEntropyLoss ce and its two caches
    (image-to-text over the rows of S / t, text-to-image over the rows of S^T / t).
    Exercise 10.1 (notebooks/10_blip2_stage1)."""
    ### BEGIN SOLUTION
    image_feats, text_feat, best, sim, t, ce, c_i2t, c_t2i = cache["loss"]
    B = sim.shape[0]
    # undoes loss = (CE(S / t) + CE(S^T / t)) / 2; the second term read S transposed
    dlogits = ce.backward(0.5 * dloss, c_i2t) + ce.backward(0.5 * dloss, c_t2i).T  # (B, B)
    if temp.trainable:
        temp.grad += -np.sum(dlogits * sim) / (t * t)  # undoes S / t
    dsim = dlogits / t
    rows = np.broadcast_to(np.arange(B)[:, None], (B, B))
    winners = image_feats[rows, best]  # (B, B, E): the query that won pair (b, c)
    d_text = np.einsum("bc,bce->ce", dsim, winners)  # undoes S[b, c] = winner . text_feat[c]
    d_image = np.zeros_like(image_feats)
    # undoes the max: pair (b, c) sends its gradient to query best[b, c] of image b only;
    # one query can win for several texts, so scatter-add
    np.add.at(d_image, (rows, best), dsim[..., None] * text_feat[None, :, :])
    return d_image, d_text
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# ITM negatives
# ---------------------------------------------------------------------------------------

def hard_negative_weights(sim):
    """BLIP's sampling weights: softmax over the in-batch similarities (already
    divided by temp) + 1e-4, with the diagonal (the positive) set to zero
    *after* the softmax (blip_pretrain.py, ``weights_t2i.fill_diagonal_(0)``).

    sim (B, K >= B) -> weights (B, B) in float64. Exercise 6.1
    (notebooks/06_itm_hard_negatives)."""
    ### BEGIN SOLUTION
    B = sim.shape[0]
    w = softmax(sim[:, :B].astype(np.float64)) + 1e-4
    np.fill_diagonal(w, 0.0)
    return w
    ### END SOLUTION


def blip2_negative_weights(sim):
    """BLIP-2's sampling weights: softmax over the in-batch ITC logits with the
    diagonal (the positive) set to -10000 *before* the softmax
    (blip2_qformer.py ``sim_t2i.fill_diagonal_(-10000)``), where BLIP zeroes it
    after the softmax and adds 1e-4 (:func:`hard_negative_weights`).

    sim (B, K >= B) -> weights (B, B) in float64."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[1] < sim.shape[0]:
        raise ValueError(f"negative weights: expected (B, K >= B) similarities, got {sim.shape}")
    B = sim.shape[0]
    s = sim[:, :B].copy()
    np.fill_diagonal(s, -10000.0)
    return softmax(s)


def draw_rows(weights, rng: np.random.Generator):
    """One column per row of ``weights`` (B, K), drawn in proportion to the row's
    (unnormalised, non-negative) weights, as ``torch.multinomial(weights, 1)``."""
    cum = np.cumsum(weights, axis=1)  # (B, K)
    u = rng.random(len(weights))[:, None] * cum[:, -1:]
    return np.minimum(np.sum(cum <= u, axis=1), weights.shape[1] - 1)  # first column with cum > u


def sample_negatives(weights_t2i, weights_i2t, rng: np.random.Generator):
    """One negative image per text and one negative text per image.

    ``weights_t2i`` (B, B): row b weighs the images for text b;
    ``weights_i2t`` (B, B): row b weighs the texts for image b (from
    :func:`hard_negative_weights` or :func:`blip2_negative_weights`).
    Returns ``neg_image_idx`` (B,) (for text b, its negative image) and
    ``neg_text_idx`` (B,) (for image b, its negative text), in that order of
    drawing. Needs B >= 2: a batch of one has no negative.
    """
    B = len(weights_t2i)
    if B < 2:
        raise ValueError(f"ITM negatives need a batch of at least 2, got {B}")
    check_rng(rng, optional=False)
    return draw_rows(weights_t2i, rng), draw_rows(weights_i2t, rng)


def check_negatives(negatives, B: int):
    """Fixed negatives ``(neg_image_idx, neg_text_idx)`` -> two int arrays (B,) with
    values in [0, B), or a ValueError that names the bad one."""
    out = []
    for name, n in zip(("neg_image_idx", "neg_text_idx"), negatives):
        n = np.asarray(n)
        if n.shape != (B,) or n.dtype.kind not in "iu" or n.min() < 0 or n.max() >= B:
            raise ValueError(f"{name}: expected {B} integer indices in [0, {B}), got {n!r}")
        out.append(n)
    return tuple(out)


def itm_labels(B: int) -> np.ndarray:
    """ITM targets of the 3B pairs [positives, (text, negative image), (negative
    text, image)]: 1 (match) for the first B, 0 for the rest."""
    return np.concatenate([np.ones(B, np.int64), np.zeros(2 * B, np.int64)])


# ---------------------------------------------------------------------------------------
# LM / ITG: the next-token loss
# ---------------------------------------------------------------------------------------

class NextTokenLoss(Module):
    """Cross-entropy of the logits at position t against the token at t + 1
    (Hugging Face's shift: ``logits[:, :-1]`` against ``labels[:, 1:]``); labels
    equal to -100 are not predicted.

    BLIP's LM and BLIP-2's ITG use label smoothing 0.1 (``BertLMHeadModel``);
    OPT, BLIP-2's frozen language model, uses none.
    """

    def __init__(self, label_smoothing: float = 0.0):
        self.ce = CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, logits, labels):
        """logits (B, T, V), labels (B, T) int -> scalar loss and the cache."""
        loss, c_ce = self.ce.forward(logits[:, :-1], labels[:, 1:])  # t predicts t + 1
        return loss, (logits.shape, logits.dtype, c_ce)

    def backward(self, dloss: float, cache):
        """-> dlogits (B, T, V); the last position predicts nothing and gets zero."""
        shape, dtype, c_ce = cache
        dlogits = np.zeros(shape, dtype)
        dlogits[:, :-1] = self.ce.backward(dloss, c_ce)  # undoes the shift
        return dlogits


def check_prompt_length(prompt_length, T: int, where: str) -> None:
    """``prompt_length`` (the leading text tokens no loss predicts) must be an int
    in [0, T]. A negative one would slice from the end: ``labels[:, :-1]``
    ignores every token but the last, and the step would train on that alone."""
    if (isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer))
            or not 0 <= prompt_length <= T):
        raise ValueError(f"{where}: prompt_length must be an int in [0, {T}] (the text "
                         f"length), got {prompt_length!r}")


def causal_lm_targets(ids, attention_mask, n_prefix: int = 0, prompt_length: int = 0):
    """Labels for the whole sequence [prefix | text], as blip2_opt.py builds them:

        targets = ids with padding -> -100; the first ``prompt_length`` text
        tokens -> -100; then cat(full((B, n_prefix), -100), targets).

    Returns int64 (B, n_prefix + T). :class:`NextTokenLoss` pairs logits[:, :-1]
    with targets[:, 1:], so the last prefix position is trained to predict the
    first text token (BOS): with the empty pre-training prompt LAVIS does not
    mask it either. Exercise 11.1 (notebooks/11_blip2_stage2).
    """
    ids = np.asarray(ids)
    mask = np.asarray(attention_mask)
    check_prompt_length(prompt_length, ids.shape[-1], "causal_lm_targets")
    ### BEGIN SOLUTION
    targets = np.where(mask.astype(bool), ids, IGNORE_INDEX).astype(np.int64)
    targets[:, :prompt_length] = IGNORE_INDEX
    ignore = np.full((ids.shape[0], n_prefix), IGNORE_INDEX, dtype=np.int64)
    return np.concatenate([ignore, targets], axis=1)
    ### END SOLUTION
