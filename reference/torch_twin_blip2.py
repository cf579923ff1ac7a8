"""A PyTorch twin of minblip's BLIP-2 stage-1 step, compared tensor by tensor.

The companion of ``torch_twin.py`` (BLIP) for ``minblip.blip2_stage1.stage1_step``:
the Q-Former and its stage-1 heads are written a second time in plain PyTorch,
following salesforce/LAVIS ``lavis/models/blip2_models/blip2_qformer.py``
``Blip2Qformer.forward`` and ``Qformer.py`` (``BertEmbeddings``, ``BertLayer``,
``BertModel.get_extended_attention_mask``, ``BertLMHeadModel``). Hugging Face
has no stage-1 model (its ``Blip2QFormerModel`` has neither the text path nor
ITG), so no HF module is used; autograd does every backward. Every parameter
carries its LAVIS checkpoint name (``Qformer.bert.encoder.layer.0.attention.
self.query.weight``, ...), so the printed table reads as LAVIS's state dict.

Both sides get the same weights, the same frozen image features, the same
batch and the ITM negatives minblip sampled; the twin runs

* ``ln_vision`` on the features (the frozen ViT itself is not part of a step);
* ITC: a query pass (cross-attending to the image) and a separate text pass,
  similarity = max over queries, both directions computed as LAVIS does
  (``sim_q2t`` and ``sim_t2q``), label smoothing 0.1, temperature not clamped;
* ITM: one pass over 3B pairs [pos, pos, neg texts] x [pos, neg, pos images],
  bidirectional, ``itm_head`` averaged over the query outputs;
* ITG: ``[DEC]`` + caption, label smoothing 0.1, in one of two formulations:
  ``itg="unilm"`` (minblip's: queries and text in one pass under the dense UniLM
  mask, the same work as minblip's step, used by the benchmark) or
  ``itg="cached"`` (LAVIS's: the text alone, attending to the query pass's
  cached keys and values, through which the gradient flows back into the query
  branch). Both must give minblip's gradients.

:class:`TwinTrainer` adds the rest of a stage-1 ``Trainer.train_step``:
``clip_grad_norm_`` and ``torch.optim.AdamW`` with minblip's decay rule (only
Linear weights decay) and its warmup-cosine schedule.

Run ``python reference/torch_twin_blip2.py`` (needs torch): the table of one
step, a summary per parameter group, then four trainer steps. The tests
``tests/test_torch_parity.py::test_blip2_twin_*`` assert the same.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minblip.blip2_stage1 import Blip2Config, Blip2Stage1, stage1_step
from minblip.objectives import blip2_negative_weights
from minblip.optim import AdamW, clip_grad_norm, warmup_cosine_lr
from minblip.qformer import QFormerConfig
from minblip.tokenizer import Tokenizer
from minblip.vit import ViTConfig
from torch_twin import TOLERANCES, _row, passes, print_table  # the BLIP twin's comparison table

WORDS = "a an the red blue green circle square triangle small large left right of picture".split()
CAPTIONS = ["a red circle", "a large blue square left of a green circle", "a small triangle",
            "the green circle right of a red square", "a picture of a blue triangle"]


def _container(**children) -> nn.Module:
    """An empty module holding ``children`` under their names: LAVIS's nesting
    (``attention.self.query``, ``cls.predictions.transform``) without its classes."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


# ---------------------------------------------------------------------------------------
# The Q-Former (LAVIS Qformer.py)
# ---------------------------------------------------------------------------------------

