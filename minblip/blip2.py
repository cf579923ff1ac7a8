"""BLIP-2 stage 1: a Q-Former learns to read a frozen image encoder.

Mirrors salesforce/LAVIS ``lavis/models/blip2_models/blip2_qformer.py``
(``Blip2Qformer.forward``) on minblip's pieces:

* the image encoder is **frozen**: no gradient is computed for it and its
  parameters never change. LAVIS sets ``requires_grad=False`` and eval mode;
  minblip keeps the ViT in a :class:`Frozen` holder that ``Module.params()``
  does not walk into, runs it without a cache and never calls its backward.
  A trainable ``ln_vision`` LayerNorm (eps 1e-5) follows it
  (``Blip2Base.init_vision_encoder``);
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
ViT (see :func:`pretrained_vision`), not EVA ViT-g: its output already ends in
a LayerNorm, and all of its 1+N tokens are used (BLIP-2 drops EVA's last block
and has no final norm, hence ``ln_vision``). ``ln_vision`` is kept for fidelity.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from . import world
from .core import Module, Param, check_float, check_ndim
from .evaluate import recall_at_k, rerank_with_itm
from .generation import generate
from .image import preprocess
from .layers import LayerNorm, Linear
from .optim import AdamW, clip_grad_norm, warmup_cosine_lr
from .qformer import QFormer, QFormerConfig
from .softmax import CrossEntropyLoss, L2Normalize, softmax
from .text import LMHead, TextConfig
from .tokenizer import Tokenizer
from .train import Trainer, TrainConfig, build_tokenizer, load_model
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


class Frozen:
    """Holds a Module outside the trainable tree.

    ``Module.params()``, ``zero_grad()``, the optimiser and the gradient
    clipper walk only Modules, lists, tuples and dicts, so nothing reaches
    inside this plain object: the held module's Params are never listed,
    zeroed, clipped or updated. ``forward`` runs it in evaluation mode (no rng,
    so no dropout) and keeps no cache, since no backward will ever be called.
    """

    __slots__ = ("module",)

    def __init__(self, module: Module):
        if not isinstance(module, Module):
            raise TypeError(f"Frozen: expected a Module, got {type(module).__name__}")
        self.module = module

    def forward(self, *inputs):
        out, _ = self.module.forward(*inputs)
        return out

    def param_count(self) -> int:
        return self.module.param_count()

    def __repr__(self) -> str:
        return f"Frozen({type(self.module).__name__}, {self.param_count():,} parameters)"


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
        self.visual_encoder = Frozen(visual_encoder)
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

    def to(self, dtype) -> "Blip2Stage1":
        """Switch the trainable Params and the frozen encoder to ``dtype``."""
        super().to(dtype)
        self.visual_encoder.module.to(dtype)
        return self

    def parameter_counts(self) -> dict:
        """Scalars that train, that are frozen, and in total."""
        trainable, frozen = self.param_count(), self.visual_encoder.param_count()
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}

    # ---- inference helpers (no caches kept) -------------------------------------------
    def frozen_features(self, images, batch_size: int = 256):
        """images (N, 3, H, W) -> the frozen encoder's output (N, 1+P, Dv).
        The encoder never changes, so a dataset's features can be computed once."""
        check_float(images, "images")
        images = images.astype(self.dtype, copy=False)
        return np.concatenate([self.visual_encoder.forward(images[s:s + batch_size])
                               for s in range(0, len(images), batch_size)])

    def image_embeds(self, images=None, image_features=None):
        """ln_vision(frozen ViT(images)) (B, 1+P, Dv): what the queries cross-attend to.
        Pass ``images`` (B, 3, H, W) or precomputed ``image_features`` (B, 1+P, Dv)."""
        feats = _features(self, images, image_features)
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


