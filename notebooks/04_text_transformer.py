# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The text transformer and its three masks
#
# **Goal.** BLIP reads and writes text with one BERT-style transformer that it runs in
# three different ways. In this notebook we build it from the pieces of notebooks 01-02:
#
# 1. turn captions into token ids with BLIP's special tokens `[CLS]`, `[ENC]`, `[DEC]`;
# 2. embed them the way BLIP's BERT does (word + position, no token type);
# 3. stack post-norm layers that can also attend to image tokens;
# 4. see the three uses of the same weights — and their three self-attention masks;
# 5. add the language-model head whose output matrix *is* the word-embedding matrix,
#    and derive where its gradient goes;
# 6. check every gradient, make generation cheap with cached keys and values, and count
#    what the encoder and the decoder share.
#
# ## 1. The paper's idea
#
# Li et al. (2022), *BLIP*, section 3.1, call the text side a **multimodal mixture of
# encoder-decoder (MED)**. It is one transformer with three functionalities:
#
# * **unimodal text encoder** — a plain BERT: bidirectional self-attention, the
#   sentence summarised by the output at `[CLS]`. Trained with the image-text
#   contrastive loss (ITC).
# * **image-grounded text encoder** — the same, plus a cross-attention sub-block
#   between self-attention and the feed-forward network in every layer, through which
#   the text reads the image tokens. The first token is `[ENC]`; its output decides
#   "does this text match this image?" (ITM).
# * **image-grounded text decoder** — the self-attention becomes **causal**, the
#   first token is `[DEC]`, and an LM head predicts the next word (LM loss, captioning).
#
# The decoder shares every weight with the encoder **except the self-attention
# sub-blocks**: encoding and decoding differ most in how tokens see each other, while
# the rest (embeddings, cross-attention, FFN) can serve both (paper section 3.2; the
# code is `tie_encoder_decoder_weights` in salesforce/BLIP `models/blip_pretrain.py`).

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import sys
from pathlib import Path

# this project's minblip (next to this notebook or in the folder above) comes first: the
# one you edit, and the one the checks test
sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]

from minblip.exercises.notebook import setup_exercises  # noqa: E402

setup_exercises()  # checks that; and an unfinished exercise stops a cell with a note, not an error

import inspect
import time

import matplotlib.pyplot as plt
import numpy as np

from minblip import Module, Param, check_layer, gradcheck
from minblip.text import (LMHead, TextConfig, TextDecoder, TextEmbeddings, TextTransformer,
                          build_med, parameter_count_table, self_attention_mask,
                          shared_parameter_names)
from minblip.tokenizer import Tokenizer

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 2. Tokens
#
# BLIP uses BERT's WordPiece vocabulary (30522 pieces) and adds `[DEC]` and `[ENC]`
# (`init_tokenizer` in `models/blip.py`), 30524 ids in all. Our synthetic world needs
# only a few dozen words, so minblip's `Tokenizer` maps whole words; everything else
# is kept: the six special tokens, the layout `[CLS] w1 .. wn [SEP] [PAD]..`, the
# attention mask, BERT's truncation and BLIP's caption cleaning (`pre_caption` in
# `data/utils.py`: lowercase, punctuation to spaces).

# %%
words = ("a an the red green blue yellow small big dog cat bird ball box on in under "
         "next to sits runs grass table picture of").split()
tok = Tokenizer(words)
print("special tokens:", {t: tok.token_to_id(t) for t in Tokenizer.SPECIAL_TOKENS})
print("vocab size    :", tok.vocab_size)
texts = ["A small red dog sits on the grass!", "A blue bird."]
print("cleaned       :", [tok.clean(t) for t in texts])
ids, mask = tok.encode(texts, max_length=12)
print("ids\n", ids)
print("attention_mask\n", mask)
print("decoded       :", tok.batch_decode(ids))

# %% [markdown]
# The tokenizer always writes `[CLS]` first. BLIP's model then **overwrites position 0**:
# with `[ENC]` for the image-grounded encoder (`blip_pretrain.py`, ITM) and with `[DEC]`
# for the decoder (LM). The unimodal encoder keeps `[CLS]`.