class TwinAttention(nn.Module):
    """``BertAttention``: ``self`` (query, key, value) and ``output`` (dense,
    LayerNorm): LN(x + dense(softmax(q k^T / sqrt(dh) + mask) v))."""

    def __init__(self, d: int, heads: int, d_context: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = _container(query=nn.Linear(d, d), key=nn.Linear(d_context, d),
                               value=nn.Linear(d_context, d))
        self.output = _container(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps=eps))

    def split(self, x):  # (B, L, D) -> (B, H, L, dh)
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x, context=None, mask=None, past_kv=None):
        """x (B, T, D); context (B, S, Dc) for cross-attention; mask (B, 1, T, S)
        bool (True = may attend) or None; past_kv: (k, v) each (B, H, P, dh)
        prepended to the keys and values. Returns (out (B, T, D), (k, v))."""
        source = x if context is None else context
        q = self.split(self.self.query(x))
        k, v = self.split(self.self.key(source)), self.split(self.self.value(source))
        present = (k, v)  # use_cache: this pass's own keys and values
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)  # (B, T, D)
        return self.output.LayerNorm(x + self.output.dense(ctx)), present


class TwinLayer(nn.Module):
    """``BertLayer`` of the Q-Former: shared self-attention over queries and
    text; cross-attention to the image for the first ``query_length`` rows (if
    this layer has it); ``intermediate_query``/``output_query`` for the query
    rows and ``intermediate``/``output`` for the text rows."""

    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        d = cfg.width
        self.attention = TwinAttention(d, cfg.heads, d, cfg.eps)
        self.has_cross_attention = index % cfg.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = TwinAttention(d, cfg.heads, cfg.encoder_width, cfg.eps)
        for part in ("", "_query"):
            setattr(self, "intermediate" + part, _container(dense=nn.Linear(d, cfg.mlp_dim)))
            setattr(self, "output" + part, _container(dense=nn.Linear(cfg.mlp_dim, d),
                                                      LayerNorm=nn.LayerNorm(d, eps=cfg.eps)))

    @staticmethod
    def feed_forward(intermediate, output, h):  # BertIntermediate + BertOutput
        return output.LayerNorm(h + output.dense(F.gelu(intermediate.dense(h))))

    def forward(self, x, query_length: int, mask, image_embeds=None, past_kv=None):
        h, present = self.attention(x, mask=mask, past_kv=past_kv)
        parts = []
        if query_length:
            hq = h[:, :query_length]
            if self.has_cross_attention:
                hq, _ = self.crossattention(hq, context=image_embeds)
            parts.append(self.feed_forward(self.intermediate_query, self.output_query, hq))
        if h.shape[1] > query_length:
            parts.append(self.feed_forward(self.intermediate, self.output, h[:, query_length:]))
        return torch.cat(parts, dim=1), present


def extended_attention_mask(attention_mask, text_length: int, is_decoder: bool,
                            has_query: bool):
    """``Qformer.py BertModel.get_extended_attention_mask`` as a bool mask.

    attention_mask (B, L) of 0/1 over every key (cached queries, queries, text);
    the text is the last ``text_length`` positions. Encoder: padding only,
    (B, 1, 1, L). Decoder: causal over the text with the prefix columns
    (queries) visible to every row; with ``has_query`` (the queries are rows of
    this pass, UniLM style) the query rows see no text. Returns (B, 1, rows, L).
    """
    keys = attention_mask.bool()[:, None, None, :]
    if not is_decoder:
        return keys
    B, L = attention_mask.shape
    seq = torch.arange(text_length)
    causal = (seq[None, :] <= seq[:, None]).expand(B, text_length, text_length)
    prefix = L - text_length
    if prefix:
        if has_query:  # query rows: no text column
            causal = torch.cat([torch.zeros(B, prefix, text_length, dtype=torch.bool), causal],
                               dim=1)
        causal = torch.cat([torch.ones(B, causal.shape[1], prefix, dtype=torch.bool), causal],
                           dim=2)
    return causal[:, None] & keys


