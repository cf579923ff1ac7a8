"""Evaluating BLIP-2: stage-1 retrieval and captions, text from the frozen
language model, stage-2 captions and zero-shot questions.

* Stage 1 (salesforce/LAVIS ``blip2_qformer.py``): retrieval ranks pairs by
  the ITC similarity, the maximum over the queries (``compute_sim_matrix``),
  and optionally re-ranks each query's ``k_test`` best candidates by ITM;
  captions come from the ITG head, starting from [DEC] (``Blip2Qformer.generate``).
* The language model writes text after an optional soft prompt
  (:func:`generate_text`) and scores the word that answers a prompt
  (:func:`answer_logits`; :func:`next_token_logits` for the decoder-only LM).
* Stage 2 (``blip2_opt.py`` ``Blip2OPT.generate``, ``blip2_t5.py``
  ``Blip2T5.generate``): captions written by the frozen LM after the image's
  soft prompt, scored per attribute against the scene; instructed zero-shot
  answers to questions stage 2 never trained on, next to the same LM without
  the image and chance.

Both language-model designs are served by the same functions: the decoder-only
LM continues ``[CLS] prompt`` after the soft prompt; the encoder-decoder LM
reads ``[soft prompt | prompt [SEP]]`` in its encoder and its decoder writes
from the start token (for the empty captioning prompt the encoder's text is
``[SEP]`` alone, as T5's tokenizer turns "" into ``</s>``).
"""
from __future__ import annotations

import numpy as np

from . import world
from .blip2_stage1 import Blip2Stage1, QFormerCaptioner
from .blip2_stage2 import Blip2Stage2
from .core import check_float, check_ndim
from .evaluate import caption_metrics, recall_at_k, rerank_with_itm
from .generation import generate
from .image import preprocess
from .lm import LanguageModel, SoftPromptDecoder
from .questions import QUESTION_KINDS, answer_choices, encode_seq2seq, qa_text, scene_questions
from .t5 import EncoderDecoderCaptioner, EncoderDecoderLM
from .tokenizer import Tokenizer, prompt_ids


# ---------------------------------------------------------------------------------------
# Stage 1: retrieval and captions
# ---------------------------------------------------------------------------------------

def stage1_retrieval_scores(model: Blip2Stage1, tokenizer: Tokenizer, captions, *, images=None,
                           image_features=None, k_test: int = 0):
    """Image-text scores of N images and their N captions (tokenized to at most
    the Q-Former's ``max_positions`` tokens).

    Returns (itc, reranked): ``itc`` (N, N) is the stage-1 similarity
    ``max_q`` cosine (no temperature; LAVIS ``compute_sim_matrix``);
    ``reranked`` is None for ``k_test=0``, else a pair (i2t, t2i) of (N, N)
    where each query's ``k_test`` best ITC candidates score ITM match logit
    (mean over queries) + ITC similarity and the rest -100.
    """
    feats = model.encoder_output(images, image_features)
    ids, mask = tokenizer.encode(list(captions), max_length=model.cfg.qformer.max_positions)
    if len(ids) != len(feats):
        raise ValueError(f"retrieval: {len(feats)} images but {len(ids)} captions")
    embeds = model.ln_vision.forward(feats)[0]
    image_feats = np.concatenate([model.encode_image(image_features=feats[s:s + 256])
                                  for s in range(0, len(feats), 256)])  # (N, Q, E)
    text_feat = np.concatenate([model.encode_text(ids[s:s + 256], mask[s:s + 256])
                                for s in range(0, len(ids), 256)])  # (N, E)
    itc = np.einsum("iqe,te->itq", image_feats, text_feat).max(axis=-1)  # (N images, N texts)
    if not k_test:
        return itc, None

    def match_logit(img, txt):  # in chunks of 256 pairs, as the encoders above
        return np.concatenate([model.itm_logits(embeds[img[s:s + 256]], ids[txt[s:s + 256]],
                                                mask[txt[s:s + 256]])[:, 1]
                               for s in range(0, len(img), 256)])
    return itc, rerank_with_itm(itc, k_test, match_logit)