def _features(model: Blip2Stage1, images, image_features):
    if (images is None) == (image_features is None):
        raise ValueError("pass exactly one of images (B, 3, H, W) and image_features "
                         "(B, 1+P, Dv)")
    if image_features is None:
        check_float(images, "images")
        return model.visual_encoder.forward(images.astype(model.dtype, copy=False))
    check_float(image_features, "image_features")
    check_ndim(image_features, 3, "image_features", "(B, 1+P, Dv)")
    if image_features.shape[-1] != model.cfg.vision.width:
        raise ValueError(f"image_features: expected width {model.cfg.vision.width}, "
                         f"got shape {image_features.shape}")
    return image_features.astype(model.dtype, copy=False)


# ---------------------------------------------------------------------------------------
# ITC with the maximum over queries
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
    (image-to-text over the rows of S / t, text-to-image over the rows of S^T / t)."""
    ### BEGIN SOLUTION
    image_feats, text_feat, best, sim, t, ce, c_i2t, c_t2i = cache["loss"]
    B = sim.shape[0]
    # undoes loss = (CE(S / t) + CE(S^T / t)) / 2; the second term read S transposed
    dlogits = ce.backward(0.5 * dloss, c_i2t) + ce.backward(0.5 * dloss, c_t2i).T  # (B, B)
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

def negative_weights(sim):
    """BLIP-2's sampling weights: softmax over the in-batch ITC logits with the
    diagonal (the positive) set to -10000 *before* the softmax
    (blip2_qformer.py ``sim_t2i.fill_diagonal_(-10000)``). BLIP instead zeroes
    the diagonal after the softmax and adds 1e-4 (``minblip.blip.hard_negative_weights``)."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[1] < sim.shape[0]:
        raise ValueError(f"negative weights: expected (B, K >= B) similarities, got {sim.shape}")
    B = sim.shape[0]
    s = sim[:, :B].copy()
    np.fill_diagonal(s, -10000.0)
    return softmax(s)


def sample_negatives(sim_i2t, sim_t2i, rng: np.random.Generator):
    """One negative image per text and one negative text per image, each row
    drawn in proportion to :func:`negative_weights` (``torch.multinomial``).

    Returns ``neg_image_idx`` (B,) (for text b, its negative image) and
    ``neg_text_idx`` (B,) (for image b, its negative text). Needs B >= 2.
    """
    B = np.shape(sim_i2t)[0]
    if B < 2:
        raise ValueError(f"ITM negatives need a batch of at least 2, got {B}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy Generator, got {type(rng).__name__}")

    def draw(weights):
        cum = np.cumsum(weights, axis=1)  # (B, B)
        u = rng.random(B)[:, None] * cum[:, -1:]
        return np.minimum(np.sum(cum <= u, axis=1), B - 1)  # first column with cum > u

    return draw(negative_weights(sim_t2i)), draw(negative_weights(sim_i2t))


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