class TwinQformer(nn.Module):
    """LAVIS ``Blip2Qformer.Qformer`` (a ``BertLMHeadModel``): ``bert``
    (embeddings, encoder layers) and ``cls.predictions`` (the LM head, its
    decoder tied to the word embeddings)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        embeddings = _container(word_embeddings=nn.Embedding(cfg.vocab_size, d),
                                position_embeddings=nn.Embedding(cfg.max_positions, d),
                                LayerNorm=nn.LayerNorm(d, eps=cfg.eps))
        self.bert = _container(embeddings=embeddings, encoder=_container(
            layer=nn.ModuleList(TwinLayer(cfg, i) for i in range(cfg.depth))))
        transform = _container(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps=cfg.eps))
        self.cls = _container(predictions=_container(
            transform=transform, bias=nn.Parameter(torch.zeros(cfg.vocab_size))))

    def embed(self, input_ids=None, query_embeds=None):
        """``BertEmbeddings``: word + position (text positions from 0), the
        queries in front without a position, LayerNorm over both (dropout 0)."""
        e = self.bert.embeddings
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1])
            parts.append(e.word_embeddings(input_ids) + e.position_embeddings(positions))
        return e.LayerNorm(torch.cat(parts, dim=1))

    def encode(self, input_ids=None, query_embeds=None, attention_mask=None,
               image_embeds=None, is_decoder=False, past_key_values=None):
        """``BertModel.forward`` -> (hidden (B, L, D), per layer the self-attention
        (k, v)). attention_mask (B, [P +] Q + T) 0/1 covers the cached keys too."""
        h = self.embed(input_ids, query_embeds)
        B, L = h.shape[:2]
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long)
        text_length = 0 if input_ids is None else input_ids.shape[1]
        mask = extended_attention_mask(attention_mask, text_length, is_decoder,
                                       has_query=query_length > 0)
        presents = []
        for i, layer in enumerate(self.bert.encoder.layer):
            past = None if past_key_values is None else past_key_values[i]
            h, present = layer(h, query_length, mask, image_embeds, past)
            presents.append(present)
        return h, presents

    def lm_logits(self, h):
        """``BertLMPredictionHead``: transform (dense, GELU, LayerNorm), then the
        word embeddings transposed (tied ``decoder.weight``) + bias."""
        p = self.cls.predictions
        t = p.transform.LayerNorm(F.gelu(p.transform.dense(h)))
        return F.linear(t, self.bert.embeddings.word_embeddings.weight, p.bias)


# ---------------------------------------------------------------------------------------
# Stage 1 (LAVIS blip2_qformer.py Blip2Qformer)
# ---------------------------------------------------------------------------------------

class TwinBlip2Stage1(nn.Module):
    """minblip's :class:`~minblip.blip2_stage1.Blip2Stage1` without the frozen encoder:
    ``ln_vision``, ``query_tokens``, ``Qformer``, ``vision_proj``, ``text_proj``,
    ``itm_head``, ``temp``."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        q = cfg.qformer
        self.cfg = cfg
        self.ln_vision = nn.LayerNorm(cfg.vision.width, eps=cfg.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, q.num_queries, q.width))
        self.Qformer = TwinQformer(q)
        self.vision_proj = nn.Linear(q.width, cfg.embed_dim)
        self.text_proj = nn.Linear(q.width, cfg.embed_dim)
        self.itm_head = nn.Linear(q.width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))

    def step(self, image_features, ids, mask, neg_image_idx, neg_text_idx, *, dec_id: int,
             weights=(1.0, 1.0, 1.0), itg: str = "unilm"):
        """``Blip2Qformer.forward`` on frozen features (B, S, Dv) -> (total, losses,
        sim_i2t). A zero weight skips its objective, as minblip's step does."""
        if itg not in ("unilm", "cached"):
            raise ValueError(f"itg: expected 'unilm' or 'cached', got {itg!r}")
        w_itc, w_itm, w_itg = (float(w) for w in weights)
        ls = self.cfg.label_smoothing
        qf = self.Qformer
        B, Q = ids.shape[0], self.cfg.qformer.num_queries
        image_embeds = self.ln_vision(image_features)
        query_tokens = self.query_tokens.expand(B, -1, -1)
        query_atts = torch.ones(B, Q, dtype=mask.dtype)
        losses, sim_i2t = {}, None

        if w_itc or itg == "cached":
            query_output, query_kv = qf.encode(query_embeds=query_tokens,
                                               image_embeds=image_embeds)  # use_cache=True
        if w_itc:
            image_feats = F.normalize(self.vision_proj(query_output), dim=-1)  # (B, Q, E)
            text_output, _ = qf.encode(ids, attention_mask=mask)
            text_feat = F.normalize(self.text_proj(text_output[:, 0]), dim=-1)  # (B, E)
            # sim_q2t[i, t, q] = image_feats[i, q] . text_feat[t]; max over the queries
            sim_q2t = (image_feats.unsqueeze(1) @ text_feat.unsqueeze(-1)).squeeze(-1)
            sim_i2t = sim_q2t.max(dim=-1).values / self.temp
            # sim_t2q[t, i, q] = text_feat[t] . image_feats[i, q]
            sim_t2q = (text_feat[:, None, None, :] @ image_feats.permute(0, 2, 1)).squeeze(2)
            sim_t2i = sim_t2q.max(dim=-1).values / self.temp
            targets = torch.arange(B)
            losses["itc"] = (F.cross_entropy(sim_i2t, targets, label_smoothing=ls)
                             + F.cross_entropy(sim_t2i, targets, label_smoothing=ls)) / 2

        if w_itm and B >= 2:
            ids_all = torch.cat([ids, ids, ids[neg_text_idx]])  # texts [pos, pos, neg]
            mask_all = torch.cat([mask, mask, mask[neg_text_idx]])
            embeds_all = torch.cat([image_embeds, image_embeds[neg_image_idx], image_embeds])
            atts_all = torch.cat([torch.ones(3 * B, Q, dtype=mask.dtype), mask_all], dim=1)
            output_itm, _ = qf.encode(ids_all, query_embeds=self.query_tokens.expand(3 * B, -1, -1),
                                      attention_mask=atts_all, image_embeds=embeds_all)
            itm_logits = self.itm_head(output_itm[:, :Q]).mean(dim=1)  # (3B, 2)
            itm_labels = torch.cat([torch.ones(B, dtype=torch.long),
                                    torch.zeros(2 * B, dtype=torch.long)])
            losses["itm"] = F.cross_entropy(itm_logits, itm_labels)

        if w_itg:
            dec_ids = ids.clone()
            dec_ids[:, 0] = dec_id
            labels = dec_ids.masked_fill(dec_ids == self.cfg.qformer.pad_id, -100)
            attention_mask = torch.cat([query_atts, mask], dim=1)
            if itg == "cached":  # LAVIS: the text attends to the query pass's keys and values
                h, _ = qf.encode(dec_ids, attention_mask=attention_mask, is_decoder=True,
                                 past_key_values=query_kv)
            else:  # minblip: queries and text in one pass under the UniLM mask
                h, _ = qf.encode(dec_ids, query_embeds=query_tokens,
                                 attention_mask=attention_mask, image_embeds=image_embeds,
                                 is_decoder=True)
                h = h[:, Q:]  # BertLMHeadModel drops the query outputs
            logits = qf.lm_logits(h)  # (B, T, V)
            losses["itg"] = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                            label_smoothing=ls)

        total = sum(w * losses[k] for k, w in (("itc", w_itc), ("itm", w_itm), ("itg", w_itg))
                    if k in losses)
        return total, losses, sim_i2t