def stage1_retrieval_metrics(model: Blip2Stage1, tokenizer: Tokenizer, captions, *, images=None,
                            image_features=None, k_test: int = 0) -> dict:
    """Recall@1/5/10 for image->text and text->image retrieval with ITC
    (``itc_i2t``, ``itc_t2i``) and, for ``k_test > 0``, after ITM re-ranking
    (``i2t``, ``t2i``). Item i's right answer is item i. Re-ranking needs
    ``k_test >= 10``: with fewer candidates a right answer outside them (score
    -100, tied with every other non-candidate) would still count for recall@10."""
    if k_test and k_test < 10:
        raise ValueError(f"stage1_retrieval_metrics: k_test must be 0 (ITC only) or >= 10 for "
                         f"recall@10, got {k_test}")
    itc, reranked = stage1_retrieval_scores(model, tokenizer, captions, images=images,
                                            image_features=image_features, k_test=k_test)
    tables = {"itc_i2t": itc, "itc_t2i": itc.T}
    if reranked is not None:
        tables.update(i2t=reranked[0], t2i=reranked[1])
    return {f"{name}_recall@{k}": v for name, s in tables.items()
            for k, v in recall_at_k(s).items()}


def stage1_captions(model: Blip2Stage1, tokenizer: Tokenizer, *, images=None,
                    image_features=None, method: str = "greedy",
                    max_length: int | None = None, min_length: int = 3,
                    rng: np.random.Generator | None = None) -> list[str]:
    """One caption per image from the ITG head, starting from [DEC]. ``method``:
    "greedy", "beam" or "nucleus" (needs ``rng``); ``max_length`` counts [DEC] and
    defaults to the Q-Former's ``max_positions``."""
    if max_length is None:
        max_length = model.cfg.qformer.max_positions
    embeds = model.image_embeds(images, image_features)
    out = generate(QFormerCaptioner(model), embeds, np.array([tokenizer.dec_id]),
                   sep_id=tokenizer.sep_id, method=method, max_length=max_length,
                   min_length=min_length, rng=rng)
    return [tokenizer.decode(t) for t in out.tokens]


# ---------------------------------------------------------------------------------------
# Text from the language model
# ---------------------------------------------------------------------------------------

def generate_text(lm, tokenizer: Tokenizer, prefix_embeds=None, prompt: str = "",
                  batch_size: int | None = None, method: str = "greedy", max_length: int = 20,
                  min_length: int = 1, num_beams: int = 5, top_p: float = 0.9,
                  repetition_penalty: float = 1.0, suppress_words=(), rng=None) -> list[str]:
    """Text from the LM after an optional soft prompt (B, P, D), one text per row,
    until ``[SEP]`` or ``max_length`` tokens.

    Decoder-only LM: continues ``[CLS] prompt``; ``max_length`` counts BOS and the
    prompt. Encoder-decoder LM: the encoder reads ``[soft prompt | prompt [SEP]]``
    and the decoder writes from its start token, which ``max_length`` counts
    (``Blip2T5.generate`` passes its length as ``max_new_tokens``).
    Words in ``suppress_words`` are never generated (HF ``suppress_tokens``).

    Uses ``minblip.generation.generate`` (greedy, beam or nucleus, HF logit
    processors, cached keys and values). BLIP-2 defaults: beam search with
    5 beams, min_length 1, repetition penalty 1.0. Returns the generated words
    without the prompt. Without a prefix, ``batch_size`` texts are generated
    (default 1).
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"generate_text: expected a Tokenizer, got {type(tokenizer).__name__}")
    D = lm.cfg.token_width
    if prefix_embeds is None:
        prefix_embeds = np.zeros((1 if batch_size is None else batch_size, 0, D), lm.dtype)
    else:
        check_float(prefix_embeds, "prefix_embeds")
        check_ndim(prefix_embeds, 3, "prefix_embeds", f"(B, P, {D})")
        if prefix_embeds.shape[-1] != D:
            raise ValueError(f"prefix_embeds: expected width {D}, got shape {prefix_embeds.shape}")
        prefix_embeds = prefix_embeds.astype(lm.dtype, copy=False)
    if isinstance(suppress_words, str):
        suppress_words = (suppress_words,)
    unknown = [w for w in suppress_words if tokenizer.token_to_id(w) == tokenizer.unk_id]
    if unknown:
        raise ValueError(f"suppress_words: {unknown} are not in the vocabulary")
    suppress = [tokenizer.token_to_id(w) for w in suppress_words]
    if isinstance(lm, EncoderDecoderLM):
        enc_ids, _, _ = encode_seq2seq(tokenizer, [prompt] * len(prefix_embeds),
                                       max_length=lm.cfg.max_positions)
        memory, _, _ = lm.encode(enc_ids, prefix_embeds=prefix_embeds if prefix_embeds.shape[1]
                                 else None)  # the same prompt in every row: no padding
        decoder, source, start_ids = (EncoderDecoderCaptioner(lm, suppress), memory,
                                      np.array([lm.cfg.pad_id]))  # T5's decoder start
    else:
        decoder, source, start_ids = (SoftPromptDecoder(lm, suppress), prefix_embeds,
                                      prompt_ids(tokenizer, prompt))
    out = generate(decoder, source, start_ids, sep_id=tokenizer.sep_id,
                   method=method, max_length=max_length, min_length=min_length,
                   num_beams=num_beams, top_p=top_p, repetition_penalty=repetition_penalty,
                   rng=rng)
    return [tokenizer.decode(t) for t in out.tokens]


def answer_logits(lm, tokenizer: Tokenizer, prompts, prefix_embeds=None):
    """Logits (B, V) of the first word of the answer to each prompt (one per row)
    after an optional soft prompt (B, P, D): for the decoder-only LM the token after
    ``[CLS] prompt`` (:func:`next_token_logits`); for the encoder-decoder LM the
    decoder's first token, the encoder having read ``[soft prompt | prompt [SEP]]``
    (padded rows: each attends to its own text only)."""
    if not isinstance(lm, EncoderDecoderLM):
        return next_token_logits(lm, tokenizer, prompts, prefix_embeds)
    if isinstance(prompts, str):
        prompts = [prompts]
    enc_ids, enc_mask, _ = encode_seq2seq(tokenizer, list(prompts),
                                          max_length=lm.cfg.max_positions)
    start = np.full((len(enc_ids), 1), lm.cfg.pad_id)  # T5's decoder start token
    logits, _ = lm.forward(enc_ids, enc_mask, start, prefix_embeds=prefix_embeds)
    return logits[:, 0]


def next_token_logits(lm: LanguageModel, tokenizer: Tokenizer, prompts, prefix_embeds=None):
    """Logits (B, V) of the token that follows ``[CLS] prompt`` (one prompt per row,
    lengths may differ) after an optional soft prompt (B, P, D). One batched
    forward: the text is right-padded and each row is read at its own last token,
    which the causal mask keeps blind to the padding after it."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids, mask = tokenizer.encode(list(prompts), max_length=lm.cfg.max_positions)
    ids, mask = ids[:, :-1], mask[:, :-1].copy()  # drop the final column: [SEP] or [PAD]
    mask[ids == tokenizer.sep_id] = 0
    ids = np.where(mask.astype(bool), ids, tokenizer.pad_id)
    logits, _ = lm.forward(ids, mask, prefix_embeds=prefix_embeds)
    P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    last = P + mask.sum(axis=1) - 1
    return logits[np.arange(len(ids)), last]