# %%
ids_enc, ids_dec = ids.copy(), ids.copy()
ids_enc[:, 0] = tok.enc_id
ids_dec[:, 0] = tok.dec_id
for name, x in (("text encoder (ITC)", ids), ("image-grounded encoder", ids_enc),
                ("decoder (LM)", ids_dec)):
    print(f"{name:24s}", tok.decode(x[1], skip_special_tokens=False))

# %% [markdown]
# ## 3. BERT embeddings: word + position, no token type
#
# BLIP's `BertEmbeddings` (`models/med.py`) has a word table $E \in \mathbb R^{V\times D}$
# and a position table $P \in \mathbb R^{T_\max\times D}$ — and, unlike the original
# BERT, **no token-type (segment) table**. For token $t$ of text $b$:
#
# $$x_{bt} = E_{\,\text{ids}_{bt}} + P_{\,s+t}, \qquad
# e_{bt} = \mathrm{LayerNorm}(x_{bt}), \qquad \text{then dropout.}$$
#
# The offset $s$ is 0 in training; during generation it is the number of tokens already
# processed (section 8). Shapes for our batch with a toy width $D = 16$:

# %%
cfg = TextConfig(vocab_size=tok.vocab_size, width=16, depth=2, heads=2, mlp_dim=32,
                 max_positions=16, encoder_width=12)
rng = np.random.default_rng(0)
emb = TextEmbeddings(cfg, rng)
e, _ = emb.forward(ids)
print("word table    ", emb.word_embeddings.weight.shape, "  (V, D)")
print("position table", emb.position_embeddings.weight.shape, "  (max_positions, D)")
print("ids", ids.shape, "-> embeddings", e.shape)
print("params:", [name for name, _ in emb.named_params()])
print("[PAD] row starts at zero (nn.Embedding padding_idx=0):",
      not emb.word_embeddings.weight.data[tok.pad_id].any())

# %% [markdown]
# **Backward.** The LayerNorm and dropout backwards are those of notebook 01. What is new
# is where $\bar x$ goes:
#
# * $P_{s+t}$ was added to every text in the batch (broadcast over $b$), so
#   $\bar P_{s+t} \mathrel{+}= \sum_b \bar x_{bt}$;
# * $E_v$ was gathered wherever $\text{ids}_{bt} = v$, so
#   $\bar E_v \mathrel{+}= \sum_{(b,t):\,\text{ids}_{bt}=v} \bar x_{bt}$ — a
#   scatter-add (`np.add.at`), because "a" appears many times in a batch.

# %%
print(inspect.getsource(TextEmbeddings.backward))

# %% [markdown]
# ## 4. The post-norm layer with cross-attention
#
# BLIP's `BertLayer` is post-norm: each sub-block adds its output to the residual
# stream and *then* normalises (the ViT of notebook 03 normalises *before*):
#
# $$\begin{aligned}
# h &= \mathrm{LN}_{sa}\big(x + \mathrm{SelfAttn}(x;\ M)\big)\\
# h &= \mathrm{LN}_{ca}\big(h + \mathrm{CrossAttn}(h,\ \text{image})\big)
#     &&\text{(skipped in text mode)}\\
# y &= \mathrm{LN}_{ffn}\big(h + W_2\,\mathrm{GELU}(W_1 h)\big)
# \end{aligned}$$
#
# $M$ is the self-attention mask — the only thing that differs between the three uses
# apart from the cross-attention switch. `TextTransformer` is the embeddings plus
# `depth` of these blocks (`minblip.transformer.PostNormBlock`). The cross-attention's
# keys and values are projections of the image tokens, whose width (`encoder_width`)
# is the ViT's, not the text's:

# %%
enc = TextTransformer(cfg, rng)
for name, p in enc.layers[0].named_params():
    if name.endswith(("W", "gamma")):
        print(f"layers.0.{name:22s} {p.shape}")

# %% [markdown]
# ## 5. Three functionalities, three masks
#
# A self-attention mask is a boolean $T\times T$ matrix per text: entry $(i, j)$ says
# whether query token $i$ may attend to key token $j$.
#
# * **Encoders** (unimodal and image-grounded): every token sees every *real* token;
#   padded keys are hidden. Same mask for both — the image-grounded encoder differs by
#   its cross-attention, not its self-attention.
# * **Decoder**: token $i$ sees real tokens $j \le i$ only (BERT's
#   `get_extended_attention_mask` with `is_decoder=True`), so the prediction of word
#   $i+1$ never peeks at it.
#
# The cross-attention mask (text × image tokens) is all ones in BLIP: every text token
# may look at every image token. Here are the masks for the padded second caption.