def lavis_params(model: Blip2Stage1) -> list[tuple[str, object, bool]]:
    """minblip's trainable Params under their LAVIS names: (name, Param,
    transposed). minblip stores a Linear's W as (in, out); PyTorch the transpose.
    Each Param appears once (the LM head's decoder is the word embedding)."""
    out = []

    def linear(name, lin):
        out.extend([(f"{name}.weight", lin.W, True), (f"{name}.bias", lin.b, False)])

    def norm(name, ln):
        out.extend([(f"{name}.weight", ln.gamma, False), (f"{name}.bias", ln.beta, False)])

    def attention(name, mha, ln):
        for part in ("query", "key", "value"):
            linear(f"{name}.self.{part}", getattr(mha, part))
        linear(f"{name}.output.dense", mha.out)
        norm(f"{name}.output.LayerNorm", ln)

    qf = model.qformer
    norm("ln_vision", model.ln_vision)
    out.append(("query_tokens", qf.query_tokens, False))
    e = "Qformer.bert.embeddings"
    out += [(f"{e}.word_embeddings.weight", qf.embeddings.word_embeddings.weight, False),
            (f"{e}.position_embeddings.weight", qf.embeddings.position_embeddings.weight, False)]
    norm(f"{e}.LayerNorm", qf.embeddings.layer_norm)
    for i, layer in enumerate(qf.layers):
        p = f"Qformer.bert.encoder.layer.{i}"
        attention(f"{p}.attention", layer.self_attn, layer.self_attn_ln)
        if layer.cross_attn is not None:
            attention(f"{p}.crossattention", layer.cross_attn, layer.cross_attn_ln)
        for part, ffn, ln in (("", layer.ffn, layer.ffn_ln),
                              ("_query", layer.ffn_query, layer.ffn_query_ln)):
            linear(f"{p}.intermediate{part}.dense", ffn.fc1)
            linear(f"{p}.output{part}.dense", ffn.fc2)
            norm(f"{p}.output{part}.LayerNorm", ln)
    linear("Qformer.cls.predictions.transform.dense", model.lm_head.dense)
    norm("Qformer.cls.predictions.transform.LayerNorm", model.lm_head.layer_norm)
    out.append(("Qformer.cls.predictions.bias", model.lm_head.bias, False))
    for name in ("vision_proj", "text_proj", "itm_head"):
        linear(name, getattr(model, name))
    out.append(("temp", model.temp, False))
    return out