# ---------------------------------------------------------------------------------------
# Stage 2: captions and zero-shot questions
# ---------------------------------------------------------------------------------------

def _pixels(split: world.Split, model: Blip2Stage2) -> np.ndarray:
    return preprocess(split.images, model.image_size).astype(model.dtype)


def stage2_captions(model: Blip2Stage2, tokenizer: Tokenizer, images=None, *, image_embeds=None,
                    prompt: str = "", method: str = "beam", num_beams: int = 5,
                    max_length: int = 20, min_length: int = 1, top_p: float = 0.9,
                    suppress_words=(), rng: np.random.Generator | None = None,
                    batch_size: int = 64) -> list[str]:
    """One caption per image, written by the frozen LM after the image's soft prompt
    (``Blip2OPT.generate`` / ``Blip2T5.generate``: beam search with 5 beams,
    min_length 1 by default); see :func:`generate_text` for ``prompt`` and
    ``max_length``. The prompt is not returned."""
    if (images is None) == (image_embeds is None):
        raise ValueError("stage2_captions: give images or image_embeds (one of them)")
    if image_embeds is None:
        image_embeds = model.image_features(images)
    texts = []
    for s in range(0, len(image_embeds), batch_size):
        prefix = model.soft_prompt(image_embeds=image_embeds[s:s + batch_size])
        texts += generate_text(model.language_model, tokenizer, prefix, prompt=prompt,
                               method=method, max_length=max_length, min_length=min_length,
                               num_beams=num_beams, top_p=top_p,
                               suppress_words=suppress_words, rng=rng)
    return texts


