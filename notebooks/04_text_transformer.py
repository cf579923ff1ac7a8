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
# **Backward.** The LayerNorm and dropout backwards are derived in notebook 01 (section 8).
# What is new is where $\bar x$ goes:
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
# ### The backward of a residual, post-norm sub-block
#
# Each of the three sub-blocks has the same shape, $y = \mathrm{LN}(x + f(x))$ with
# $f$ = (sub-layer, then dropout). Write $s = x + f(x)$. Reading it bottom up:
#
# $$\bar s = J_{\mathrm{LN}}^\top\,\bar y \quad\text{(notebook 01, section 8)},\qquad
# \bar x = \underbrace{\bar s}_{\text{the residual path}}
# + \underbrace{J_f^\top\,\bar s}_{\text{through the sub-layer}} .$$
#
# $x$ is used twice (fan-out), so its gradient is the sum of the two paths. The dropout
# inside $f$ multiplies $\bar s$ by the forward's mask before the sub-layer's backward
# sees it. For the whole block, chain the three sub-blocks from the top:
#
# $$\begin{aligned}
# \bar s_3 &= J_{\mathrm{LN}_{ffn}}^\top\,\bar y, &
# \bar h_2 &= \bar s_3 + J_{\mathrm{FFN}}^\top\,(m_3 \odot \bar s_3),\\
# \bar s_2 &= J_{\mathrm{LN}_{ca}}^\top\,\bar h_2, &
# \bar h_1 &= \bar s_2 + J_{\mathrm{CA},h}^\top\,(m_2 \odot \bar s_2), \qquad
# \overline{\text{image}} = J_{\mathrm{CA},\text{image}}^\top\,(m_2 \odot \bar s_2),\\
# \bar s_1 &= J_{\mathrm{LN}_{sa}}^\top\,\bar h_1, &
# \bar x &= \bar s_1 + J_{\mathrm{SA}}^\top\,(m_1 \odot \bar s_1),
# \end{aligned}$$
#
# ($m_k$ the dropout masks scaled by $1/(1-p)$.) The cross-attention has two inputs,
# so its backward returns two gradients: one for the text stream, one for the image
# tokens, which the caller sums over the layers (every layer reads the same image).
# Self-attention's $J_{\mathrm{SA}}^\top$ already sums the query, key and value paths
# (notebook 02). In a post-norm block every path, the residual one included, passes
# through a LayerNorm's Jacobian; in the ViT's pre-norm block $y = x + f(\mathrm{LN}(x))$
# the residual path is the identity, $\bar x = \bar y + \dots$, which is one reason
# pre-norm stacks train deep without warmup tricks.
#
# The numeric check, on one sub-block with $f$ a `Linear`: first the formula above, then
# the same code without the residual path.

# %%
from minblip.layers import LayerNorm, Linear  # noqa: E402


class ResidualPostNorm(Module):
    """y = LN(x + W x): one post-norm sub-block; residual=False drops the residual path
    from the backward (a bug, to see the check catch it)."""

    def __init__(self, d, rng, residual=True):
        self.lin, self.ln, self.residual = Linear(d, d, rng, init_std=0.5), LayerNorm(d), residual

    def forward(self, x):
        f, c_lin = self.lin.forward(x)
        y, c_ln = self.ln.forward(x + f)  # s = x + f(x)
        return y, (c_lin, c_ln)

    def backward(self, dy, cache):
        c_lin, c_ln = cache
        ds = self.ln.backward(dy, c_ln)  # undoes y = LN(s)
        through_f = self.lin.backward(ds, c_lin)  # undoes f = W x
        return ds + through_f if self.residual else through_f  # x fanned out to s and f


x_r = np.random.default_rng(14).standard_normal((2, 3, 6))
good = check_layer(ResidualPostNorm(6, np.random.default_rng(15)), x_r)
print(f"with the residual path   : passed, max rel error {good.max_rel_err:.1e}")
broken = check_layer(ResidualPostNorm(6, np.random.default_rng(15), residual=False), x_r,
                     raise_on_fail=False)
print("without the residual path:", "passed" if broken.passed else "FAILED", "\n", broken)
assert not broken.passed

# %% [markdown]
# The whole block, `PostNormBlock`, with cross-attention and dropout on. A gradient check
# needs the same dropout masks in every forward (notebook 01, section 8), so the block
# runs with a generator of one fixed seed each time. Every Param of the three sub-blocks
# is checked, and both inputs, the text stream `input0` and the image tokens `input1`:

# %%
from minblip.transformer import PostNormBlock  # noqa: E402


class FixedDropout(Module):
    """Runs a block with a fresh generator of one seed: the same dropout masks every time."""

    def __init__(self, block, seed):
        self.block, self.seed = block, seed

    def forward(self, x, context):
        return self.block.forward(x, context=context, rng=np.random.default_rng(self.seed))

    def backward(self, dy, cache):
        return self.block.backward(dy, cache)


block = PostNormBlock(8, 2, 16, np.random.default_rng(16), dropout=0.1, cross_attention=True,
                      d_context=6, init_std=0.4)
