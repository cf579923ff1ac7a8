"""Caption generation from the image-grounded decoder: greedy, beam search and
nucleus sampling, with cached keys and values.

salesforce/BLIP ``models/blip.py`` ``BLIP_Decoder.generate`` starts from the
prompt "[DEC] a picture of" and calls Hugging Face ``generate``: beam search
(3 beams, min and max length counted with the prompt) or nucleus sampling
(top-p 0.9, repetition penalty hard-coded to 1.1), stopping at [SEP]. The
logit processors below follow HF's ``MinLengthLogitsProcessor``,
``RepetitionPenaltyLogitsProcessor`` and ``TopPLogitsWarper``.

With ``use_cache=True`` each step feeds only the newest token and reuses the
self-attention keys and values of earlier positions, and the image's
cross-attention keys and values are projected once. ``use_cache=False``
recomputes the whole prefix every step; both give the same tokens and scores.

Any decoder works that has the two methods of BLIP's ``TextDecoder``:
``image_kv(image_embeds)`` (per layer the keys and values the text attends to
for the image, computed once per image) and ``forward_incremental(ids, past,
image_kv, start)`` (logits of new tokens at positions start.., and the
updated per-layer cache). The Q-Former's captioner and the language model's
soft-prompt decoder follow the same two methods.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .core import check_finite
from .softmax import log_softmax, softmax

METHODS = ("greedy", "beam", "nucleus")


@dataclass
class Generation:
    tokens: list           # per image: generated ids (1-d, without prompt and [SEP])
    scores: np.ndarray     # per image: sum of log-probabilities (greedy, nucleus) or beam score


class _Stepper:
    """Runs the decoder on a growing sequence, with or without the cache."""

    def __init__(self, decoder, image_embeds, use_cache: bool):
        self.decoder, self.use_cache = decoder, use_cache
        self.image_embeds = image_embeds
        self.image_kv = decoder.image_kv(image_embeds)
        self.past = None

    def next_logits(self, seqs):
        """seqs (N, t) full sequences so far -> logits (N, V) for the next token."""
        if not self.use_cache:
            logits, _ = self.decoder.forward_incremental(seqs, None, self.image_kv, 0)
            return logits[:, -1]
        start = 0 if self.past is None else self.past[0][0].shape[2]
        logits, self.past = self.decoder.forward_incremental(
            seqs[:, start:], self.past, self.image_kv, start)
        return logits[:, -1]

    def reorder(self, index):
        """Keep rows ``index`` (beam search): the cache follows its beams, and
        the rows of images that stopped searching drop out."""
        self.image_kv = [(k[index], v[index]) for k, v in self.image_kv]
        if self.past is not None:
            self.past = [(k[index], v[index]) for k, v in self.past]


def apply_repetition_penalty(logits, seqs, penalty: float):
    """HF RepetitionPenaltyLogitsProcessor: a token already in the sequence has its
    logit divided by ``penalty`` if positive, multiplied if negative."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    rows = np.repeat(np.arange(seqs.shape[0]), seqs.shape[1])
    cols = seqs.reshape(-1)
    seen = logits[rows, cols]
    logits[rows, cols] = np.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_p_filter(logits, top_p: float):
    """HF TopPLogitsWarper: keep the smallest set of most likely tokens whose
    probability reaches ``top_p`` (at least one); the rest get -inf.

    logits (N, V) -> (N, V). Exercise 7.1 (notebooks/07_lm_and_decoding)."""
    ### BEGIN SOLUTION
    order = np.argsort(logits, axis=-1)  # ascending
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits), axis=-1)
    remove_sorted = cum <= 1.0 - top_p  # the unlikely tail whose total mass is at most 1 - top_p
    remove_sorted[:, -1] = False  # the most likely token always stays
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)  # back to vocabulary order
    return np.where(remove, -np.inf, logits)
    ### END SOLUTION


