"""BLIP: the multimodal mixture of encoder-decoder and its three objectives.

One pretraining step, as in salesforce/BLIP ``models/blip_pretrain.py``
``BLIP_Pretrain.forward``:

* **ITC** (image-text contrastive): the unimodal text encoder ([CLS], no
  cross-attention) and the ViT's [CLS] are projected, L2-normalised and
  compared by cosine similarity divided by a learnable temperature;
  cross-entropy image-to-text and text-to-image.
* **ITM** (image-text matching): the image-grounded text encoder ([ENC] at
  position 0, cross-attention to the image) feeds a 2-way head; one hard
  negative image per text and one hard negative text per image, sampled from
  the ITC similarities.
* **LM** (captioning): the image-grounded decoder ([DEC] at position 0, causal)
  predicts the next word, with label smoothing 0.1.

The text encoder runs three times (ITC, ITM positives, ITM negatives) and the
decoder once; each call returns its own cache, and one backward pass adds every
contribution into the shared Params and the image features.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from .core import Module, Param, check_finite, check_float
from .layers import Linear
from .objectives import (NextTokenLoss, check_negatives, check_prompt_length,
                         hard_negative_weights, itc_backward, itc_forward, itm_labels,
                         sample_negatives)
from .softmax import CrossEntropyLoss, L2Normalize, softmax
from .text import SHARING_MODES, TextConfig, build_med
from .vit import ViTConfig, VisionTransformer


@dataclass
class BLIPConfig:
    """Sizes and constants of a BLIP model. Defaults are a tiny model for CPUs;
    salesforce/BLIP's base model is embed_dim 256 with ViT-B/16 and BERT-base."""

    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(vocab_size=64))
    embed_dim: int = 32          # ITC projection width (BLIP: 256)
    temp: float = 0.07           # initial ITC temperature (blip_pretrain.py: Parameter(0.07))
    temp_min: float = 0.001      # clamp range applied before every forward
    temp_max: float = 0.5
    sharing: str = "all_but_self_attention"
    label_smoothing: float = 0.1  # LM loss (med.py BertLMHeadModel: label_smoothing=0.1)
    proj_init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.sharing not in SHARING_MODES:
            raise ValueError(f"sharing must be one of {SHARING_MODES}, got {self.sharing!r}")
        if self.text.encoder_width != self.vision.width:
            raise ValueError(f"text.encoder_width ({self.text.encoder_width}) must equal the "
                             f"image width vision.width ({self.vision.width})")
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(f"temp {self.temp} outside [{self.temp_min}, {self.temp_max}]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BLIPConfig":
        return cls(**d)


class BLIP(Module):
    """ViT + MED (text encoder and decoder sharing all but self-attention) +
    ITC projections and temperature + ITM head."""

    def __init__(self, cfg: BLIPConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.visual_encoder = VisionTransformer(cfg.vision, rng)
        self.text_encoder, self.text_decoder = build_med(cfg.text, rng, cfg.sharing)
        self.vision_proj = Linear(cfg.vision.width, cfg.embed_dim, rng, init_std=cfg.proj_init_std)
        self.text_proj = Linear(cfg.text.width, cfg.embed_dim, rng, init_std=cfg.proj_init_std)
        self.itm_head = Linear(cfg.text.width, 2, rng, init_std=cfg.proj_init_std)
        self.temp = Param(cfg.temp)
        self.normalize = L2Normalize()

    def clamp_temperature(self) -> None:
        """blip_pretrain.py clamps temp to [0.001, 0.5] under no_grad at the start
        of every forward; a training step calls this before its forward."""
        np.clip(self.temp.data, self.cfg.temp_min, self.cfg.temp_max, out=self.temp.data)

    # ---- inference helpers (no caches kept) -------------------------------------------
    def encode_image(self, images):
        """images (B, 3, H, W) -> image_embeds (B, 1+N, Dv), image_feat (B, E) unit norm."""
        embeds, _ = self.visual_encoder.forward(images)
        feat, _ = self.vision_proj.forward(embeds[:, 0])
        return embeds, self.normalize.forward(feat)[0]

    def encode_text(self, ids, mask):
        """[CLS] ids (B, T), mask (B, T) -> text_feat (B, E) unit norm (unimodal encoder)."""
        h, _ = self.text_encoder.forward(ids, mask)
        feat, _ = self.text_proj.forward(h[:, 0])
        return self.normalize.forward(feat)[0]

    def itm_logits(self, image_embeds, ids, mask, enc_id: int):
        """Match logits (B, 2) of each image with its text; position 0 becomes [ENC]."""
        enc_ids = np.array(ids, copy=True)
        enc_ids[:, 0] = enc_id
        h, _ = self.text_encoder.forward(enc_ids, mask, image_embeds)
        return self.itm_head.forward(h[:, 0])[0]


# ---------------------------------------------------------------------------------------
# The pretraining step
# ---------------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float
    losses: dict            # "itc", "itm", "lm": floats (0.0 for a disabled objective)
    neg_image_idx: np.ndarray | None
    neg_text_idx: np.ndarray | None
    sim_i2t: np.ndarray | None  # ITC logits, for plots and for reproducing the negatives
    itm_logits: np.ndarray | None
    d_images: np.ndarray | None = None  # gradient of the loss w.r.t. the pixels (after backward)


def sample_hard_negatives(sim_i2t, sim_t2i, rng: np.random.Generator):
    """BLIP's ITM negatives: for each text a negative image drawn from the row of
    ``sim_t2i`` and for each image a negative text drawn from the row of
    ``sim_i2t`` (both (B, K >= B) ITC logits), weighted by
    :func:`~minblip.objectives.hard_negative_weights`. Returns (neg_image_idx,
    neg_text_idx), each (B,)."""
    return sample_negatives(hard_negative_weights(sim_t2i), hard_negative_weights(sim_i2t), rng)


def pretrain_step(model: BLIP, images, ids, mask, *, cls_id: int, enc_id: int, dec_id: int,
                  rng: np.random.Generator | None = None, negatives=None,
                  weights=(1.0, 1.0, 1.0), prompt_length: int = 0,
                  momentum=None, alpha: float = 0.0, backward: bool = True) -> StepResult:
    """One BLIP pretraining step: ITC + ITM + LM, then (if ``backward``) one
    mirrored backward that adds every gradient into the model's Params.

    images (B, 3, H, W) float; ids (B, T) "[CLS] words [SEP] [PAD]..." from the
    tokenizer; mask (B, T) 0/1. ``rng`` drives dropout and the ITM negatives;
    ``negatives=(neg_image_idx, neg_text_idx)`` fixes the negatives instead (the
    gradient check does this). ``weights`` scale (ITC, ITM, LM); a zero weight
    skips that objective entirely. ``prompt_length`` leading tokens (e.g.
    "[CLS] a picture of" = 4) are excluded from the LM loss. ``momentum`` is an
    optional :class:`MomentumDistillation` (BLIP's momentum encoders and queues)
    with soft-target weight ``alpha``. The caller zeroes gradients and clamps
    the temperature beforehand (``model.clamp_temperature()``).
    """
    check_finite(check_float(images, "images"), "images")
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    if ids.ndim != 2 or mask.shape != ids.shape or ids.shape[0] != images.shape[0]:
        raise ValueError(f"pretrain_step: expected ids and mask (B, T) with B = {images.shape[0]} "
                         f"images, got ids {ids.shape} and mask {mask.shape}")
    check_prompt_length(prompt_length, ids.shape[1], "pretrain_step")
    B = ids.shape[0]
    w_itc, w_itm, w_lm = weights
    use_itm = w_itm != 0.0 and B >= 2  # a batch of one has no negative to match against
    enc_ids = ids.copy()
    enc_ids[:, 0] = enc_id  # blip_pretrain.py: encoder_input_ids[:, 0] = enc_token_id
    dec_ids = ids.copy()
    dec_ids[:, 0] = dec_id  # blip_pretrain.py: decoder_input_ids[:, 0] = bos_token_id
    losses = {"itc": 0.0, "itm": 0.0, "lm": 0.0}

    # ---------------- forward ----------------
    image_embeds, c_vit = model.visual_encoder.forward(images, rng=rng)  # (B, 1+N, Dv)

    need_itc_features = w_itc != 0.0 or (use_itm and negatives is None)
    if need_itc_features:
        img_proj, c_vproj = model.vision_proj.forward(image_embeds[:, 0])   # (B, Dv) -> (B, E)
        image_feat, c_vnorm = model.normalize.forward(img_proj)
        text_h, c_text = model.text_encoder.forward(ids, mask, rng=rng)      # call 1: mode 'text'
        txt_proj, c_tproj = model.text_proj.forward(text_h[:, 0])
        text_feat, c_tnorm = model.normalize.forward(txt_proj)
        banks = {}
        if momentum is not None:
            banks = momentum.targets(model, images, ids, mask, alpha)
        loss_itc, c_itc = itc_forward(image_feat, text_feat, model.temp, **banks)
        losses["itc"] = loss_itc
        sim_i2t = c_itc["sim_i2t"]
    else:
        sim_i2t = None

    neg_image_idx = neg_text_idx = itm_logits = None
    if use_itm:
        if negatives is None:
            if rng is None:
                raise ValueError("pretrain_step: ITM needs rng or fixed negatives")
            neg_image_idx, neg_text_idx = sample_hard_negatives(c_itc["sim_i2t"],
                                                                c_itc["sim_t2i"], rng)
        else:
            neg_image_idx, neg_text_idx = check_negatives(negatives, B)
        h_pos, c_pos = model.text_encoder.forward(enc_ids, mask, image_embeds, rng=rng)  # call 2
        # rows B..2B: (text b, its negative image); rows 2B..3B: (negative text, image b)
        neg_ids = np.concatenate([enc_ids, enc_ids[neg_text_idx]])
        neg_mask = np.concatenate([mask, mask[neg_text_idx]])
        neg_images = np.concatenate([image_embeds[neg_image_idx], image_embeds])
        h_neg, c_neg = model.text_encoder.forward(neg_ids, neg_mask, neg_images, rng=rng)  # call 3
        vl = np.concatenate([h_pos[:, 0], h_neg[:, 0]])                     # (3B, D)
        itm_logits, c_head = model.itm_head.forward(vl)                      # (3B, 2)
        itm_ce = CrossEntropyLoss()
        losses["itm"], c_itm = itm_ce.forward(itm_logits, itm_labels(B))

    if w_lm != 0.0:
        labels = np.where(mask.astype(bool), ids, -100)  # padding is ignored
        labels[:, :prompt_length] = -100  # blip.py BLIP_Decoder: prompt tokens are not predicted
        logits, c_dec = model.text_decoder.forward(dec_ids, mask, image_embeds, rng=rng)
        lm_loss = NextTokenLoss(label_smoothing=model.cfg.label_smoothing)
        losses["lm"], c_lm = lm_loss.forward(logits, labels)  # token t+1 predicted from <= t

    total = w_itc * losses["itc"] + w_itm * losses["itm"] + w_lm * losses["lm"]
    result = StepResult(total, losses, neg_image_idx, neg_text_idx, sim_i2t, itm_logits)
    if not backward:
        return result

    # ---------------- backward (the forward read bottom-up) ----------------
    d_image_embeds = np.zeros_like(image_embeds)
    if w_lm != 0.0:
        dlogits = lm_loss.backward(w_lm, c_lm)  # (B, T, V); the last position predicts nothing
        d_image_embeds += model.text_decoder.backward(dlogits, c_dec)

    if use_itm:
        dvl = model.itm_head.backward(itm_ce.backward(w_itm, c_itm), c_head)
        dh_neg = np.zeros_like(h_neg)
        dh_neg[:, 0] = dvl[B:]  # only the [ENC] position feeds the head
        d_neg_images = model.text_encoder.backward(dh_neg, c_neg)
        # undoes neg_images[:B] = image_embeds[neg_image_idx] (Exercise 6.1)
        ### BEGIN SOLUTION
        np.add.at(d_image_embeds, neg_image_idx, d_neg_images[:B])  # an image can be picked twice
        ### END SOLUTION
        d_image_embeds += d_neg_images[B:]
        dh_pos = np.zeros_like(h_pos)
        dh_pos[:, 0] = dvl[:B]
        d_image_embeds += model.text_encoder.backward(dh_pos, c_pos)

    if w_itc != 0.0:
        d_image_feat, d_text_feat = itc_backward(w_itc, c_itc, model.temp)
        dtext_h = np.zeros_like(text_h)
        dtext_h[:, 0] = model.text_proj.backward(model.normalize.backward(d_text_feat, c_tnorm),
                                                 c_tproj)
        model.text_encoder.backward(dtext_h, c_text)  # text mode: no image gradient
        d_image_embeds[:, 0] += model.vision_proj.backward(
            model.normalize.backward(d_image_feat, c_vnorm), c_vproj)

    result.d_images = model.visual_encoder.backward(d_image_embeds, c_vit)
    return result


# ---------------------------------------------------------------------------------------
# Momentum distillation (optional)
# ---------------------------------------------------------------------------------------

class MomentumDistillation(Module):
    """BLIP's momentum encoders and feature queues (ALBEF style).

    Holds separate copies of the ViT, the text encoder and both projections,
    updated as p_m = m p_m + (1 - m) p after every optimiser step
    (``_momentum_update``); they receive no gradient. Queues of past momentum
    features widen the contrast set. Soft targets are
    alpha * softmax(momentum similarities) + (1 - alpha) * one-hot.

    It is a Module so a checkpoint can store it, but it is *not* part of
    ``BLIP.params()``: the optimiser never sees it.
    """

    def __init__(self, model: BLIP, queue_size: int, momentum: float = 0.995,
                 rng: np.random.Generator | None = None):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.momentum = momentum
        self.visual_encoder = copy.deepcopy(model.visual_encoder)
        self.vision_proj = copy.deepcopy(model.vision_proj)
        self.text_encoder = copy.deepcopy(model.text_encoder)
        self.text_proj = copy.deepcopy(model.text_proj)
        E = model.cfg.embed_dim
        rng = rng or np.random.default_rng(0)
        # blip_pretrain.py starts the queues as random unit vectors
        q = rng.standard_normal((2, queue_size, E))
        q /= np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        self.image_queue = Param(q[0], dtype=model.dtype)
        self.text_queue = Param(q[1], dtype=model.dtype)
        self.queue_ptr = 0

    def _param_pairs(self, model: BLIP):
        pairs = []
        for mine, theirs in ((self.visual_encoder, model.visual_encoder),
                             (self.vision_proj, model.vision_proj),
                             (self.text_encoder, model.text_encoder),
                             (self.text_proj, model.text_proj)):
            pairs += list(zip(mine.params(), theirs.params()))
        return pairs

    def update(self, model: BLIP) -> None:
        """p_m = m p_m + (1 - m) p for every momentum Param (``_momentum_update``)."""
        for pm, p in self._param_pairs(model):
            pm.data *= self.momentum
            pm.data += (1.0 - self.momentum) * p.data

    def features(self, images, ids, mask):
        emb, _ = self.visual_encoder.forward(images)
        img, _ = self.vision_proj.forward(emb[:, 0])
        h, _ = self.text_encoder.forward(ids, mask)
        txt, _ = self.text_proj.forward(h[:, 0])
        norm = L2Normalize()
        return norm.forward(img)[0], norm.forward(txt)[0]

    def targets(self, model: BLIP, images, ids, mask, alpha: float) -> dict:
        """As in ``BLIP_Pretrain.forward``: update the momentum encoders, compute
        the batch's momentum features, build the banks and soft targets for
        ``itc_forward``, then enqueue the features. This changes the state, so a
        step with momentum cannot be repeated exactly; the gradient checks test
        ``itc_forward`` with fixed banks instead."""
        self.update(model)
        image_m, text_m = self.features(images, ids, mask)
        image_bank = np.concatenate([image_m, self.image_queue.data], axis=0)  # (B + Q, E)
        text_bank = np.concatenate([text_m, self.text_queue.data], axis=0)
        t = model.temp.data
        onehot = np.eye(image_m.shape[0], image_bank.shape[0], dtype=image_bank.dtype)
        soft_i2t = alpha * softmax(image_m @ text_bank.T / t) + (1 - alpha) * onehot
        soft_t2i = alpha * softmax(text_m @ image_bank.T / t) + (1 - alpha) * onehot
        self.enqueue(image_m, text_m)
        return {"image_bank": image_bank, "text_bank": text_bank,
                "soft_i2t": soft_i2t, "soft_t2i": soft_t2i}

    def enqueue(self, image_m, text_m) -> None:
        """Write momentum features (B, E) into the queues (``_dequeue_and_enqueue``)."""
        Q, B = self.image_queue.shape[0], image_m.shape[0]
        if Q == 0:
            return
        if Q % B:
            raise ValueError(f"queue size {Q} must be a multiple of the batch size {B}")
        self.image_queue.data[self.queue_ptr:self.queue_ptr + B] = image_m
        self.text_queue.data[self.queue_ptr:self.queue_ptr + B] = text_m
        self.queue_ptr = (self.queue_ptr + B) % Q