text_stream = np.random.default_rng(17).standard_normal((2, 4, 8))
image_stream = np.random.default_rng(18).standard_normal((2, 3, 6))
print(check_layer(FixedDropout(block, 19), text_stream, image_stream))

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
print(f"time        : {1e3 * no_cache:.0f} ms without cache, {1e3 * cached:.0f} ms with cache "
      f"(speed-up {no_cache / cached:.1f}x)")

# %% [markdown]
# The clock gains less (the speed-up printed above) than the 15× fewer token passes: at
# this toy width most of a step's time is fixed per-call cost (Python, many small arrays),
# which the cache does not remove. The arithmetic, which the cache does remove, grows with the width, so at
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
# The same facts as a picture, drawn by `minblip.diagrams.draw_med` from these two
# objects: a box is green when its Params are held by both the encoder and the decoder,
# found by object identity exactly as above (build the pair with another sharing mode and
# the colours change). The encoder appears twice, in text mode (cross-attention skipped)
# and image-grounded; the decoder differs only in its self-attention.

# %%
from minblip import diagrams  # noqa: E402

fig = diagrams.draw_med(e_, d_)
plt.show()

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
# ## Graded exercises
#
# They come with checks. In the student version of the project (`python -m
# minblip.exercises student OUTDIR`) each solution is replaced by a stub that raises
# `NotImplementedError`; the check cell after each passes once your code is right, and
# `python -m minblip.exercises check 4.1,4.2` runs the same checks from a terminal and says
# what is wrong and where. You write each one in the cell below its description. **The graded file is this notebook, `04_text_transformer.ipynb`**, not
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


# %% [markdown]
# ### Exercise 4.2 · Capstone: the whole backward of a BERT layer with cross-attention
#
# **Goal.** Write `postnorm_block_backward(block, dy, cache)`: the backward of
# `PostNormBlock.forward` (`minblip/transformer.py`), BLIP's BERT layer, from its parts.
# `dy` is `(B, T, d)`; return `(dx, dcontext)`: the gradient of the text stream
# `(B, T, d)` and of the image tokens `(B, S, d_context)`, or `None` for `dcontext`
# when the forward ran without a context. Your block is then gradient-checked (with
# cross-attention and dropout on, and without a context), and finally **trained**: it
# replaces the layer of a tiny image-grounded decoder that must learn to name the
# colour and the shape it sees, through your cross-attention gradient. Like makemore's
# final exercise, every gradient of a real block is yours.
#
# **Hints.** The derivation is the one of section 4, read from the top. `cache["parts"]`
# holds, in forward order, `(c_sa, c_d1, c_ln1, c_ca, c_d2, c_ln2, c_ffn, c_d3, c_ln3)`:
# the caches of self-attention, its dropout, its LayerNorm; of cross-attention, its
# dropout, its LayerNorm (all three `None` without a context); of the feed-forward, its
# dropout, its LayerNorm. Every sub-module has its own backward (`block.ffn_ln.backward`,
# `block.drop.backward`, `block.cross_attn.backward`, ...); an attention's backward
# returns a pair `(d_input, d_context)`, with `None` as the second for self-attention.
# Do not call `block.backward` or `PostNormBlock.backward`: the check makes the package's
# version unavailable, and the point is to write it.

# %% nbgrader={"grade": false, "grade_id": "ex4_2_solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def postnorm_block_backward(block, dy, cache):
    """dy (B, T, d) -> (dx (B, T, d), dcontext (B, S, d_context) or None)."""
    ### BEGIN SOLUTION
    c_sa, c_d1, c_ln1, c_ca, c_d2, c_ln2, c_ffn, c_d3, c_ln3 = cache["parts"]
    ds3 = block.ffn_ln.backward(dy, c_ln3)  # undoes y = LN_ffn(h + drop(FFN(h)))
    dh = ds3 + block.ffn.backward(block.drop.backward(ds3, c_d3), c_ffn)  # h feeds both terms
    dcontext = None
    if c_ca is not None:  # undoes h = LN_ca(h1 + drop(CrossAttn(h1, context)))
        ds2 = block.cross_attn_ln.backward(dh, c_ln2)
        dh1, dcontext = block.cross_attn.backward(block.drop.backward(ds2, c_d2), c_ca)
        dh = ds2 + dh1
    ds1 = block.self_attn_ln.backward(dh, c_ln1)  # undoes h1 = LN_sa(x + drop(SelfAttn(x)))
    dx_attn, _ = block.self_attn.backward(block.drop.backward(ds1, c_d1), c_sa)
    return ds1 + dx_attn, dcontext
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex4_2_check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from contextlib import contextmanager  # noqa: E402

from minblip.transformer import PostNormBlock  # noqa: E402


class YourPostNormBlock(PostNormBlock):
    """PostNormBlock whose backward is your function."""

    def backward(self, dy, cache):
        return postnorm_block_backward(self, dy, cache)