def twin_of(model: Blip2Stage1, cfg: Blip2Config | None = None) -> TwinBlip2Stage1:
    """A TwinBlip2Stage1 holding ``model``'s trainable weights, in its dtype."""
    pairs = lavis_params(model)
    listed = [id(p) for _, p, _ in pairs]
    if len(set(listed)) != len(listed) or set(listed) != {id(p) for p in model.params()}:
        raise AssertionError("lavis_params does not list every trainable Param exactly once")
    torch_dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    twin = TwinBlip2Stage1(model.cfg if cfg is None else cfg).to(torch_dtype)
    state = {name: torch.from_numpy(np.ascontiguousarray(p.data.T if t else p.data))
             for name, p, t in pairs}
    twin.load_state_dict(state, strict=True)
    return twin


def decay_groups(twin: TwinBlip2Stage1, weight_decay: float) -> list[dict]:
    """minblip's rule (:func:`minblip.optim.decay_mask`) for ``torch.optim.AdamW``:
    the weights of ``nn.Linear`` modules decay; biases, norms, embeddings (also
    the tied LM decoder), the queries and the temperature do not."""
    linear_w = {id(m.weight) for m in twin.modules() if isinstance(m, nn.Linear)}
    params = list(twin.parameters())
    return [{"params": [p for p in params if id(p) in linear_w], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in linear_w], "weight_decay": 0.0}]