def _cat(*arrays):
    return np.concatenate(arrays, axis=0)


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
    feats = _features(model, images, image_features)  # (B, 1+P, Dv); no cache: frozen
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
            neg_image_idx, neg_text_idx = sample_negatives(sim_i2t, sim_i2t.T, rng)
        else:
            neg_image_idx, neg_text_idx = (np.asarray(n) for n in negatives)
            for name, n in (("neg_image_idx", neg_image_idx), ("neg_text_idx", neg_text_idx)):
                if n.shape != (B,) or not np.issubdtype(n.dtype, np.integer) \
                        or n.min() < 0 or n.max() >= B:
                    raise ValueError(f"stage1_step: {name} must be {B} integer indices in "
                                     f"[0, {B}), got {n!r}")
        # rows: (text b, image b), (text b, its negative image), (negative text, image b)
        ids_all = _cat(ids, ids, ids[neg_text_idx])  # texts  [pos, pos, neg]
        mask_all = _cat(mask, mask, mask[neg_text_idx])
        embeds_all = _cat(image_embeds, image_embeds[neg_image_idx], image_embeds)  # pos, neg, pos
        h_itm, c_itm = qf.forward(embeds_all, ids_all, mask_all, mode="itm", rng=rng)
        per_query, c_head = model.itm_head.forward(h_itm[:, :Q])  # (3B, Q, D) -> (3B, Q, 2)
        itm_logits = per_query.mean(axis=1)  # (3B, 2): averaged over the queries
        itm_labels = np.concatenate([np.ones(B, np.int64), np.zeros(2 * B, np.int64)])
        itm_ce = CrossEntropyLoss()
        losses["itm"], c_itm_ce = itm_ce.forward(itm_logits, itm_labels)

    if w_itg != 0.0:
        dec_ids = ids.copy()
        dec_ids[:, 0] = dec_id  # blip2_qformer.py: decoder_input_ids[:, 0] = bos_token_id
        labels = np.where(mask.astype(bool), dec_ids, -100)  # padding is ignored
        h_itg, c_itg = qf.forward(image_embeds, dec_ids, mask, mode="itg", rng=rng)
        logits, c_lm = model.lm_head.forward(h_itg[:, Q:])  # text rows only -> (B, T, V)
        itg_ce = CrossEntropyLoss(label_smoothing=ls)
        losses["itg"], c_itg_ce = itg_ce.forward(logits[:, :-1], labels[:, 1:])  # predict t+1

    total = w_itc * losses["itc"] + w_itm * losses["itm"] + w_itg * losses["itg"]
    result = Stage1Result(float(total), losses, neg_image_idx, neg_text_idx, sim_i2t,
                          best_query, itm_logits)
    if not backward:
        return result

    # ---------------- backward (the forward read bottom-up) ----------------
    d_embeds = np.zeros_like(image_embeds)
    if w_itg != 0.0:
        dlogits = np.zeros_like(logits)
        dlogits[:, :-1] = itg_ce.backward(w_itg, c_itg_ce)  # undoes the shift
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
# The frozen image encoder
# ---------------------------------------------------------------------------------------

@dataclass
class PretrainedVision:
    encoder: VisionTransformer   # blip.visual_encoder, the ViT to freeze
    blip: object                 # the whole minblip.blip.BLIP it came from
    source: str                  # "checkpoint <path>" or "BLIP run of N steps"
    train_config: object         # the minblip.train.TrainConfig of the BLIP run
    history: object | None       # its minblip.train.History (None from a checkpoint)
    seconds: float


def pretrained_vision(checkpoint=None, *, dataset: world.WorldDataset | None = None,
                      progress: bool = False, **overrides) -> PretrainedVision:
    """Where stage 1's frozen image encoder comes from.

    BLIP-2 freezes an image encoder trained elsewhere (EVA-CLIP ViT-g). minblip
    uses the ViT of a BLIP trained on the same synthetic world, either

    * ``checkpoint``: a file written by ``minblip.train.Trainer`` — the ViT of
      ``minblip.train.load_model(checkpoint)``; or
    * ``checkpoint=None``: a short BLIP run with ``minblip.train.Trainer`` on
      ``dataset`` (pass the dataset stage 1 will use, so the ViT never trains
      on its test images), configured by ``overrides`` of ``TrainConfig``
      fields (e.g. ``steps=150``). EVA-CLIP, BLIP-2's frozen encoder, was
      trained contrastively; ``loss_weights=(1, 0, 0)`` (ITC alone) is the
      closest analogue.
    """
    start = time.perf_counter()
    if checkpoint is not None:
        model, _, cfg = load_model(checkpoint)
        return PretrainedVision(model.visual_encoder, model, f"checkpoint {checkpoint}", cfg,
                                None, time.perf_counter() - start)
    if dataset is not None:
        overrides = {"image_size": dataset.image_size, "max_objects": dataset.max_objects,
                     "n_train": len(dataset.train), "seed": dataset.seed, **overrides}
    cfg = TrainConfig(**overrides)
    trainer = Trainer(cfg, dataset=dataset)
    trainer.run(progress=progress)
    return PretrainedVision(trainer.model.visual_encoder, trainer.model,
                            f"BLIP run of {cfg.steps} steps", cfg, trainer.history,
                            time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

@dataclass
class Stage1Config:
    """A stage-1 run: Q-Former sizes and optimisation. LAVIS
    ``pretrain_stage1.yaml`` uses AdamW (wd 0.05), lr 1e-4 -> 1e-5 with a
    linear-warmup cosine schedule, batch 100 per GPU."""

    seed: int = 0
    max_text_len: int = 20
    # Q-Former
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 256
    num_queries: int = 8
    cross_attention_freq: int = 2
    embed_dim: int = 32
    init_std: float = 0.02
    dropout: float = 0.0
    # optimisation
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    loss_weights: tuple = (1.0, 1.0, 1.0)

    def __post_init__(self):
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        if len(self.loss_weights) != 3:
            raise ValueError(f"loss_weights needs three numbers (ITC, ITM, ITG), "
                             f"got {self.loss_weights}")
        for name in ("steps", "batch_size", "max_text_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Stage1Config.{name} must be positive, got "
                                 f"{getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), "
                             f"got {self.warmup_steps}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_weights"] = list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Stage1Config":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown stage-1 options {unknown}")
        return cls(**d)

    def model_config(self, vocab_size: int, vision: ViTConfig) -> Blip2Config:
        q = QFormerConfig(vocab_size=vocab_size, width=self.width, depth=self.depth,
                          heads=self.heads, mlp_dim=self.mlp_dim, num_queries=self.num_queries,
                          cross_attention_freq=self.cross_attention_freq,
                          encoder_width=vision.width, max_positions=self.max_text_len,
                          dropout=self.dropout, init_std=self.init_std)
        return Blip2Config(qformer=q, vision=vision, embed_dim=self.embed_dim,
                           proj_init_std=self.init_std)