def evaluate_stage2_captions(model: Blip2Stage2, tokenizer: Tokenizer, split: world.Split,
                             method: str = "beam", **generate_kwargs) -> tuple[dict, list[str]]:
    """Caption every image of ``split`` and score the captions against the scenes with
    ``world.score_caption`` (``minblip.evaluate.caption_metrics``: per attribute,
    object count, their mean and exact match). Returns (metrics, captions)."""
    captions = stage2_captions(model, tokenizer, _pixels(split, model), method=method,
                               **generate_kwargs)
    return caption_metrics(split.scenes, captions), captions


def qa_items(split: world.Split, seed: int = 0, kinds=QUESTION_KINDS) -> list[dict]:
    """For every image and every question kind it can answer, one question drawn
    at random: dicts with image index, kind, question, answer."""
    rng = np.random.default_rng(seed)
    items = []
    for i, scene in enumerate(split.scenes):
        by_kind: dict[str, list] = {}
        for kind, question, answer in scene_questions(scene):
            by_kind.setdefault(kind, []).append((question, answer))
        for kind in kinds:
            if kind in by_kind:
                question, answer = by_kind[kind][int(rng.integers(len(by_kind[kind])))]
                items.append({"image": i, "kind": kind, "question": question, "answer": answer})
    return items


def zero_shot_qa(model: Blip2Stage2, tokenizer: Tokenizer, split: world.Split, seed: int = 0,
                 kinds=QUESTION_KINDS) -> dict:
    """Instructed zero-shot answers: the soft prompt of the image, then the prompt
    "question <question> answer", and the LM's most likely first word of the
    answer (over the whole vocabulary, :func:`answer_logits`) is compared with the
    truth. Stage 2 never saw a question: only the LM did, as text, during its
    pretraining.

    Also measured: the same prompts with no image at all ("blind": what the LM
    guesses from the question alone) and chance (one over the number of
    possible answers). Returns {kind: {"n", "accuracy", "blind", "chance"}},
    an "overall" entry, and "items" (each with its prediction).
    """
    items = qa_items(split, seed, kinds)
    if not items:
        raise ValueError("zero_shot_qa: the split has no answerable question")
    lm = model.language_model
    features = model.image_features(_pixels(split, model))
    images = np.array([it["image"] for it in items])
    prompts = [qa_text(it["question"]) for it in items]
    prefix = model.soft_prompt(image_embeds=features[images])
    seen = answer_logits(lm, tokenizer, prompts, prefix).argmax(axis=1)
    blind = answer_logits(lm, tokenizer, prompts).argmax(axis=1)
    for it, s, b in zip(items, seen, blind):
        it["prediction"] = tokenizer.id_to_token(int(s))
        it["blind_prediction"] = tokenizer.id_to_token(int(b))
    max_objects = max(len(scene.objects) for scene in split.scenes)
    out = {}
    for kind in kinds:
        chosen = [it for it in items if it["kind"] == kind]
        if chosen:
            out[kind] = {"n": len(chosen),
                         "accuracy": float(np.mean([it["prediction"] == it["answer"]
                                                    for it in chosen])),
                         "blind": float(np.mean([it["blind_prediction"] == it["answer"]
                                                 for it in chosen])),
                         "chance": 1.0 / len(answer_choices(kind, max_objects))}
    out["overall"] = {"n": len(items),
                      "accuracy": float(np.mean([it["prediction"] == it["answer"]
                                                 for it in items])),
                      "blind": float(np.mean([it["blind_prediction"] == it["answer"]
                                              for it in items])),
                      "chance": float(np.mean([out[it["kind"]]["chance"] for it in items]))}
    out["items"] = items
    return out


def answer_questions(model: Blip2Stage2, tokenizer: Tokenizer, images, questions,
                     top: int = 3) -> list[list[tuple[str, float]]]:
    """Instructed zero-shot answers, as the command line's ``ask`` gives them: for
    image b (images (B, 3, H, W), preprocessed) and question b, the ``top`` most
    likely first words of the answer after the image's soft prompt and the prompt
    "question <question> answer", each with its probability. The first is the
    answer :func:`zero_shot_qa` scores (every answer of the world is one word)."""
    if isinstance(questions, str):
        questions = [questions]
    if len(questions) != len(images):
        raise ValueError(f"answer_questions: {len(images)} images but {len(questions)} "
                         f"questions")
    prefix = model.soft_prompt(images=images)
    logits = answer_logits(model.language_model, tokenizer,
                           [qa_text(tokenizer.clean(q)) for q in questions], prefix)
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    best = np.argsort(-p, axis=1)[:, :top]
    return [[(tokenizer.id_to_token(int(i)), float(row[i])) for i in order]
            for row, order in zip(p, best)]