class TwinTrainer:
    """A stage-1 ``Trainer.train_step`` in PyTorch on a fixed batch: zero the
    gradients, the step, ``clip_grad_norm_``, the warmup-cosine learning rate,
    ``torch.optim.AdamW`` (betas 0.9, 0.999, eps 1e-8). Written without
    minblip's optimiser code, so the comparison checks that code too."""

    def __init__(self, twin: TwinBlip2Stage1, *, lr: float, min_lr: float, steps: int,
                 warmup_steps: int, weight_decay: float, grad_clip: float, dec_id: int,
                 weights=(1.0, 1.0, 1.0), itg: str = "unilm"):
        self.twin = twin
        self.params = list(twin.parameters())
        self.optimizer = torch.optim.AdamW(decay_groups(twin, weight_decay), lr=lr,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.lr, self.min_lr, self.steps, self.warmup_steps = lr, min_lr, steps, warmup_steps
        self.grad_clip = grad_clip
        self.kw = dict(dec_id=dec_id, weights=weights, itg=itg)
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup from 0 to ``lr``, then half a cosine down to ``min_lr`` at
        ``steps`` (LAVIS ``warmup_lr_schedule`` + ``cosine_lr_schedule``, per step)."""
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.steps - self.warmup_steps)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def train_step(self, image_features, ids, mask, neg_image_idx, neg_text_idx):
        """One step on torch tensors -> (total loss tensor, losses, grad norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        total, losses, _ = self.twin.step(image_features, ids, mask, neg_image_idx,
                                          neg_text_idx, **self.kw)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step_count += 1
        return total, losses, float(norm)


# ---------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------

def tiny_config(vocab_size: int, depth: int = 2, cross_attention_freq: int = 2) -> Blip2Config:
    """A stage-1 model small enough for a test: Q-Former width 16, 2 heads,
    4 queries; a 16x16 ViT with 8x8 patches (5 tokens of width 12)."""
    vision = ViTConfig(image_size=16, patch_size=8, width=12, depth=1, heads=2, mlp_dim=16)
    q = QFormerConfig(vocab_size=vocab_size, width=16, depth=depth, heads=2, mlp_dim=32,
                      num_queries=4, cross_attention_freq=cross_attention_freq,
                      encoder_width=12, max_positions=16)
    return Blip2Config(qformer=q, vision=vision, embed_dim=8)


def tiny_minblip(seed: int = 0, dtype=np.float64, depth: int = 2, cross_attention_freq: int = 2,
                 scale: float = 0.3):
    """A tiny minblip Blip2Stage1 with weights far from their init (so every
    gradient is well away from zero) and its tokenizer."""
    tok = Tokenizer(WORDS)
    rng = np.random.default_rng(seed)
    model = Blip2Stage1(tiny_config(tok.vocab_size, depth, cross_attention_freq), rng).to(dtype)
    for name, p in model.named_params():
        if name.endswith("gamma"):
            p.data[...] = 1.0 + 0.2 * rng.standard_normal(p.shape)
        elif name != "temp":
            p.data[...] = scale * rng.standard_normal(p.shape)
    return model, tok


def tiny_batch(model: Blip2Stage1, tok, seed: int = 0, batch: int = 4):
    """Frozen image features (B, 1+P, Dv) standing for the ViT's output, and
    tokenized captions (with padding)."""
    rng = np.random.default_rng([seed, 1])
    v = model.cfg.vision
    feats = rng.standard_normal((batch, 1 + (v.image_size // v.patch_size) ** 2, v.width))
    ids, mask = tok.encode(CAPTIONS[:batch], max_length=model.cfg.qformer.max_positions)
    return feats.astype(model.dtype), ids, mask


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def compare_step(model: Blip2Stage1, tok, seed: int = 0, batch: int = 4, itg: str = "unilm",
                 twin_cfg: Blip2Config | None = None):
    """One stage-1 step in both. Returns (rows, info): one row per loss, for the
    ITC logits and the negatives' sampling weights, and per parameter gradient
    (LAVIS name), each with max |torch|, the max absolute difference and their
    ratio. ``twin_cfg`` builds the twin from another config (to see a failure)."""
    feats, ids, mask = tiny_batch(model, tok, seed, batch)
    model.zero_grad()
    result = stage1_step(model, None, ids, mask, image_features=feats, dec_id=tok.dec_id,
                         rng=np.random.default_rng(seed))  # samples the negatives

    twin = twin_of(model, twin_cfg)
    total, losses, sim_i2t = twin.step(_t(feats), _t(ids), _t(mask), _t(result.neg_image_idx),
                                       _t(result.neg_text_idx), dec_id=tok.dec_id, itg=itg)
    total.backward()

    rows = [_row("loss", result.loss, total.item())]
    rows += [_row(f"loss_{k}", result.losses[k], v.item()) for k, v in losses.items()]
    rows.append(_row("ITC logits sim_i2t", result.sim_i2t, sim_i2t.detach().numpy()))
    with torch.no_grad():  # blip2_qformer.py: fill_diagonal_(-10000) before the softmax
        w = sim_i2t.t().clone().double()
        w.fill_diagonal_(-10000)
        w = torch.softmax(w, dim=1)
    rows.append(_row("negative weights t2i", blip2_negative_weights(result.sim_i2t.T),
                     w.numpy()))

    torch_params = dict(twin.named_parameters())
    pairs = lavis_params(model)
    for name, p, transposed in pairs:
        grad = torch_params[name].grad
        ref = np.zeros(p.shape[::-1] if transposed else p.shape) if grad is None else grad.numpy()
        rows.append(_row(name, p.grad.T if transposed else p.grad, ref))
    info = {"negatives": (result.neg_image_idx.tolist(), result.neg_text_idx.tolist()),
            "n_params": len(pairs), "itg": itg}
    return rows, info


def compare_training(model: Blip2Stage1, tok, steps: int = 4, seed: int = 0, batch: int = 4,
                     itg: str = "unilm", lr: float = 1e-2, grad_clip: float = 1.0):
    """``steps`` (>= 2) trainer steps in both (step, clipping, AdamW with weight
    decay 0.05, two warmup steps then the cosine down to lr / 10 at step
    ``steps + 1``), minblip's negatives passed to the twin at every step.
    Returns rows: each step's loss and gradient norm, then every parameter's
    total change (after - before).

    The attention key biases are left out of the changes: their gradient is
    zero in exact arithmetic (adding b to every key adds q.b to every score of a
    row, which the softmax ignores), so both sides hold rounding noise, which
    Adam's division by sqrt(v) turns into steps of +-lr in random directions.
    The outputs do not depend on them, so the other tensors still agree."""
    feats, ids, mask = tiny_batch(model, tok, seed, batch)
    twin = twin_of(model)
    sched = dict(lr=lr, min_lr=lr / 10, steps=steps + 1, warmup_steps=2, weight_decay=0.05,
                 grad_clip=grad_clip)
    trainer = TwinTrainer(twin, dec_id=tok.dec_id, itg=itg, **sched)
    optimizer = AdamW(model, lr=lr, weight_decay=0.05)
    pairs = [(n, p, t) for n, p, t in lavis_params(model) if ".self.key.bias" not in n]
    before = {n: p.data.copy() for n, p, _ in pairs}
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(steps):  # Trainer.train_step of the stage-1 task
        model.zero_grad()
        result = stage1_step(model, None, ids, mask, image_features=feats, dec_id=tok.dec_id,
                             rng=rng)
        norm = clip_grad_norm(model, grad_clip)
        optimizer.step(lr=warmup_cosine_lr(step, steps + 1, lr, 2, min_lr=lr / 10))
        total, _, tnorm = trainer.train_step(_t(feats), _t(ids), _t(mask),
                                             _t(result.neg_image_idx), _t(result.neg_text_idx))
        rows += [_row(f"step {step}: loss", result.loss, total.item()),
                 _row(f"step {step}: grad norm", norm, tnorm)]
    torch_params = dict(twin.named_parameters())
    for name, p, transposed in pairs:
        change = p.data - before[name]
        ref = torch_params[name].detach().numpy() - (before[name].T if transposed
                                                      else before[name])
        rows.append(_row(f"change {name}", change.T if transposed else change, ref))
    return rows


def group_of(name: str) -> str:
    """A parameter group for the summary: the layer and the sub-block of a
    Q-Former tensor (``layer 0 crossattention``), else the module."""
    name = name.removeprefix("change ")
    if name.startswith("Qformer.bert.encoder.layer."):
        i, block = name.split(".")[4:6]
        return f"layer {i} {block}"
    for prefix in ("Qformer.bert.embeddings", "Qformer.cls.predictions"):
        if name.startswith(prefix):
            return prefix
    return name.split(".")[0]


def group_summary(rows) -> list[tuple[str, float, float]]:
    """(group, worst relative difference, worst max |torch|) over the gradient
    rows, in order of first appearance; rows whose reference is below the
    float64 atol (rounding noise only) are left out of the relative figure."""
    atol = TOLERANCES["float64"][1]
    groups: dict[str, list] = {}
    for r in rows:
        if r["name"].startswith(("loss", "ITC", "negative", "step ")):
            continue
        g = groups.setdefault(group_of(r["name"]), [0.0, 0.0])
        if r["max_ref"] > atol:
            g[0] = max(g[0], r["rel"])
        g[1] = max(g[1], r["max_ref"])
    return [(name, rel, ref) for name, (rel, ref) in groups.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--itg", choices=["unilm", "cached"], default="unilm",
                        help="the twin's ITG formulation (minblip's one pass, or LAVIS's cache)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--cross-attention-freq", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=4,
                        help="also compare this many trainer steps (0: skip, else >= 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    dtype = np.dtype(args.dtype)
    model, tok = tiny_minblip(args.seed, dtype, args.depth, args.cross_attention_freq)
    rows, info = compare_step(model, tok, args.seed, itg=args.itg)
    print(f"minblip vs PyTorch twin, BLIP-2 stage 1, {args.dtype}, ITG {args.itg}, "
          f"{info['n_params']} parameter tensors, ITM negatives (image per text, text per "
          f"image) = {info['negatives']}")
    print_table(rows, args.dtype)
    print("\nworst relative difference per parameter group (gradients):")
    for name, rel, ref in group_summary(rows):
        print(f"  {name:<36} {rel:.2e}   (max|grad| {ref:.2e})")
    train_rows = []
    if args.train_steps:
        model, tok = tiny_minblip(args.seed, dtype, args.depth, args.cross_attention_freq)
        train_rows = compare_training(model, tok, args.train_steps, args.seed, itg=args.itg)
        print(f"\n{args.train_steps} trainer steps (clip_grad_norm_, AdamW with weight decay, "
              f"warmup-cosine lr); losses and gradient norms:")
        print_table([r for r in train_rows if r["name"].startswith("step ")], args.dtype)
        print("worst relative difference of the parameter changes per group (key biases left "
              "out, see compare_training):")
        for name, rel, ref in group_summary(train_rows):
            print(f"  {name:<36} {rel:.2e}   (max|change| {ref:.2e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "itg": args.itg, "seed": args.seed,
                       "torch": torch.__version__,
                       "tolerance": dict(zip(("rtol", "atol"), TOLERANCES[args.dtype])),
                       "rows": rows, "training_rows": train_rows}, f, indent=1)
    rtol, atol = TOLERANCES[args.dtype]
    every = rows + train_rows
    failed = [r["name"] for r in every if not passes(r, args.dtype)]
    worst = max(r["rel"] for r in rows if r["max_ref"] > atol)
    print(f"\nstep: worst relative difference {worst:.2e} over tensors with max|torch| > {atol:g};"
          f" {len(every) - len(failed)}/{len(every)} rows within rtol={rtol:g}, atol={atol:g}")
    if failed:
        print("FAILED: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