def _check(image_embeds, prompt_ids, max_length, min_length, method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if image_embeds.ndim != 3:
        raise ValueError(f"image_embeds: expected (B, S, D), got shape {image_embeds.shape}")
    # NaN image features give NaN logits, and every caption comes out empty
    check_finite(image_embeds, "generate: image_embeds (NaN or inf pixels or weights upstream)")
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 1 or prompt_ids.size == 0:
        raise ValueError(f"prompt_ids: expected a non-empty 1-d array, got shape {prompt_ids.shape}")
    if not prompt_ids.size < max_length:
        raise ValueError(f"the prompt is {prompt_ids.size} tokens with its start token, and "
                         f"max_length ({max_length}) counts them: it must be longer, or the "
                         f"prompt shorter")
    if min_length > max_length:
        raise ValueError(f"min_length {min_length} > max_length {max_length}")
    return prompt_ids


def generate(decoder, image_embeds, prompt_ids, *, sep_id: int, method: str = "beam",
             max_length: int = 20, min_length: int = 5, num_beams: int = 3,
             top_p: float = 0.9, repetition_penalty: float | None = None,
             rng: np.random.Generator | None = None, use_cache: bool = True) -> Generation:
    """Generate one caption per image.

    decoder: a ``minblip.text.TextDecoder``; image_embeds (B, S, Dv) from the ViT;
    prompt_ids (Tp,) e.g. the ids of "[DEC] a picture of" (no [SEP]).
    ``max_length``/``min_length`` count the prompt, as BLIP's do. The
    repetition penalty defaults to 1.1 for nucleus sampling (BLIP hard-codes it)
    and 1.0 otherwise. Nucleus sampling needs ``rng``.
    """
    prompt_ids = _check(image_embeds, prompt_ids, max_length, min_length, method)
    if repetition_penalty is None:
        repetition_penalty = 1.1 if method == "nucleus" else 1.0
    if method == "nucleus" and rng is None:
        raise ValueError("nucleus sampling needs an explicit rng")
    if method == "beam":
        return Generation(*_beam_search(decoder, image_embeds, prompt_ids, sep_id, max_length,
                                        min_length, num_beams, repetition_penalty, use_cache))
    return _sample(decoder, image_embeds, prompt_ids, sep_id, max_length, min_length,
                   method == "nucleus", top_p, repetition_penalty, rng, use_cache)


def _sample(decoder, image_embeds, prompt_ids, sep_id, max_length, min_length, nucleus,
            top_p, penalty, rng, use_cache):
    """Greedy decoding or nucleus sampling for a batch; finished rows are frozen."""
    B = image_embeds.shape[0]
    seqs = np.tile(prompt_ids, (B, 1))
    scores = np.zeros(B)
    done = np.zeros(B, dtype=bool)
    stepper = _Stepper(decoder, image_embeds, use_cache)
    while seqs.shape[1] < max_length and not done.all():
        logits = stepper.next_logits(seqs).astype(np.float64)
        logits = apply_repetition_penalty(logits, seqs, penalty)
        if seqs.shape[1] < min_length:  # MinLengthLogitsProcessor: no [SEP] yet
            logits[:, sep_id] = -np.inf
        if nucleus:
            logits = top_p_filter(logits, top_p)
        logp = log_softmax(logits)
        if nucleus:
            cum = np.cumsum(np.exp(logp), axis=1)
            u = rng.random(B)[:, None] * cum[:, -1:]
            nxt = np.minimum(np.sum(cum <= u, axis=1), logits.shape[1] - 1)
        else:
            nxt = np.argmax(logp, axis=1)
        nxt = np.where(done, sep_id, nxt)
        scores += np.where(done, 0.0, logp[np.arange(B), nxt])
        seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
        done |= nxt == sep_id
    tokens = []
    for row in seqs[:, prompt_ids.size:]:
        end = np.flatnonzero(row == sep_id)
        tokens.append(row[:end[0]] if end.size else row)
    return Generation(tokens, scores)


def _beam_search(decoder, image_embeds, prompt_ids, sep_id, max_length, min_length,
                 num_beams, penalty, use_cache):
    """Beam search for a batch of images, following Hugging Face transformers 5
    ``GenerationMixin._beam_search`` with length_penalty 1 and early_stopping False.
    Per image:

    * scores are sums of log-probabilities; the min-length block and the
      repetition penalty act on the log-probabilities (no renormalisation);
    * of the 2 * num_beams best candidates, those among the first num_beams that
      end ([SEP], or reaching max_length) become hypotheses scored
      sum(log p) / (generated tokens, [SEP] included); the best num_beams
      candidates that do not end live on;
    * the search stops when num_beams hypotheses exist and the best live beam,
      normalised the same way, cannot beat the worst of them.

    (transformers 4.15, which salesforce/BLIP pinned, divided by the full length
    with the prompt and without [SEP]; the chosen captions rarely differ.)

    Like HF, all images are searched together: row b * K + k of the decoder's
    batch is beam k of image b, and each image's bookkeeping is one row of the
    (images, beams) arrays below. Each image gets exactly the result it would
    get alone. Returns the best hypothesis per image: (tokens list, scores (B,)).
    """
    B, K, P = image_embeds.shape[0], num_beams, prompt_ids.size
    L = max_length - P  # the most tokens a hypothesis can hold
    # one decoder call per step for all B * K rows: a call of only K rows is mostly overhead
    stepper = _Stepper(decoder, np.repeat(image_embeds, K, axis=0), use_cache)
    active = np.arange(B)  # (A,) the images still searching, A <= B
    seqs = np.tile(prompt_ids, (B * K, 1))  # (A * K, t) live beams, image-major
    live = np.full((B, K), -1e9)  # (A, K) live beams' scores
    live[:, 0] = 0.0  # all beams start equal: keep one so the first step does not repeat
    # finished hypotheses per image, best first; an empty slot scores -inf
    hyp_scores = np.full((B, K), -np.inf)  # (B, K) sum(log p) / generated tokens
    hyp_tokens = np.full((B, K, L), sep_id)  # (B, K, L) tokens after the prompt
    hyp_lengths = np.zeros((B, K), dtype=np.int64)  # (B, K) how many of them count
    while active.size:  # the step that reaches max_length ends every candidate
        A, length = active.size, seqs.shape[1]
        logp = log_softmax(stepper.next_logits(seqs).astype(np.float64))  # (A * K, V)
        logp = apply_repetition_penalty(logp, seqs, penalty)
        if length < min_length:
            logp[:, sep_id] = -np.inf
        V = logp.shape[1]
        cand = (live.reshape(-1, 1) + logp).reshape(A, K * V)  # (A, K * V)
        top = np.argsort(-cand, axis=1, kind="stable")[:, :2 * K]  # (A, 2K)
        rows, tokens = top // V, top % V  # (A, 2K) beam within its image, next token
        scores = np.take_along_axis(cand, top, axis=1)  # (A, 2K)
        ends = (tokens == sep_id) | (length + 1 >= max_length)  # (A, 2K)

        # the first K candidates that end become hypotheses; the best K of old and new stay
        new_scores = np.where(ends[:, :K] & np.isfinite(scores[:, :K]),
                              scores[:, :K] / (length + 1 - P), -np.inf)  # (A, K)
        if np.isfinite(new_scores).any():  # most steps end nothing: skip the merge
            parents = seqs.reshape(A, K, length)[np.arange(A)[:, None], rows[:, :K]]  # (A, K, t)
            new_tokens = np.full((A, K, L), sep_id)  # (A, K, L)
            new_tokens[:, :, :length - P] = parents[:, :, P:]
            new_tokens[:, :, length - P] = tokens[:, :K]  # cut at max_length: last token counts
            new_lengths = length + 1 - P - (tokens[:, :K] == sep_id)  # [SEP] is scored, not kept
            merged = np.concatenate([hyp_scores[active], new_scores], axis=1)  # (A, 2K)
            # stable sort: on equal scores older hypotheses, then candidates in rank order, first
            best = np.argsort(-merged, axis=1, kind="stable")[:, :K]  # (A, K)
            pick = (np.arange(A)[:, None], best)
            hyp_scores[active] = merged[pick]
            hyp_tokens[active] = np.concatenate([hyp_tokens[active], new_tokens], axis=1)[pick]
            hyp_lengths[active] = np.concatenate([hyp_lengths[active], new_lengths], axis=1)[pick]

        running = scores - 1e9 * ends  # (A, 2K) an ending candidate does not live on
        keep = np.argsort(-running, axis=1, kind="stable")[:, :K]  # (A, K)
        live = np.take_along_axis(running, keep, axis=1)  # (A, K), best first
        parent_rows = np.arange(A)[:, None] * K + np.take_along_axis(rows, keep, axis=1)  # (A, K)
        next_tokens = np.take_along_axis(tokens, keep, axis=1)  # (A, K)

        worst = hyp_scores[active, -1]  # (A,) -inf until K hypotheses exist
        improvable = ~np.isfinite(worst) | (live[:, 0] / (length + 1 - P) > worst)
        going = improvable & ~ends.all(axis=1)  # (A,)
        # an image that stops leaves the batch: its rows drop out of the cache with the reorder
        index = parent_rows[going].reshape(-1)  # (A' * K,)
        seqs = np.concatenate([seqs[index], next_tokens[going].reshape(-1, 1)], axis=1)
        stepper.reorder(index)
        active, live = active[going], live[going]
    return [h[:n] for h, n in zip(hyp_tokens[:, 0], hyp_lengths[:, 0])], hyp_scores[:, 0]
