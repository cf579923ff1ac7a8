"""BLIP-2 stage 1: a Q-Former learns to read a frozen image encoder.

Mirrors salesforce/LAVIS ``lavis/models/blip2_models/blip2_qformer.py``
(``Blip2Qformer.forward``) on minblip's pieces:

* the image encoder is **frozen**: its parameters never change. LAVIS sets
  ``requires_grad=False`` and eval mode; minblip freezes it with the core
  contract's ``freeze()``, so no ``params()`` lists it, and runs it without
  dropout. Its input is pixels, so no gradient is wanted below it and stage 1
  never calls its backward. A trainable ``ln_vision`` LayerNorm (eps 1e-5)
  follows it (``Blip2Base.init_vision_encoder``);
* **ITC**: the queries' outputs (B, Q, D) and the text's [CLS] output are
  projected and L2-normalised; the similarity of an image and a text is the
  *maximum over the queries*; in-batch cross-entropy both ways with label
  smoothing 0.1 and a learnable temperature that is **not clamped**;
* **ITM**: one Q-Former pass over 3B pairs, texts [pos, pos, neg] with images
  [pos, neg, pos], bidirectional mask; ``itm_head`` scores every query output
  and the 2-way logits are averaged over the queries. Negatives are sampled
  from the ITC similarities with the diagonal set to -10000 *before* the softmax;
* **ITG**: [DEC] + the caption under the UniLM mask (text sees the queries and
  earlier text, queries never see text); an LM head tied to the Q-Former's word
  embeddings; cross-entropy with label smoothing 0.1.

The total loss is ITC + ITM + ITG. minblip's frozen image encoder is a BLIP
ViT (``minblip.train_blip2.pretrained_vision``), not EVA ViT-g: its output already ends in
a LayerNorm, and all of its 1+N tokens are used (BLIP-2 drops EVA's last block
and has no final norm, hence ``ln_vision``). ``ln_vision`` is kept for fidelity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .core import Module, Param, check_finite, check_float, check_ndim
from .layers import LayerNorm, Linear
from .objectives import (NextTokenLoss, blip2_negative_weights, check_negatives, itc_max_backward,
                         itc_max_forward, itm_labels, sample_negatives)
from .qformer import QFormer, QFormerConfig
from .softmax import CrossEntropyLoss, L2Normalize
from .text import LMHead, TextConfig
from .vit import ViTConfig, VisionTransformer


@dataclass
class Blip2Config:
    """Sizes and constants of a stage-1 BLIP-2. ``vision`` describes the
    frozen image encoder; its width must be ``qformer.encoder_width``."""

    qformer: QFormerConfig
    vision: ViTConfig = field(default_factory=ViTConfig)
    embed_dim: int = 32           # ITC projection width (BLIP-2: 256)
    temp: float = 0.07            # initial ITC temperature; never clamped (blip_spec 12.2)
    ln_vision_eps: float = 1e-5   # nn.LayerNorm's default (blip2.py init_vision_encoder)
    label_smoothing: float = 0.1  # ITC and ITG (blip2_qformer.py, Qformer.py BertLMHeadModel)
    proj_init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.qformer, dict):
            self.qformer = QFormerConfig(**self.qformer)
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if not isinstance(self.qformer, QFormerConfig) or not isinstance(self.vision, ViTConfig):
            raise TypeError(f"Blip2Config: expected a QFormerConfig and a ViTConfig, got "
                            f"{type(self.qformer).__name__} and {type(self.vision).__name__}")
        if self.qformer.encoder_width != self.vision.width:
            raise ValueError(f"Blip2Config: qformer.encoder_width ({self.qformer.encoder_width}) "
                             f"must equal the image encoder's width vision.width "
                             f"({self.vision.width})")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) \
                or self.embed_dim < 1:
            raise ValueError(f"Blip2Config.embed_dim: expected a positive int, "
                             f"got {self.embed_dim!r}")
        if not self.temp > 0:
            raise ValueError(f"Blip2Config.temp: expected a positive number, got {self.temp}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"Blip2Config.label_smoothing: expected a value in [0, 1), "
                             f"got {self.label_smoothing}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Blip2Config":
        return cls(**d)


class Blip2Stage1(Module):
    """Frozen ViT -> ln_vision -> Q-Former, with the stage-1 heads: ``vision_proj``,
    ``text_proj``, ``itm_head``, ``lm_head`` (tied to the Q-Former's word
    embeddings) and ``temp``. ``params()`` lists exactly the trainable Params.

    ``visual_encoder``: an existing ``VisionTransformer`` to freeze (e.g. from
    :func:`pretrained_vision`); None builds a randomly initialised one from
    ``cfg.vision``.
    """

    def __init__(self, cfg: Blip2Config, rng: np.random.Generator,
                 visual_encoder: VisionTransformer | None = None):
        if visual_encoder is None:
            visual_encoder = VisionTransformer(cfg.vision, rng)
        if not isinstance(visual_encoder, VisionTransformer):
            raise TypeError(f"Blip2Stage1: expected a VisionTransformer to freeze, got "
                            f"{type(visual_encoder).__name__}")
        if visual_encoder.config != cfg.vision:
            raise ValueError(f"Blip2Stage1: the image encoder's config {visual_encoder.config} "
                             f"differs from cfg.vision {cfg.vision}")
        q = cfg.qformer
        self.cfg = cfg
        self.visual_encoder = visual_encoder.freeze()  # frozen in place: the same object
        self.ln_vision = LayerNorm(cfg.vision.width, cfg.ln_vision_eps)
        self.qformer = QFormer(q, rng)
        self.vision_proj = Linear(q.width, cfg.embed_dim, rng, init_std=cfg.proj_init_std)
        self.text_proj = Linear(q.width, cfg.embed_dim, rng, init_std=cfg.proj_init_std)
        self.itm_head = Linear(q.width, 2, rng, init_std=cfg.proj_init_std)
        head_cfg = TextConfig(vocab_size=q.vocab_size, width=q.width, heads=q.heads,
                              mlp_dim=q.mlp_dim, max_positions=q.max_positions, eps=q.eps,
                              encoder_width=q.encoder_width, init_std=q.init_std,
                              pad_id=q.pad_id)
        self.lm_head = LMHead(head_cfg, self.qformer.embeddings.word_embeddings, rng)  # tied
        self.temp = Param(cfg.temp)
        self.normalize = L2Normalize()

    # ---- inference helpers (no caches kept) -------------------------------------------
    def frozen_features(self, images, batch_size: int = 256):
        """images (N, 3, H, W) -> the frozen encoder's output (N, 1+P, Dv), in
        evaluation mode. The encoder never changes, so a dataset's features can be
        computed once."""
        check_float(images, "images")
        images = images.astype(self.dtype, copy=False)
        return np.concatenate([self.visual_encoder.forward(images[s:s + batch_size])[0]
                               for s in range(0, len(images), batch_size)])

    def encoder_output(self, images=None, image_features=None):
        """The frozen encoder's output (B, 1+P, Dv) for ``images`` (B, 3, H, W), or the
        output computed beforehand, ``image_features`` (B, 1+P, Dv), checked and cast
        to the model's dtype. Exactly one of the two is given."""
        if (images is None) == (image_features is None):
            raise ValueError("pass exactly one of images (B, 3, H, W) and image_features "
                             "(B, 1+P, Dv)")
        if image_features is None:
            check_finite(check_float(images, "images"), "images")
            return self.visual_encoder.forward(images.astype(self.dtype, copy=False))[0]
        check_finite(check_float(image_features, "image_features"), "image_features")
        check_ndim(image_features, 3, "image_features", "(B, 1+P, Dv)")
        if image_features.shape[-1] != self.cfg.vision.width:
            raise ValueError(f"image_features: expected width {self.cfg.vision.width}, "
                             f"got shape {image_features.shape}")
        return image_features.astype(self.dtype, copy=False)

    def image_embeds(self, images=None, image_features=None):
        """ln_vision(frozen ViT(images)) (B, 1+P, Dv): what the queries cross-attend to.
        Pass ``images`` (B, 3, H, W) or precomputed ``image_features`` (B, 1+P, Dv)."""
        feats = self.encoder_output(images, image_features)
        return self.ln_vision.forward(feats)[0]

    def query_outputs(self, images=None, image_features=None):
        """The Q-Former's query outputs (B, Q, D): the image representation that
        ITC compares and that stage 2 feeds to the language model."""
        return self.qformer.forward(self.image_embeds(images, image_features), mode="queries")[0]

    def encode_image(self, images=None, image_features=None):
        """-> image_feats (B, Q, E): one unit vector per query."""
        proj, _ = self.vision_proj.forward(self.query_outputs(images, image_features))
        return self.normalize.forward(proj)[0]

    def encode_text(self, ids, mask):
        """[CLS] ids (B, T), mask (B, T) -> text_feat (B, E) unit norm."""
        h, _ = self.qformer.forward(ids=ids, attention_mask=mask, mode="text")
        return self.normalize.forward(self.text_proj.forward(h[:, 0])[0])[0]

    def itm_logits(self, image_embeds, ids, mask):
        """Pairs (image_embeds[i], ids[i]) -> ITM logits (B, 2), averaged over queries."""
        h, _ = self.qformer.forward(image_embeds, ids, mask, mode="itm")
        per_query, _ = self.itm_head.forward(h[:, :self.cfg.qformer.num_queries])  # (B, Q, 2)
        return per_query.mean(axis=1)