@dataclass
class Stage1History:
    step: list = field(default_factory=list)
    itc: list = field(default_factory=list)
    itm: list = field(default_factory=list)
    itg: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    temp: list = field(default_factory=list)


class Stage1Trainer:
    """Trains a :class:`Blip2Stage1` on the training split of a world dataset.

    The frozen encoder's features of every training image are computed once
    at the start (the encoder never changes, and runs in evaluation mode), so
    a step costs only the Q-Former. Each step draws ``batch_size`` distinct
    images with fresh captions, runs :func:`stage1_step`, clips the gradient
    norm and takes an AdamW step on a warmup-cosine schedule.
    """

    def __init__(self, cfg: Stage1Config, visual_encoder: VisionTransformer,
                 dataset: world.WorldDataset, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
        self.dataset = dataset
        model_cfg = cfg.model_config(self.tokenizer.vocab_size, visual_encoder.config)
        self.model = Blip2Stage1(model_cfg, np.random.default_rng([cfg.seed, 11]),
                                 visual_encoder=visual_encoder)
        self.optimizer = AdamW(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        pixels = preprocess(dataset.train.images, visual_encoder.config.image_size)
        self.train_features = self.model.frozen_features(pixels)  # (N, 1+P, Dv), once
        self.data_rng = np.random.default_rng([cfg.seed, 12])
        self.step_rng = np.random.default_rng([cfg.seed, 13])
        self.step = 0
        self.history = Stage1History()
        self.train_seconds = 0.0

    def sample_batch(self):
        split = self.dataset.train
        idx = self.data_rng.choice(len(split), self.cfg.batch_size, replace=False)
        captions = [world.describe(split.scenes[i], self.data_rng) for i in idx]
        ids, mask = self.tokenizer.encode(captions, max_length=self.cfg.max_text_len)
        return self.train_features[idx], ids, mask

    def train_step(self) -> dict:
        feats, ids, mask = self.sample_batch()
        # the optimiser's Param list, not the model: no walk of the module tree each step
        self.optimizer.zero_grad()
        result = stage1_step(self.model, None, ids, mask, image_features=feats,
                             dec_id=self.tokenizer.dec_id, rng=self.step_rng,
                             weights=self.cfg.loss_weights)
        grad_norm = clip_grad_norm(self.optimizer.params, self.cfg.grad_clip)
        lr = warmup_cosine_lr(self.step, self.cfg.steps, self.cfg.lr, self.cfg.warmup_steps,
                              min_lr=self.cfg.min_lr)
        self.optimizer.step(lr=lr)
        h = self.history
        h.step.append(self.step)
        for k in ("itc", "itm", "itg"):
            getattr(h, k).append(float(result.losses[k]))
        h.lr.append(lr)
        h.grad_norm.append(grad_norm)
        h.temp.append(float(self.model.temp.data))
        self.step += 1
        return result.losses

    def run(self, until: int | None = None, progress: bool = False) -> Stage1History:
        """Train until step ``until`` (default: the configured number of steps)."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=until, initial=self.step, desc="stage 1", unit="step")
        start = time.perf_counter()
        while self.step < until:
            losses = self.train_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        self.train_seconds += time.perf_counter() - start
        if bar is not None:
            bar.close()
        return self.history


# ---------------------------------------------------------------------------------------
# Evaluation and captioning
# ---------------------------------------------------------------------------------------

def retrieval_scores(model: Blip2Stage1, tokenizer: Tokenizer, captions, *, images=None,
                     image_features=None, k_test: int = 0):
    """Image-text scores of N images and their N captions (tokenized to at most
    the Q-Former's ``max_positions`` tokens).

    Returns (itc, reranked): ``itc`` (N, N) is the stage-1 similarity
    ``max_q`` cosine (no temperature; LAVIS ``compute_sim_matrix``);
    ``reranked`` is None for ``k_test=0``, else a pair (i2t, t2i) of (N, N)
    where each query's ``k_test`` best ITC candidates score ITM match logit
    (mean over queries) + ITC similarity and the rest -100.
    """
    feats = _features(model, images, image_features)
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


def retrieval_metrics(model: Blip2Stage1, tokenizer: Tokenizer, captions, *, images=None,
                      image_features=None, k_test: int = 0) -> dict:
    """Recall@1/5/10 for image->text and text->image retrieval with ITC
    (``itc_i2t``, ``itc_t2i``) and, for ``k_test > 0``, after ITM re-ranking
    (``i2t``, ``t2i``). Item i's right answer is item i. Re-ranking needs
    ``k_test >= 10``: with fewer candidates a right answer outside them (score
    -100, tied with every other non-candidate) would still count for recall@10."""
    if k_test and k_test < 10:
        raise ValueError(f"retrieval_metrics: k_test must be 0 (ITC only) or >= 10 for "
                         f"recall@10, got {k_test}")
    itc, reranked = retrieval_scores(model, tokenizer, captions, images=images,
                                     image_features=image_features, k_test=k_test)
    tables = {"itc_i2t": itc, "itc_t2i": itc.T}
    if reranked is not None:
        tables.update(i2t=reranked[0], t2i=reranked[1])
    return {f"{name}_recall@{k}": v for name, s in tables.items()
            for k, v in recall_at_k(s).items()}


class QFormerCaptioner:
    """Adapts a stage-1 model to ``minblip.generation.generate``.

    ``generate`` caches, per layer, keys and values of the image
    (``decoder.bert.image_kv``) and of the text so far
    (``decoder.forward_incremental``). For the Q-Former the "image" cache is
    the queries' self-attention keys and values: the text attends to them
    exactly as in ITG (LAVIS ``Blip2Qformer.generate`` starts from [DEC] with
    the queries as the prefix).
    """

    def __init__(self, model: Blip2Stage1):
        self.model = model
        self.bert = self  # generate() reads decoder.bert.image_kv, as a TextDecoder has it

    def image_kv(self, image_embeds):
        return self.model.qformer.query_kv(image_embeds)

    def forward_incremental(self, ids, past=None, image_kv=None, start: int = 0):
        h, present = self.model.qformer.forward_incremental(ids, image_kv, past, start)
        logits, _ = self.model.lm_head.forward(h)
        return logits, present


def generate_captions(model: Blip2Stage1, tokenizer: Tokenizer, *, images=None,
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