# %%
b = 1  # the padded text
labels = {"unimodal text encoder  (ITC)": (ids, False),
          "image-grounded encoder (ITM)": (ids_enc, False),
          "image-grounded decoder (LM)": (ids_dec, True)}
n_image = 5
fig, axes = plt.subplots(1, 4, figsize=(17, 4.6),
                         gridspec_kw={"width_ratios": [1, 1, 1, 0.55]})
for ax, (title, (x, causal)) in zip(axes, labels.items()):
    m = self_attention_mask(mask, causal=causal)[b]  # (T, T) bool
    names = [tok.id_to_token(i) for i in x[b]]
    ax.imshow(m, cmap="Blues", vmin=-0.3, vmax=1.2)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] else "grey")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"{title}\nself-attention", fontsize=10)
    ax.set_xlabel("key (attended to)")
axes[0].set_ylabel("query (attending)")
cross = np.ones((ids.shape[1], n_image), dtype=int)
axes[3].imshow(cross, cmap="Oranges", vmin=-0.3, vmax=1.2)
for i, j in np.ndindex(cross.shape):
    axes[3].text(j, i, 1, ha="center", va="center", fontsize=7, color="white")
axes[3].set_xticks(range(n_image), [f"img{s}" for s in range(n_image)], rotation=90, fontsize=8)
axes[3].set_yticks(range(ids.shape[1]), [tok.id_to_token(i) for i in ids_dec[b]], fontsize=8)
axes[3].set_title("cross-attention\n(ITM encoder and decoder;\nnone for ITC)", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# Which modules each functionality runs (with BLIP's sharing, section 9):
#
# | | first token | self-attention | SA mask | cross-attention | FFN | LM head | output used |
# |---|---|---|---|---|---|---|---|
# | unimodal text encoder | `[CLS]` | encoder's | padding | skipped (`mode='text'`) | shared | — | $h_0$ → `text_proj` (ITC) |
# | image-grounded encoder | `[ENC]` | encoder's | padding | shared | shared | — | $h_0$ → `itm_head` (ITM) |
# | image-grounded decoder | `[DEC]` | **decoder's own** | causal ∧ padding | shared | shared | tied to $E$ | logits (LM) |
#
# In code the three are three calls:

# %%
enc, dec = build_med(cfg, np.random.default_rng(1))
image_embeds = np.random.default_rng(2).standard_normal((2, n_image, cfg.encoder_width))
h_text, _ = enc.forward(ids, mask)  # mode='text'
h_itm, _ = enc.forward(ids_enc, mask, image_embeds)  # mode='multimodal'
logits, _ = dec.forward(ids_dec, mask, image_embeds)  # causal + multimodal + LM head
print("unimodal encoder      :", ids.shape, "->", h_text.shape, " use h[:, 0]")
print("image-grounded encoder:", ids_enc.shape, "+ image", image_embeds.shape, "->",
      h_itm.shape, " use h[:, 0]")
print("decoder               :", ids_dec.shape, "+ image", image_embeds.shape, "->",
      logits.shape, "(B, T, V)")

# %% [markdown]
# Two facts are worth checking rather than believing. Padding is invisible to the
# encoder: changing the id under a `[PAD]` leaves every real token's output exactly
# unchanged. And the decoder is causal: changing the last word changes nothing before it.

# %%
changed = ids_enc.copy()
changed[1, mask[1] == 0] = tok.token_to_id("dog")
h2, _ = enc.forward(changed, mask, image_embeds)
print("encoder, pad ids changed : max change on real tokens =",
      np.abs(h2 - h_itm)[mask == 1].max())
last = mask[0].sum() - 2  # the last word of text 0 (before [SEP])
changed = ids_dec.copy()
changed[0, last] = tok.token_to_id("cat")
lg2, _ = dec.forward(changed, mask, image_embeds)
print(f"decoder, word {last} changed: max change at positions < {last} =",
      np.abs(lg2 - logits)[0, :last].max(), "; at", last, "=",
      round(float(np.abs(lg2 - logits)[0, last].max()), 4))

# %% [markdown]
# ## 6. The LM head and the tied weight
#
# BERT's prediction head (`BertLMPredictionHead`) transforms each hidden state and then
# scores it against **every row of the word-embedding table**:
#
# $$t = \mathrm{LN}\big(\mathrm{GELU}(h W + b)\big), \qquad
# z = t\,E^\top + c, \qquad E \in \mathbb R^{V\times D},\ c \in \mathbb R^{V}.$$
#
# There is no separate output matrix: the head holds the same `Param` as the embedding
# lookup (Hugging Face's `tie_weights`). Given $\bar z$ of shape $(B, T, V)$:
#
# $$\bar c = \sum_{b,t} \bar z_{bt}, \qquad
# \bar E \mathrel{+}= \sum_{b,t} \bar z_{bt}^{\top}\, t_{bt}\ \ \big((V,N)\,@\,(N,D)\big),
# \qquad \bar t = \bar z\, E\ \ \big((B,T,V)\,@\,(V,D)\big),$$
#
# then back through LN, GELU and the dense layer into $\bar h$, through the layers, and
# finally into the lookup, which adds its scatter-add of section 3 **into the same
# $\bar E$**. The word table's gradient is therefore the sum of two terms: how each
# word should be *scored* (every row, from the head) and how each word should be
# *represented* (only the rows that were looked up). The `+=` of the core contract is
# what makes this work without any special code.

# %%
print(inspect.getsource(LMHead.backward))

# %% [markdown]
# Let us split the gradient of $E$ into its two parts and check they add up.

# %%
dec64 = TextDecoder(cfg, np.random.default_rng(3)).to(np.float64)
img64 = image_embeds.astype(np.float64)
R = np.random.default_rng(4).standard_normal((2, ids.shape[1], cfg.vocab_size))
E = dec64.head.weight
print("head weight is the word embedding Param:",
      E is dec64.bert.embeddings.word_embeddings.weight)
logits, (c_bert, c_head) = dec64.forward(ids_dec, mask, img64)
dec64.zero_grad()
dh = dec64.head.backward(R, c_head)
from_head = E.grad.copy()
dec64.zero_grad()
dec64.bert.backward(dh, c_bert)
from_lookup = E.grad.copy()
dec64.zero_grad()
dec64.backward(R, (c_bert, c_head))
print("rows with a nonzero head gradient  :", int((np.abs(from_head).sum(1) > 0).sum()),
      "of", cfg.vocab_size)
print("rows with a nonzero lookup gradient:", int((np.abs(from_lookup).sum(1) > 0).sum()),
      f"(the distinct ids in the batch: {len(np.unique(ids_dec))})")
print("max |E.grad - (head + lookup)|     :", np.abs(E.grad - from_head - from_lookup).max())

# %% [markdown]
# ## 7. Gradient checks
#
# Every Param is probed at 6 coordinates (the largest gradient and 5 random ones) by
# central differences in float64, plus one random direction through all Params at once
# (notebook 01). We enlarge the initialisation so that no gradient is tiny. First the
# decoder, in full: every row of the report is one Param, the tied word table appears
# once, and `input2` is the gradient of the image tokens.

# %%
big = TextConfig(vocab_size=tok.vocab_size, width=8, depth=2, heads=2, mlp_dim=12,
                 max_positions=16, encoder_width=6, init_std=0.4)
img_small = np.random.default_rng(5).standard_normal((2, 3, big.encoder_width))
report = check_layer(TextDecoder(big, np.random.default_rng(6)), ids_dec, mask, img_small,
                     verbose=True)

# %% [markdown]
# The key biases show a relative error of exactly 0: their gradient *is* zero. Adding
# one vector $b_k$ to every key adds the same number $q\cdot b_k$ to all of a query's
# scores, and the softmax ignores a constant shift (notebook 02). The finite difference
# agrees to within its rounding error, which the absolute tolerance absorbs.

# %% [markdown]
# And the transformer in the three modes, plus the embeddings with repeated ids:

# %%
cases = {"unimodal encoder (text mode)": ((ids, mask), {}),
         "image-grounded encoder": ((ids_enc, mask, img_small), {}),
         "causal, multimodal (decoder body)": ((ids_dec, mask, img_small), {"causal": True})}
for name, (inputs, kw) in cases.items():
    r = check_layer(TextTransformer(big, np.random.default_rng(7)), *inputs, forward_kwargs=kw)
    print(f"{name:36s} {len(r.rows):3d} arrays checked, max rel error {r.max_rel_err:.1e}")
r = check_layer(TextEmbeddings(big, np.random.default_rng(8)), ids_dec)
print(f"{'embeddings (repeated ids)':36s} {len(r.rows):3d} arrays checked, "
      f"max rel error {r.max_rel_err:.1e}")

# %% [markdown]
# ## 8. Generation with cached keys and values
#
# To caption an image the decoder runs once per new word. Recomputing the whole prefix
# each time costs $O(T^2)$ layer passes for $T$ words. But with a causal mask the
# hidden states of earlier tokens never change when a token is appended, so each layer's
# self-attention keys and values for them can be **kept** (`past_key_values` in
# `med.py`). A step then feeds only the new token, at position $s$ = number of cached
# tokens, and attends to `[past | new]`. The image's cross-attention keys and values do
# not depend on the text at all: `image_kv` projects them once per caption.
#
# The cached forward must give the same numbers as the full causal forward:

# %%
dec64 = TextDecoder(big, np.random.default_rng(9)).to(np.float64)
seq = ids_dec[:1, :8]  # one unpadded caption: generation batches are unpadded
img1 = img_small[:1]
full, _ = dec64.forward(seq, None, img1)
kv = dec64.image_kv(img1)  # per layer (k, v), each (B, H, S, dh)
past, steps = None, []
for t in range(seq.shape[1]):
    step, past = dec64.forward_incremental(seq[:, t:t + 1], past, image_kv=kv, start=t)
    steps.append(step)
print("cached (k, v) per layer:", past[0][0].shape, " = (B, H, tokens so far, dh)")
print("max |incremental - full| over all logits:",
      np.abs(np.concatenate(steps, axis=1) - full).max())

# %% [markdown]
# What the cache buys: without it, step $t$ reruns all $t$ tokens through every layer
# (and re-projects the image), $1 + 2 + \dots + T = T(T+1)/2$ token passes for $T$
# tokens; with it, step $t$ runs one token against $t$ cached keys, $T$ token passes.
# For BLIP's 30-token captions on minblip's default toy size (width 64, 17 image tokens):

# %%
gen_cfg = TextConfig(vocab_size=tok.vocab_size, max_positions=40)  # width 64, depth 2
gen = TextDecoder(gen_cfg, np.random.default_rng(10))
img_gen = np.random.default_rng(11).standard_normal((1, 17, gen_cfg.encoder_width))
n_tokens = 30
ids_gen = np.random.default_rng(12).integers(6, gen_cfg.vocab_size, (1, n_tokens))

t0 = time.perf_counter()
for t in range(1, n_tokens + 1):  # no cache: rerun the whole prefix every step
    gen.forward(ids_gen[:, :t], None, img_gen)
no_cache = time.perf_counter() - t0

t0 = time.perf_counter()
kv, past = gen.image_kv(img_gen), None
for t in range(n_tokens):  # cache: one new token per step
    _, past = gen.forward_incremental(ids_gen[:, t:t + 1], past, image_kv=kv, start=t)
cached = time.perf_counter() - t0
print(f"token passes: {n_tokens * (n_tokens + 1) // 2} without cache, {n_tokens} with cache")
print(f"time        : {1e3 * no_cache:.0f} ms without cache, {1e3 * cached:.0f} ms with cache")

# %% [markdown]
# The clock gains less than the 15× fewer token passes: at this toy width most of a
# step's time is fixed per-call cost (Python, many small arrays), which the cache does
# not remove. The arithmetic, which the cache does remove, grows with the width, so at
# BLIP's width 768 the saving is much closer to the ratio of token passes.

# %% [markdown]
# ## 9. What the encoder and decoder share
#
# `tie_encoder_decoder_weights(encoder, decoder.bert, '', '/attention')` walks the two
# BERTs in parallel and makes the encoder's weight *the same parameter object* as the
# decoder's for every module whose path does not contain `/attention`. The self-attention
# path is `.../layer/3/attention/...`, the cross-attention path is
# `.../layer/3/crossattention/...` (no slash before "attention"), so only self-attention
# stays separate. It is not a copy at initialisation: both networks keep updating one
# tensor, and its gradient is the sum of what the ITC, ITM and LM passes send it
# (BLIP issue #93 asks exactly this).
#
# `build_med` does the same with module objects. The three settings of the paper's
# ablation (Table 3):

# %%
for sharing in ("all_but_self_attention", "all", "none"):
    e_, d_ = build_med(cfg, np.random.default_rng(0), sharing)
    names = shared_parameter_names(e_, d_)
    print(f"{sharing:24s} {len(names):3d} shared Params, e.g. "
          f"{[n for n in names if n.startswith('layers.0')][:3] or '-'}")

e_, d_ = build_med(cfg, np.random.default_rng(0))
print("\nBLIP sharing, layer 0 of the decoder:")
for name in ("self_attn", "self_attn_ln", "cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
    same = getattr(d_.bert.layers[0], name) is getattr(e_.layers[0], name)
    print(f"  {name:14s} {'shared with the encoder' if same else 'decoder only'}")
print("  embeddings     ", "shared" if d_.bert.embeddings is e_.embeddings else "own")
print("  LM head output  is the encoder's word table:",
      d_.head.weight is e_.embeddings.word_embeddings.weight)

# %% [markdown]
# Counting each parameter once (`Module.params()` deduplicates by identity):

# %%
rows = parameter_count_table(cfg)
print(f"{'sharing':24s} {'encoder':>9s} {'decoder only':>13s} {'shared':>9s} {'total':>9s}")
for r in rows:
    print(f"{r['mode']:24s} {r['encoder_params']:9,d} {r['decoder_only_params']:13,d} "
          f"{r['shared_params']:9,d} {r['total_params']:9,d}")

# %% [markdown]
# With BLIP's sharing the decoder adds only its self-attention blocks and the LM head's
# transform and bias to the encoder. Sharing everything would save those too, but the
# paper found it hurts: one set of self-attention weights has to serve both
# bidirectional encoding and causal decoding.
#
# Finally, the gradient check of one loss that uses all three passes — a text-mode
# encoder pass, an image-grounded encoder pass and a decoder pass — through the shared
# weights and the shared image tokens:

# %%
e_, d_ = build_med(big, np.random.default_rng(12))
pair = Module()
pair.encoder, pair.decoder = e_, d_
pair.to(np.float64)
x_img = Param(img_small, dtype=np.float64)
g = np.random.default_rng(13)
R_txt, R_itm = g.standard_normal((2, ids.shape[1], 8)), g.standard_normal((2, ids.shape[1], 8))
R_lm = g.standard_normal((2, ids.shape[1], big.vocab_size))


def joint_loss(backward):
    h1, c1 = e_.forward(ids, mask)  # ITC-style pass
    h2, c2 = e_.forward(ids_enc, mask, x_img.data)  # ITM-style pass
    lg, c3 = d_.forward(ids_dec, mask, x_img.data)  # LM pass
    if backward:  # consumers first, then the shared producers
        x_img.grad += d_.backward(R_lm, c3)
        x_img.grad += e_.backward(R_itm, c2)
        e_.backward(R_txt, c1)
    return float(np.sum(h1 * R_txt) + np.sum(h2 * R_itm) + np.sum(lg * R_lm))


r = gradcheck(joint_loss, pair.named_params() + [("image_embeds", x_img)])
print(f"{len(r.rows)} arrays checked (each shared Param once), "
      f"max rel error {r.max_rel_err:.1e}, random direction {r.directional.max_rel_err:.1e}")

# %% [markdown]
# ## Summary
#
# * BLIP's text side is one BERT run three ways: `[CLS]` + padding mask (text encoder,
#   ITC), `[ENC]` + padding mask + cross-attention (image-grounded encoder, ITM), `[DEC]` +
#   causal ∧ padding mask + cross-attention + LM head (decoder, LM).
# * Embeddings are word + position → LayerNorm, no token type. Their backward is a sum
#   over the batch for positions and a scatter-add for words.
# * Layers are post-norm: $\mathrm{LN}(x + \mathrm{sublayer}(x))$ for self-attention,
#   cross-attention (skipped in text mode) and FFN.
# * The LM head scores against the word table itself, so $\bar E$ = head term (every
#   row) + lookup term (the rows used) — plus, with sharing, the encoder's lookups.
# * Cached keys and values make generation one token per step and give the same numbers
#   as the full causal forward.
# * The decoder holds the encoder's module objects for everything but self-attention;
#   sharing is identity, gradients add up, `params()` counts each once.
#
# ## Exercises
#
# 1. **BLIP base by formula.** Write the parameter count of the encoder, the decoder-only
#    part and the total as formulas in $V, D, L, F, T_\max, D_{img}$ (check them against
#    `parameter_count_table` on two toy configs). Then evaluate them for BLIP base
#    ($V$=30524, $D$=768, $L$=12, $F$=3072, $T_\max$=512, $D_{img}$=768). How many
#    parameters does BLIP's sharing save compared with "none"?
# 2. **`padding_idx`.** PyTorch's `nn.Embedding(padding_idx=0)` never updates the `[PAD]`
#    row from the lookup. Write a `TextEmbeddings` subclass that zeroes the lookup
#    gradient at `[PAD]` positions. Show that a gradient check with the loss
#    $\sum h \odot R$ now fails, and that for a loss that only reads real tokens of a
#    padded *decoder* batch (like the LM loss with pad targets ignored) nothing changes.
#    Why?
# 3. **BERT's additive mask.** Re-implement the decoder mask as BERT does,
#    $(1 - m)\cdot(-10000)$ added to the scores, on a copy of `ScaledDotProductAttention`.
#    How close are the hidden states to minblip's boolean mask in float32 and float64?
#    Which row of a causal ∧ padding mask would differ if `[DEC]` itself were masked?
# 4. **A cache with a bug.** Call `forward_incremental` with the right `past` but pass
#    every new token at position 0 (bypass the `start` check by editing a copy of the
#    method). How large is the difference from the full forward after 5 tokens, and
#    which embedding makes it?

# %% [markdown]
# ## Graded exercise
#
# It comes with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) the solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after it passes once your code is right, and
# `python -m minblip.exercises check 4.1` runs the same checks from a terminal and says
# what is wrong and where. You write a notebook exercise in the cell below its
# description. **The graded file is this notebook, `04_text_transformer.ipynb`**, not
# its jupytext twin `04_text_transformer.py`: if you edit the `.py`, run `jupytext
# --sync 04_text_transformer.py` before you check or hand in, or the checks still see
# the stub.
#
# ### Exercise 4.1 · Text embeddings backward, with repeated ids
#
# **Goal.** Write `text_embeddings_backward(ids, de, vocab_size, max_positions)` for the
# sum that `TextEmbeddings` normalises, $e_{bt} = W_{\mathrm{ids}_{bt}} + P_t$, with ids
# `(B, T)` and `de` `(B, T, D)`: return the gradients of the word table $W$
# `(vocab_size, D)` and of the position table $P$ `(max_positions, D)`.
#
# **Hints.** Two different reductions. A word id can occur many times in the batch: each
# occurrence adds its row (section 3; `np.add.at`, never `dW[ids] += de`). The position
# rows $0..T-1$ were broadcast over the batch: sum over it. Rows that were never read get
# zero.

# %% nbgrader={"grade": false, "grade_id": "ex4_1_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def text_embeddings_backward(ids, de, vocab_size, max_positions):
    """ids (B, T), de (B, T, D) -> (dword (vocab_size, D), dpos (max_positions, D))."""
    ### BEGIN SOLUTION
    B, T, D = de.shape
    dword = np.zeros((vocab_size, D))
    np.add.at(dword, ids.reshape(-1), de.reshape(-1, D))  # undoes W[ids]: repeated ids add up
    dpos = np.zeros((max_positions, D))
    dpos[:T] = de.sum(axis=0)  # undoes the broadcast of P[:T] over the batch
    return dword, dpos
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex4_1_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
rng = np.random.default_rng(40)
word = Param(rng.standard_normal((7, 3)), dtype=np.float64)
pos = Param(rng.standard_normal((6, 3)), dtype=np.float64)
ids = np.array([[1, 4, 4, 0], [4, 2, 1, 1]])  # 4 and 1 repeat
R = rng.standard_normal((2, 4, 3))


def embeddings_loss(backward):
    e = word.data[ids] + pos.data[:4]  # (B, T, D) + (T, D)
    if backward:
        dword, dpos = text_embeddings_backward(ids, R, 7, 6)
        word.grad += dword
        pos.grad += dpos
    return float(np.sum(e * R))


print(gradcheck(embeddings_loss, {"word": word, "pos": pos}))