# ---------------------------------------------------------------------------------------
# The stage-1 step
# ---------------------------------------------------------------------------------------

@dataclass
class Stage1Result:
    loss: float
    losses: dict                  # "itc", "itm", "itg": floats (0.0 for a disabled objective)
    neg_image_idx: np.ndarray | None
    neg_text_idx: np.ndarray | None
    sim_i2t: np.ndarray | None    # (B, B) ITC logits (max over queries / temp)
    best_query: np.ndarray | None  # (B, B) the query that won each ITC maximum
    itm_logits: np.ndarray | None  # (3B, 2), averaged over queries


def sample_blip2_negatives(sim_i2t, rng: np.random.Generator):
    """BLIP-2's ITM negatives from the in-batch ITC logits ``sim_i2t`` (B, B):
    for each text a negative image (rows of ``sim_i2t^T``) and for each image a
    negative text (rows of ``sim_i2t``), weighted by
    :func:`~minblip.objectives.blip2_negative_weights`. Returns (neg_image_idx,
    neg_text_idx), each (B,)."""
    return sample_negatives(blip2_negative_weights(sim_i2t.T), blip2_negative_weights(sim_i2t),
                            rng)


def stage1_step(model: Blip2Stage1, images, ids, mask, *, dec_id: int,
                rng: np.random.Generator | None = None, negatives=None,
                weights=(1.0, 1.0, 1.0), backward: bool = True,
                image_features=None) -> Stage1Result:
    """One BLIP-2 stage-1 step: ITC + ITM + ITG, then (if ``backward``) one
    mirrored backward adding every gradient into the trainable Params.

    images (B, 3, H, W) float, or ``images=None`` and ``image_features``
    (B, 1+P, Dv) = the frozen encoder's output computed beforehand. ids (B, T)
    "[CLS] words [SEP] [PAD]..." from the tokenizer; mask (B, T) 0/1; dec_id:
    the [DEC] id that replaces [CLS] for ITG. ``rng`` drives dropout and the
    ITM negatives; ``negatives=(neg_image_idx, neg_text_idx)`` fixes them
    instead. ``weights`` scale (ITC, ITM, ITG); a zero weight skips that
    objective. A batch of one has no negative, so ITM is skipped. The caller
    zeroes the gradients first. The temperature is not clamped (BLIP-2 does not).
    """
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"stage1_step: expected ids and mask of the same shape (B, T), got "
                         f"ids {ids.shape} and mask {mask.shape}")
    feats = model.encoder_output(images, image_features)  # (B, 1+P, Dv): frozen, no backward
    B = ids.shape[0]
    if feats.shape[0] != B:
        raise ValueError(f"stage1_step: {feats.shape[0]} images but {B} texts")
    if len(weights) != 3:
        raise ValueError(f"stage1_step: weights needs three numbers (ITC, ITM, ITG), "
                         f"got {weights}")
    w_itc, w_itm, w_itg = (float(w) for w in weights)
    use_itm = w_itm != 0.0 and B >= 2
    Q = model.cfg.qformer.num_queries
    ls = model.cfg.label_smoothing
    qf = model.qformer
    losses = {"itc": 0.0, "itm": 0.0, "itg": 0.0}

    # ---------------- forward ----------------
    image_embeds, c_lnv = model.ln_vision.forward(feats)  # (B, 1+P, Dv), trainable LN

    need_itc = w_itc != 0.0 or (use_itm and negatives is None)
    sim_i2t = best_query = None
    if need_itc:
        q_h, c_q = qf.forward(image_embeds, mode="queries", rng=rng)  # (B, Q, D)
        q_proj, c_vproj = model.vision_proj.forward(q_h)  # (B, Q, D) -> (B, Q, E)
        image_feats, c_vnorm = model.normalize.forward(q_proj)
        t_h, c_t = qf.forward(ids=ids, attention_mask=mask, mode="text", rng=rng)  # (B, T, D)
        t_proj, c_tproj = model.text_proj.forward(t_h[:, 0])  # [CLS] -> (B, E)
        text_feat, c_tnorm = model.normalize.forward(t_proj)
        loss_itc, c_itc = itc_max_forward(image_feats, text_feat, model.temp, ls)
        losses["itc"] = loss_itc
        sim_i2t, best_query = c_itc["sim"], c_itc["best_query"]

    neg_image_idx = neg_text_idx = itm_logits = None
    if use_itm:
        if negatives is None:
            if rng is None:
                raise ValueError("stage1_step: ITM needs rng or fixed negatives")
            neg_image_idx, neg_text_idx = sample_blip2_negatives(sim_i2t, rng)
        else:
            neg_image_idx, neg_text_idx = check_negatives(negatives, B)
        # rows: (text b, image b), (text b, its negative image), (negative text, image b)
        ids_all = np.concatenate([ids, ids, ids[neg_text_idx]])  # texts [pos, pos, neg]
        mask_all = np.concatenate([mask, mask, mask[neg_text_idx]])
        embeds_all = np.concatenate([image_embeds, image_embeds[neg_image_idx],
                                     image_embeds])  # images [pos, neg, pos]
        h_itm, c_itm = qf.forward(embeds_all, ids_all, mask_all, mode="itm", rng=rng)
        per_query, c_head = model.itm_head.forward(h_itm[:, :Q])  # (3B, Q, D) -> (3B, Q, 2)
        itm_logits = per_query.mean(axis=1)  # (3B, 2): averaged over the queries
        itm_ce = CrossEntropyLoss()
        losses["itm"], c_itm_ce = itm_ce.forward(itm_logits, itm_labels(B))

    if w_itg != 0.0:
        dec_ids = ids.copy()
        dec_ids[:, 0] = dec_id  # blip2_qformer.py: decoder_input_ids[:, 0] = bos_token_id
        labels = np.where(mask.astype(bool), dec_ids, -100)  # padding is ignored
        h_itg, c_itg = qf.forward(image_embeds, dec_ids, mask, mode="itg", rng=rng)
        logits, c_lm = model.lm_head.forward(h_itg[:, Q:])  # text rows only -> (B, T, V)
        itg_loss = NextTokenLoss(label_smoothing=ls)
        losses["itg"], c_itg_loss = itg_loss.forward(logits, labels)  # token t+1 from <= t

    total = w_itc * losses["itc"] + w_itm * losses["itm"] + w_itg * losses["itg"]
    result = Stage1Result(float(total), losses, neg_image_idx, neg_text_idx, sim_i2t,
                          best_query, itm_logits)
    if not backward:
        return result

    # ---------------- backward (the forward read bottom-up) ----------------
    d_embeds = np.zeros_like(image_embeds)
    if w_itg != 0.0:
        dlogits = itg_loss.backward(w_itg, c_itg_loss)  # (B, T, V); the last row predicts nothing
        dh = np.zeros_like(h_itg)
        dh[:, Q:] = model.lm_head.backward(dlogits, c_lm)  # undoes logits = head(text rows)
        d_embeds += qf.backward(dh, c_itg)

    if use_itm:
        dlog = itm_ce.backward(w_itm, c_itm_ce)  # (3B, 2)
        dper = np.repeat(dlog[:, None, :] / Q, Q, axis=1)  # undoes the mean over queries
        dh = np.zeros_like(h_itm)
        dh[:, :Q] = model.itm_head.backward(dper, c_head)  # only query rows feed the head
        d_all = qf.backward(dh, c_itm)  # (3B, 1+P, Dv)
        d_embeds += d_all[:B] + d_all[2 * B:]  # undoes the [pos, neg, pos] concatenation
        np.add.at(d_embeds, neg_image_idx, d_all[B:2 * B])  # an image can be drawn twice

    if w_itc != 0.0:
        d_image_feats, d_text_feat = itc_max_backward(w_itc, c_itc, model.temp)
        dt_h = np.zeros_like(t_h)
        dt_h[:, 0] = model.text_proj.backward(model.normalize.backward(d_text_feat, c_tnorm),
                                              c_tproj)
        qf.backward(dt_h, c_t)  # text mode: no image gradient
        dq_h = model.vision_proj.backward(model.normalize.backward(d_image_feats, c_vnorm),
                                          c_vproj)
        d_embeds += qf.backward(dq_h, c_q)

    model.ln_vision.backward(d_embeds, c_lnv)  # the frozen encoder below gets nothing
    return result



# ---------------------------------------------------------------------------------------
# Generation from the ITG head
# ---------------------------------------------------------------------------------------

class QFormerCaptioner:
    """Adapts a stage-1 model to ``minblip.generation.generate``.

    ``generate`` caches, per layer, keys and values of the image
    (``decoder.image_kv``) and of the text so far (``decoder.forward_incremental``).
    For the Q-Former the "image" cache is the queries' self-attention keys and
    values: the text attends to them exactly as in ITG (LAVIS
    ``Blip2Qformer.generate`` starts from [DEC] with the queries as the prefix).
    """

    def __init__(self, model: Blip2Stage1):
        self.model = model

    def image_kv(self, image_embeds):
        return self.model.qformer.query_kv(image_embeds)

    def forward_incremental(self, ids, past=None, image_kv=None, start: int = 0):
        h, present = self.model.qformer.forward_incremental(ids, image_kv, past, start)
        logits, _ = self.model.lm_head.forward(h)
        return logits, present