@contextmanager
def package_block_backward_unavailable():
    """During the check, PostNormBlock.backward raises: the answer must not call it."""
    original = PostNormBlock.backward

    def unavailable(self, dy, cache):
        raise RuntimeError("Exercise 4.2: PostNormBlock.backward is unavailable in this check; "
                           "write the block's backward from its sub-modules' backwards")

    PostNormBlock.backward = unavailable
    try:
        yield
    finally:
        PostNormBlock.backward = original


class SeededBlock(Module):
    """Your block run with a fresh generator of one seed: the same dropout masks each time."""

    def __init__(self, block, seed):
        self.block, self.seed = block, seed

    def forward(self, x, context=None):
        return self.block.forward(x, context=context, rng=np.random.default_rng(self.seed))

    def backward(self, dy, cache):
        dx, dcontext = self.block.backward(dy, cache)
        return dx if dcontext is None else (dx, dcontext)


rng = np.random.default_rng(41)
with package_block_backward_unavailable():
    cross = YourPostNormBlock(8, 2, 12, rng, dropout=0.2, cross_attention=True, d_context=6,
                              init_std=0.4)
    print(check_layer(SeededBlock(cross, 42), rng.standard_normal((2, 5, 8)),
                      rng.standard_normal((2, 3, 6))))
    text_only = YourPostNormBlock(8, 2, 12, rng, dropout=0.2, init_std=0.4)
    print(check_layer(SeededBlock(text_only, 43), rng.standard_normal((3, 4, 8))))
    ### BEGIN HIDDEN TESTS
    assert check_layer(SeededBlock(cross, 44), rng.standard_normal((1, 2, 8)),
                       rng.standard_normal((1, 7, 6)), seed=45).passed
    no_context = cross.forward(rng.standard_normal((2, 3, 8)))  # a cross block run as text only
    dx, dcontext = postnorm_block_backward(cross, rng.standard_normal((2, 3, 8)), no_context[1])
    assert dcontext is None and dx.shape == (2, 3, 8)
    ### END HIDDEN TESTS

# %% [markdown]
# Now the block trains. A decoder of one `YourPostNormBlock` layer reads two "image
# tokens" (a one-hot colour and a one-hot shape, through a trainable projection, so the
# image gradient your function returns is used) and must write `[DEC] colour shape
# [SEP]`. The colour and the shape are only in the image: without a working
# cross-attention gradient it cannot get them right.

# %% nbgrader={"grade": true, "grade_id": "ex4_2_train", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
from minblip.layers import Linear  # noqa: E402
from minblip.objectives import NextTokenLoss  # noqa: E402
from minblip.optim import AdamW  # noqa: E402
from minblip.text import TextConfig, TextDecoder  # noqa: E402


def colour_shape_batch(colours, shapes):
    """Image features (B, 2, 8): token 0 one-hot colour (dims 0-3), token 1 one-hot shape
    (dims 4-7); ids (B, 4): [DEC]=1, colour word 3+c, shape word 7+s, [SEP]=2."""
    B = len(colours)
    feats = np.zeros((B, 2, 8), np.float32)
    feats[np.arange(B), 0, colours] = 1.0
    feats[np.arange(B), 1, 4 + shapes] = 1.0
    ids = np.stack([np.ones(B, int), 3 + colours, 7 + shapes, np.full(B, 2)], axis=1)
    return feats, ids


class TinyCaptioner(Module):
    def __init__(self, rng):
        cfg = TextConfig(vocab_size=11, width=16, depth=1, heads=2, mlp_dim=32, max_positions=4,
                         encoder_width=16, init_std=0.1)
        self.image_proj = Linear(8, 16, rng, init_std=0.5)
        self.decoder = TextDecoder(cfg, rng)
        for layer in self.decoder.bert.layers:
            layer.__class__ = YourPostNormBlock  # the same object, now with your backward


with package_block_backward_unavailable():
    model = TinyCaptioner(np.random.default_rng(46))
    opt, lm_loss, data = AdamW(model, lr=1e-2, weight_decay=0.0), NextTokenLoss(), \
        np.random.default_rng(47)
    losses = []
    for step in range(120):
        feats, ids = colour_shape_batch(data.integers(0, 4, 16), data.integers(0, 4, 16))
        model.zero_grad()
        image, c_img = model.image_proj.forward(feats)
        logits, c_dec = model.decoder.forward(ids, None, image)
        loss, c_loss = lm_loss.forward(logits, ids)
        d_image = model.decoder.backward(lm_loss.backward(1.0, c_loss), c_dec)  # your block
        model.image_proj.backward(d_image, c_img)
        opt.step()
        losses.append(loss)
    feats, ids = colour_shape_batch(np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4))
    logits, _ = model.decoder.forward(ids, None, model.image_proj.forward(feats)[0])
    accuracy = float(np.mean(logits[:, :-1].argmax(-1) == ids[:, 1:]))
print(f"loss: step 0 {losses[0]:.3f}, step 60 {losses[60]:.3f}, step 119 {losses[-1]:.4f}")
print(f"next-token accuracy on all 16 colour-shape images: {accuracy:.0%}")
assert losses[-1] < 0.05 and accuracy == 1.0, "your block does not learn to read the image"
