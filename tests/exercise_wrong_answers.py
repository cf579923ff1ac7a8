"""Plausible wrong answers to the exercises, one or more per exercise.

Each entry is (exercise id, region, what is wrong, body). ``tests/test_exercises.py``
puts the body in place of that solution region (the exercise's other regions keep
their solution) and requires the exercise's checks — visible or hidden — to fail.
A region is named as in the registry (``path::Qualified.name``). Instructor-only:
the student version leaves this file out.
"""

# The wrong answers of 2.3 and 4.2 differ from the solution in one step each: they are
# assembled from the steps they share.
_MHA = "notebooks/02_attention.ipynb::mha_forward"
_MHA_PROJECT = """source = x if context is None else context
B, T, D = x.shape
S, dh = source.shape[1], D // n_heads
q = (x @ weights["Wq"] + weights["bq"]).reshape(B, T, n_heads, dh).transpose(0, 2, 1, 3)
k = (source @ weights["Wk"] + weights["bk"]).reshape(B, S, n_heads, dh).transpose(0, 2, 1, 3)
v = (source @ weights["Wv"] + weights["bv"]).reshape(B, S, n_heads, dh).transpose(0, 2, 1, 3)
"""
_MHA_SCORES = "scores = q @ k.swapaxes(-1, -2) / np.sqrt(dh)\n"
_MHA_MASK = """if mask is not None:
    scores = np.where(np.asarray(mask, bool)[:, None], scores, -np.inf)
"""
_MHA_SOFTMAX = """row_max = scores.max(axis=-1, keepdims=True)
e = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
total = e.sum(axis=-1, keepdims=True)
p = e / np.where(total > 0, total, 1.0)
"""
_MHA_MERGE = """ctx = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
return ctx @ weights["Wo"] + weights["bo"]
"""
MHA_WRONG = [
    ("2.3", _MHA, "forgets the 1/sqrt(dh) scale",
     _MHA_PROJECT + "scores = q @ k.swapaxes(-1, -2)\n" + _MHA_MASK + _MHA_SOFTMAX + _MHA_MERGE),
    ("2.3", _MHA, "BERT's additive -10000: a fully masked row averages every value instead of none",
     _MHA_PROJECT + _MHA_SCORES + """if mask is not None:
    scores = scores + np.where(np.asarray(mask, bool)[:, None], 0.0, -10000.0)
""" + _MHA_SOFTMAX + _MHA_MERGE),
    ("2.3", _MHA, "splits the heads with a reshape alone: (B, T, D) -> (B, H, T, dh) mixes tokens",
     """source = x if context is None else context
B, T, D = x.shape
S, dh = source.shape[1], D // n_heads
q = (x @ weights["Wq"] + weights["bq"]).reshape(B, n_heads, T, dh)
k = (source @ weights["Wk"] + weights["bk"]).reshape(B, n_heads, S, dh)
v = (source @ weights["Wv"] + weights["bv"]).reshape(B, n_heads, S, dh)
""" + _MHA_SCORES + _MHA_MASK + _MHA_SOFTMAX + """ctx = (p @ v).reshape(B, T, D)
return ctx @ weights["Wo"] + weights["bo"]
"""),
    ("2.3", _MHA, "the softmax over the queries (axis -2) instead of the keys",
     _MHA_PROJECT + _MHA_SCORES + _MHA_MASK + _MHA_SOFTMAX.replace("axis=-1", "axis=-2")
     + _MHA_MERGE),
    ("2.3", _MHA, "a plain softmax: a fully masked row gives NaN",
     _MHA_PROJECT + _MHA_SCORES + _MHA_MASK + """e = np.exp(scores - scores.max(axis=-1, keepdims=True))
p = e / e.sum(axis=-1, keepdims=True)
""" + _MHA_MERGE),
    ("2.3", _MHA, "a shortcut: minblip's split_heads, merge_heads and softmax", """
from minblip.attention import merge_heads, split_heads
from minblip.softmax import softmax
source = x if context is None else context
q = split_heads(x @ weights["Wq"] + weights["bq"], n_heads)
k = split_heads(source @ weights["Wk"] + weights["bk"], n_heads)
v = split_heads(source @ weights["Wv"] + weights["bv"], n_heads)
scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
if mask is not None:
    scores = np.where(np.asarray(mask, bool)[:, None], scores, -1e30)
return merge_heads(softmax(scores, axis=-1) @ v) @ weights["Wo"] + weights["bo"]
"""),
    ("2.3", _MHA, "a shortcut: the check's own reference, built on minblip's attention", """
return reference_attention(x, context, mask, weights, n_heads)
"""),
]

_BLOCK = "notebooks/04_text_transformer.ipynb::postnorm_block_backward"
_BLOCK_FFN_LN = """c_sa, c_d1, c_ln1, c_ca, c_d2, c_ln2, c_ffn, c_d3, c_ln3 = cache["parts"]
ds3 = block.ffn_ln.backward(dy, c_ln3)
"""
_BLOCK_FFN = "dh = ds3 + block.ffn.backward(block.drop.backward(ds3, c_d3), c_ffn)\n"
_BLOCK_CROSS_AND_SELF = """dcontext = None
if c_ca is not None:
    ds2 = block.cross_attn_ln.backward(dh, c_ln2)
    dh1, dcontext = block.cross_attn.backward(block.drop.backward(ds2, c_d2), c_ca)
    dh = ds2 + dh1
ds1 = block.self_attn_ln.backward(dh, c_ln1)
dx_attn, _ = block.self_attn.backward(block.drop.backward(ds1, c_d1), c_sa)
"""
BLOCK_WRONG = [
    ("4.2", _BLOCK, "drops the residual path of the feed-forward sub-block",
     _BLOCK_FFN_LN + "dh = block.ffn.backward(block.drop.backward(ds3, c_d3), c_ffn)\n"
     + _BLOCK_CROSS_AND_SELF + "return ds1 + dx_attn, dcontext\n"),
    ("4.2", _BLOCK, "forgets the dropout masks in the backward",
     _BLOCK_FFN_LN + "dh = ds3 + block.ffn.backward(ds3, c_ffn)\n"
     + _BLOCK_CROSS_AND_SELF.replace("block.drop.backward(ds2, c_d2)", "ds2")
     .replace("block.drop.backward(ds1, c_d1)", "ds1") + "return ds1 + dx_attn, dcontext\n"),
    ("4.2", _BLOCK, "skips the cross-attention LayerNorm: feeds dh straight to the cross-attention",
     _BLOCK_FFN_LN + _BLOCK_FFN + """dcontext = None
if c_ca is not None:
    dh1, dcontext = block.cross_attn.backward(block.drop.backward(dh, c_d2), c_ca)
    dh = dh + dh1
ds1 = block.self_attn_ln.backward(dh, c_ln1)
dx_attn, _ = block.self_attn.backward(block.drop.backward(ds1, c_d1), c_sa)
return ds1 + dx_attn, dcontext
"""),
    ("4.2", _BLOCK, "returns the self-attention's gradient without the residual's",
     _BLOCK_FFN_LN + _BLOCK_FFN + _BLOCK_CROSS_AND_SELF + "return dx_attn, dcontext\n"),
    ("4.2", _BLOCK, "loses the image gradient: returns None for the context",
     _BLOCK_FFN_LN + _BLOCK_FFN + _BLOCK_CROSS_AND_SELF + "return ds1 + dx_attn, None\n"),
    ("4.2", _BLOCK, "a shortcut: calls the package's PostNormBlock.backward", """
return PostNormBlock.backward(block, dy, cache)
"""),
]


WRONG_ANSWERS = [
    # 1.1 softmax cross-entropy backward
    ("1.1", "minblip/softmax.py::CrossEntropyLoss.backward",
     "p - t: forgets the row mass, so an ignored row gets gradient p", """
logp, dist, valid, scale, shape = cache
return ((np.exp(logp) - dist) * (scale * dloss)).reshape(shape)
"""),
    ("1.1", "minblip/softmax.py::CrossEntropyLoss.backward",
     "forgets the upstream gradient dloss", """
logp, dist, valid, scale, shape = cache
row_mass = dist.sum(axis=-1, keepdims=True)
return ((np.exp(logp) * row_mass - dist) * scale).reshape(shape)
"""),
    ("1.1", "minblip/softmax.py::CrossEntropyLoss.backward",
     "a sum instead of a mean: no 1/N", """
logp, dist, valid, scale, shape = cache
row_mass = dist.sum(axis=-1, keepdims=True)
return ((np.exp(logp) * row_mass - dist) * dloss).reshape(shape)
"""),
    # 1.2 LayerNorm backward
    ("1.2", "minblip/layers.py::LayerNorm.backward",
     "= instead of += into gamma.grad and beta.grad", """
xhat, rstd = cache
lead = tuple(range(dy.ndim - 1))
self.gamma.grad = np.sum(dy * xhat, axis=lead)
self.beta.grad = np.sum(dy, axis=lead)
dxhat = dy * self.gamma.data
return rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
               - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
"""),
    ("1.2", "minblip/layers.py::LayerNorm.backward",
     "treats the mean and variance as constants", """
xhat, rstd = cache
lead = tuple(range(dy.ndim - 1))
self.gamma.grad += np.sum(dy * xhat, axis=lead)
self.beta.grad += np.sum(dy, axis=lead)
return rstd * dy * self.gamma.data
"""),
    ("1.2", "minblip/layers.py::LayerNorm.backward",
     "forgets the factor gamma on the way to x", """
xhat, rstd = cache
lead = tuple(range(dy.ndim - 1))
self.gamma.grad += np.sum(dy * xhat, axis=lead)
self.beta.grad += np.sum(dy, axis=lead)
return rstd * (dy - dy.mean(axis=-1, keepdims=True)
               - xhat * np.mean(dy * xhat, axis=-1, keepdims=True))
"""),
    # 1.3 softmax backward
    ("1.3", "minblip/softmax.py::Softmax.backward",
     "the sum over the wrong axis", """
p = cache
return p * (dp - np.sum(dp * p, axis=0, keepdims=True))
"""),
    ("1.3", "minblip/softmax.py::Softmax.backward",
     "only the diagonal of the Jacobian", """
return cache * dp
"""),
    ("1.3", "minblip/softmax.py::Softmax.backward",
     "always the last axis, whatever the layer's axis", """
p = cache
return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
"""),
    # 2.1 attention backward with a mask
    ("2.1", "minblip/attention.py::ScaledDotProductAttention.backward",
     "recomputes the weights from Q K^T and forgets the mask", """
q, k, v, p, p_drop, c_drop, scale = cache
s = (q @ k.swapaxes(-1, -2)) * scale
e = np.exp(s - s.max(axis=-1, keepdims=True))
p = e / e.sum(axis=-1, keepdims=True)
dv = p_drop.swapaxes(-1, -2) @ dout
dp = self.dropout.backward(dout @ v.swapaxes(-1, -2), c_drop)
dscores = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
return dscores @ k, dscores.swapaxes(-1, -2) @ q, dv
"""),
    ("2.1", "minblip/attention.py::ScaledDotProductAttention.backward",
     "softmax backward summed over the queries instead of the keys", """
q, k, v, p, p_drop, c_drop, scale = cache
dv = p_drop.swapaxes(-1, -2) @ dout
dp = self.dropout.backward(dout @ v.swapaxes(-1, -2), c_drop)
dscores = p * (dp - np.sum(dp * p, axis=-2, keepdims=True)) * scale
return dscores @ k, dscores.swapaxes(-1, -2) @ q, dv
"""),
    ("2.1", "minblip/attention.py::ScaledDotProductAttention.backward",
     "dV from the weights before dropout", """
q, k, v, p, p_drop, c_drop, scale = cache
dv = p.swapaxes(-1, -2) @ dout
dp = self.dropout.backward(dout @ v.swapaxes(-1, -2), c_drop)
dscores = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
return dscores @ k, dscores.swapaxes(-1, -2) @ q, dv
"""),
    ("2.1", "minblip/attention.py::ScaledDotProductAttention.backward",
     "forgets the 1/sqrt(dh) scale", """
q, k, v, p, p_drop, c_drop, scale = cache
dv = p_drop.swapaxes(-1, -2) @ dout
dp = self.dropout.backward(dout @ v.swapaxes(-1, -2), c_drop)
dscores = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
return dscores @ k, dscores.swapaxes(-1, -2) @ q, dv
"""),
    # 2.2 attention scores backward (notebook)
    ("2.2", "notebooks/02_attention.ipynb::scores_backward",
     "forgets the scale", """
return dscores @ k, dscores.swapaxes(-1, -2) @ q
"""),
    ("2.2", "notebooks/02_attention.ipynb::scores_backward",
     ".T on 4-d arrays reverses every axis", """
return scale * dscores @ k, scale * dscores.T @ q
"""),
    # 2.3 multi-head attention forward (notebook)
    *MHA_WRONG,
    # 3.1 patchify
    ("3.1", "minblip/vit.py::patchify",
     "a reshape without the transpose", """
return images.reshape(B, (H // p) * (W // p), C * p * p)
"""),
    ("3.1", "minblip/vit.py::patchify",
     "channels last inside a patch: (kh, kw, c) instead of (c, kh, kw)", """
gh, gw = H // p, W // p
x = images.reshape(B, C, gh, p, gw, p).transpose(0, 2, 4, 3, 5, 1)
return x.reshape(B, gh * gw, C * p * p)
"""),
    # 3.2 unpatchify
    ("3.2", "minblip/vit.py::unpatchify",
     "a reshape without the inverse transpose", """
return patches.reshape(patches.shape[0], -1, height, width)
"""),
    ("3.2", "minblip/vit.py::unpatchify",
     "patchify's transpose again instead of its inverse", """
B, _, K = patches.shape
C = K // (p * p)
x = patches.reshape(B, gh, gw, C, p, p).transpose(0, 2, 4, 1, 3, 5)
return x.reshape(B, C, height, width)
"""),
    # 4.1 text embeddings backward (notebook)
    ("4.1", "notebooks/04_text_transformer.ipynb::text_embeddings_backward",
     "dword[ids] += de keeps one of the repeated ids", """
B, T, D = de.shape
dword = np.zeros((vocab_size, D))
dword[ids] += de
dpos = np.zeros((max_positions, D))
dpos[:T] = de.sum(axis=0)
return dword, dpos
"""),
    ("4.1", "notebooks/04_text_transformer.ipynb::text_embeddings_backward",
     "the position gradient of the first sequence only", """
B, T, D = de.shape
dword = np.zeros((vocab_size, D))
np.add.at(dword, ids.reshape(-1), de.reshape(-1, D))
dpos = np.zeros((max_positions, D))
dpos[:T] = de[0]
return dword, dpos
"""),
    # 4.2 the capstone: the post-norm block's backward (notebook)
    *BLOCK_WRONG,
    # 5.1 ITC forward and backward
    ("5.1", "minblip/objectives.py::itc_forward",
     "text-to-image reads the rows of the image-to-text matrix (no transpose)", """
text_all = text_feat if text_bank is None else text_bank
image_all = image_feat if image_bank is None else image_bank
t = temp.data
sim_i2t = image_feat @ text_all.T
sim_t2i = image_feat @ text_all.T
ce = CrossEntropyLoss()
hard = np.arange(B)
loss_i2t, c_i2t = ce.forward(sim_i2t / t, hard if soft_i2t is None else soft_i2t)
loss_t2i, c_t2i = ce.forward(sim_t2i / t, hard if soft_t2i is None else soft_t2i)
loss = 0.5 * (loss_i2t + loss_t2i)
cache = (image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
         text_bank is None, image_bank is None)
return loss, {"loss": cache, "sim_i2t": sim_i2t / t, "sim_t2i": sim_t2i / t}
"""),
    ("5.1", "minblip/objectives.py::itc_forward",
     "forgets the temperature in the loss", """
text_all = text_feat if text_bank is None else text_bank
image_all = image_feat if image_bank is None else image_bank
t = temp.data
sim_i2t = image_feat @ text_all.T
sim_t2i = text_feat @ image_all.T
ce = CrossEntropyLoss()
hard = np.arange(B)
loss_i2t, c_i2t = ce.forward(sim_i2t, hard if soft_i2t is None else soft_i2t)
loss_t2i, c_t2i = ce.forward(sim_t2i, hard if soft_t2i is None else soft_t2i)
loss = 0.5 * (loss_i2t + loss_t2i)
cache = (image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
         text_bank is None, image_bank is None)
return loss, {"loss": cache, "sim_i2t": sim_i2t / t, "sim_t2i": sim_t2i / t}
"""),
    ("5.1", "minblip/objectives.py::itc_backward",
     "no gradient for the temperature", """
(image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
 text_online, image_online) = cache["loss"]
ce = CrossEntropyLoss()
dsim_i2t = ce.backward(0.5 * dloss, c_i2t) / t
dsim_t2i = ce.backward(0.5 * dloss, c_t2i) / t
d_image = dsim_i2t @ text_all
d_text = dsim_t2i @ image_all
if text_online:
    d_text += dsim_i2t.T @ image_feat
if image_online:
    d_image += dsim_t2i.T @ text_feat
return d_image, d_text
"""),
    ("5.1", "minblip/objectives.py::itc_backward",
     "forgets the second use of each feature matrix", """
(image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
 text_online, image_online) = cache["loss"]
ce = CrossEntropyLoss()
dlog_i2t = ce.backward(0.5 * dloss, c_i2t)
dlog_t2i = ce.backward(0.5 * dloss, c_t2i)
temp.grad += -(np.sum(dlog_i2t * sim_i2t) + np.sum(dlog_t2i * sim_t2i)) / (t * t)
return dlog_i2t / t @ text_all, dlog_t2i / t @ image_all
"""),
    ("5.1", "minblip/objectives.py::itc_backward",
     "the temperature gradient with the wrong sign", """
(image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
 text_online, image_online) = cache["loss"]
ce = CrossEntropyLoss()
dlog_i2t = ce.backward(0.5 * dloss, c_i2t)
dlog_t2i = ce.backward(0.5 * dloss, c_t2i)
temp.grad += (np.sum(dlog_i2t * sim_i2t) + np.sum(dlog_t2i * sim_t2i)) / (t * t)
dsim_i2t, dsim_t2i = dlog_i2t / t, dlog_t2i / t
d_image = dsim_i2t @ text_all
d_text = dsim_t2i @ image_all
if text_online:
    d_text += dsim_i2t.T @ image_feat
if image_online:
    d_image += dsim_t2i.T @ text_feat
return d_image, d_text
"""),
    # 5.2 L2 normalisation backward (notebook)
    ("5.2", "notebooks/05_itc.ipynb::l2_normalize_backward",
     "divides by the norm but keeps the component along y", """
return dy / np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
"""),
    ("5.2", "notebooks/05_itc.ipynb::l2_normalize_backward",
     "projects with x instead of the unit vector y", """
norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
return (dy - x * np.sum(x * dy, axis=-1, keepdims=True)) / norm
"""),
    # 6.1 hard negatives and the gather
    ("6.1", "minblip/objectives.py::hard_negative_weights",
     "masks the positive before the softmax", """
B = sim.shape[0]
s = sim[:, :B].astype(np.float64)
np.fill_diagonal(s, -np.inf)
return softmax(s) + 1e-4
"""),
    ("6.1", "minblip/objectives.py::hard_negative_weights",
     "forgets the + 1e-4", """
B = sim.shape[0]
w = softmax(sim[:, :B].astype(np.float64))
np.fill_diagonal(w, 0.0)
return w
"""),
    ("6.1", "minblip/objectives.py::hard_negative_weights",
     "a softmax over every column of the bank, not the batch", """
B = sim.shape[0]
w = softmax(sim.astype(np.float64))[:, :B] + 1e-4
np.fill_diagonal(w, 0.0)
return w
"""),
    ("6.1", "minblip/blip.py::pretrain_step",
     "d[idx] += g drops the second pick of image 0", """
d_image_embeds[neg_image_idx] += d_neg_images[:B]
"""),
    ("6.1", "minblip/blip.py::pretrain_step",
     "adds the negatives' gradient to the images in batch order", """
d_image_embeds += d_neg_images[:B]
"""),
    # 6.2 gather backward (notebook)
    ("6.2", "notebooks/06_itm_hard_negatives.ipynb::gather_rows_backward",
     "dx[index] += dgathered", """
dx = np.zeros((n_rows,) + dgathered.shape[1:])
dx[index] += dgathered
return dx
"""),
    # 7.1 nucleus filtering
    ("7.1", "minblip/generation.py::top_p_filter",
     "masks in sorted order and never scatters back", """
order = np.argsort(logits, axis=-1)
cum = np.cumsum(softmax(np.take_along_axis(logits, order, axis=-1)), axis=-1)
remove_sorted = cum <= 1.0 - top_p
remove_sorted[:, -1] = False
return np.where(remove_sorted, -np.inf, logits)
"""),
    ("7.1", "minblip/generation.py::top_p_filter",
     "keeps only tokens whose running mass stays within top_p (one too few)", """
order = np.argsort(-logits, axis=-1)
cum = np.cumsum(softmax(np.take_along_axis(logits, order, axis=-1)), axis=-1)
remove_sorted = cum > top_p
remove_sorted[:, 0] = False
remove = np.zeros_like(remove_sorted)
np.put_along_axis(remove, order, remove_sorted, axis=-1)
return np.where(remove, -np.inf, logits)
"""),
    ("7.1", "minblip/generation.py::top_p_filter",
     "the softmax over the wrong axis", """
order = np.argsort(logits, axis=-1)
cum = np.cumsum(softmax(np.take_along_axis(logits, order, axis=-1), axis=0), axis=-1)
remove_sorted = cum <= 1.0 - top_p
remove_sorted[:, -1] = False
remove = np.zeros_like(remove_sorted)
np.put_along_axis(remove, order, remove_sorted, axis=-1)
return np.where(remove, -np.inf, logits)
"""),
    # 7.2 tied output backward (notebook)
    ("7.2", "notebooks/07_lm_and_decoding.ipynb::tied_output_backward",
     "dE from the first sequence of the batch only", """
dE = dlogits[0].T @ t[0]
dbias = dlogits.reshape(-1, E.shape[0]).sum(axis=0)
return dlogits @ E, dE, dbias
"""),
    ("7.2", "notebooks/07_lm_and_decoding.ipynb::tied_output_backward",
     "the bias gradient as a mean", """
V, D = E.shape
dz = dlogits.reshape(-1, V)
return dlogits @ E, dz.T @ t.reshape(-1, D), dz.mean(axis=0)
"""),
    # 8.1 tying
    ("8.1", "minblip/text.py::build_med",
     "shares the self-attention too", """
bert.embeddings = encoder.embeddings
for enc_layer, dec_layer in zip(encoder.layers, bert.layers):
    for name in ("self_attn", "self_attn_ln", "cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
        setattr(dec_layer, name, getattr(enc_layer, name))
"""),
    ("8.1", "minblip/text.py::build_med",
     "forgets the embeddings", """
for enc_layer, dec_layer in zip(encoder.layers, bert.layers):
    for name in ("cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
        setattr(dec_layer, name, getattr(enc_layer, name))
"""),
    ("8.1", "minblip/text.py::build_med",
     "copies the modules instead of sharing them", """
import copy
bert.embeddings = copy.deepcopy(encoder.embeddings)
for enc_layer, dec_layer in zip(encoder.layers, bert.layers):
    for name in ("cross_attn", "cross_attn_ln", "ffn", "ffn_ln"):
        setattr(dec_layer, name, copy.deepcopy(getattr(enc_layer, name)))
"""),
    # 8.2 shared gradient (notebook)
    ("8.2", "notebooks/08_med_pretraining_step.ipynb::shared_ffn_step",
     "zeroes the gradient between the two backwards", """
y_enc, c_enc = ffn.forward(x_enc)
y_dec, c_dec = ffn.forward(x_dec)
loss = float(np.sum(y_enc * R_enc) + np.sum(y_dec * R_dec))
dx_dec = ffn.backward(R_dec, c_dec)
ffn.zero_grad()
dx_enc = ffn.backward(R_enc, c_enc)
return loss, dx_enc, dx_dec
"""),
    ("8.2", "notebooks/08_med_pretraining_step.ipynb::shared_ffn_step",
     "back-propagates the decoder's use only", """
y_enc, c_enc = ffn.forward(x_enc)
y_dec, c_dec = ffn.forward(x_dec)
loss = float(np.sum(y_enc * R_enc) + np.sum(y_dec * R_dec))
return loss, np.zeros_like(x_enc), ffn.backward(R_dec, c_dec)
"""),
    # 9.1 the Q-Former's three masks
    ("9.1", "minblip/qformer.py::qformer_mask",
     "ITG causal over the whole sequence: a query sees only the queries before it", """
B, T = valid.shape
key_ok = np.concatenate([np.ones((B, Q), dtype=bool), valid], axis=1)
mask = np.repeat(key_ok[:, None, :], Q + T, axis=1)
is_query = np.arange(Q + T) < Q
if mode in ("queries", "text", "itc"):
    mask &= is_query[:, None] == is_query[None, :]
elif mode == "itg":
    i = np.arange(Q + T)
    mask &= i[None, :] <= i[:, None]
return mask
"""),
    ("9.1", "minblip/qformer.py::qformer_mask",
     "ITG text rows do not see the queries", """
B, T = valid.shape
key_ok = np.concatenate([np.ones((B, Q), dtype=bool), valid], axis=1)
mask = np.repeat(key_ok[:, None, :], Q + T, axis=1)
is_query = np.arange(Q + T) < Q
if mode in ("queries", "text", "itc"):
    mask &= is_query[:, None] == is_query[None, :]
elif mode == "itg":
    i = np.arange(Q + T)
    mask &= (is_query[:, None] & is_query[None, :]) | (
        ~is_query[:, None] & ~is_query[None, :] & (i[None, :] <= i[:, None]))
return mask
"""),
    ("9.1", "minblip/qformer.py::qformer_mask",
     "padding masked as rows too (a [PAD] row sees nothing)", """
B, T = valid.shape
key_ok = np.concatenate([np.ones((B, Q), dtype=bool), valid], axis=1)
mask = key_ok[:, :, None] & key_ok[:, None, :]
is_query = np.arange(Q + T) < Q
if mode in ("queries", "text", "itc"):
    mask &= is_query[:, None] == is_query[None, :]
elif mode == "itg":
    i = np.arange(Q + T)
    mask &= is_query[None, :] | (~is_query[:, None] & (i[None, :] <= i[:, None]))
return mask
"""),
    ("9.1", "minblip/qformer.py::qformer_mask",
     "forgets the padding columns", """
B, T = valid.shape
mask = np.ones((B, Q + T, Q + T), dtype=bool)
is_query = np.arange(Q + T) < Q
if mode in ("queries", "text", "itc"):
    mask &= is_query[:, None] == is_query[None, :]
elif mode == "itg":
    i = np.arange(Q + T)
    mask &= is_query[None, :] | (~is_query[:, None] & (i[None, :] <= i[:, None]))
return mask
"""),
    # 9.2 the learned queries' gradient (notebook)
    ("9.2", "notebooks/09_qformer_masks.ipynb::queries_and_text_backward",
     "the queries' gradient of the first image only", """
return dx[:1, :num_queries], dx[:, num_queries:]
"""),
    ("9.2", "notebooks/09_qformer_masks.ipynb::queries_and_text_backward",
     "a mean over the batch instead of a sum", """
return dx[:, :num_queries].mean(axis=0, keepdims=True), dx[:, num_queries:]
"""),
    # 10.1 ITC with a maximum over the queries
    ("10.1", "minblip/objectives.py::itc_max_backward",
     "d[idx] += g: a query that wins two texts keeps one of them", """
image_feats, text_feat, best, sim, t, ce, c_i2t, c_t2i = cache["loss"]
B = sim.shape[0]
dlogits = ce.backward(0.5 * dloss, c_i2t) + ce.backward(0.5 * dloss, c_t2i).T
temp.grad += -np.sum(dlogits * sim) / (t * t)
dsim = dlogits / t
rows = np.broadcast_to(np.arange(B)[:, None], (B, B))
winners = image_feats[rows, best]
d_text = np.einsum("bc,bce->ce", dsim, winners)
d_image = np.zeros_like(image_feats)
d_image[rows, best] += dsim[..., None] * text_feat[None, :, :]
return d_image, d_text
"""),
    ("10.1", "minblip/objectives.py::itc_max_backward",
     "the text-to-image gradient not transposed back", """
image_feats, text_feat, best, sim, t, ce, c_i2t, c_t2i = cache["loss"]
B = sim.shape[0]
dlogits = ce.backward(0.5 * dloss, c_i2t) + ce.backward(0.5 * dloss, c_t2i)
temp.grad += -np.sum(dlogits * sim) / (t * t)
dsim = dlogits / t
rows = np.broadcast_to(np.arange(B)[:, None], (B, B))
winners = image_feats[rows, best]
d_text = np.einsum("bc,bce->ce", dsim, winners)
d_image = np.zeros_like(image_feats)
np.add.at(d_image, (rows, best), dsim[..., None] * text_feat[None, :, :])
return d_image, d_text
"""),
    ("10.1", "minblip/objectives.py::itc_max_backward",
     "spreads each pair's gradient evenly over the queries, as if the max were a mean", """
image_feats, text_feat, best, sim, t, ce, c_i2t, c_t2i = cache["loss"]
Q = image_feats.shape[1]
dlogits = ce.backward(0.5 * dloss, c_i2t) + ce.backward(0.5 * dloss, c_t2i).T
temp.grad += -np.sum(dlogits * sim) / (t * t)
dsim = dlogits / t
d_text = dsim.T @ image_feats.mean(axis=1)
d_image = np.repeat((dsim @ text_feat)[:, None, :] / Q, Q, axis=1)
return d_image, d_text
"""),
    ("10.1", "minblip/objectives.py::itc_max_backward",
     "forgets the upstream gradient dloss", """
image_feats, text_feat, best, sim, t, ce, c_i2t, c_t2i = cache["loss"]
B = sim.shape[0]
dlogits = ce.backward(0.5, c_i2t) + ce.backward(0.5, c_t2i).T
temp.grad += -np.sum(dlogits * sim) / (t * t)
dsim = dlogits / t
rows = np.broadcast_to(np.arange(B)[:, None], (B, B))
winners = image_feats[rows, best]
d_text = np.einsum("bc,bce->ce", dsim, winners)
d_image = np.zeros_like(image_feats)
np.add.at(d_image, (rows, best), dsim[..., None] * text_feat[None, :, :])
return d_image, d_text
"""),
    # 10.2 ITG inputs and targets (notebook)
    ("10.2", "notebooks/10_blip2_stage1.ipynb::itg_inputs",
     "writes [DEC] into the caller's ids (no copy)", """
dec_ids = ids
dec_ids[:, 0] = dec_id
labels = np.where(mask.astype(bool), dec_ids, -100)
targets = np.full_like(labels, -100)
targets[:, :-1] = labels[:, 1:]
return dec_ids, targets
"""),
    ("10.2", "notebooks/10_blip2_stage1.ipynb::itg_inputs",
     "no shift: each position labelled with its own token", """
dec_ids = ids.copy()
dec_ids[:, 0] = dec_id
return dec_ids, np.where(mask.astype(bool), dec_ids, -100)
"""),
    ("10.2", "notebooks/10_blip2_stage1.ipynb::itg_inputs",
     "padding left as a target", """
dec_ids = ids.copy()
dec_ids[:, 0] = dec_id
targets = np.full_like(dec_ids, -100)
targets[:, :-1] = dec_ids[:, 1:]
return dec_ids, targets
"""),
    # 11.1 masking the soft prompt out of the LM loss
    ("11.1", "minblip/objectives.py::causal_lm_targets",
     "the prompt's text tokens stay targets", """
targets = np.where(mask.astype(bool), ids, IGNORE_INDEX).astype(np.int64)
ignore = np.full((ids.shape[0], n_prefix), IGNORE_INDEX, dtype=np.int64)
return np.concatenate([ignore, targets], axis=1)
"""),
    ("11.1", "minblip/objectives.py::causal_lm_targets",
     "the ignored soft-prompt block put after the text", """
targets = np.where(mask.astype(bool), ids, IGNORE_INDEX).astype(np.int64)
targets[:, :prompt_length] = IGNORE_INDEX
ignore = np.full((ids.shape[0], n_prefix), IGNORE_INDEX, dtype=np.int64)
return np.concatenate([targets, ignore], axis=1)
"""),
    ("11.1", "minblip/objectives.py::causal_lm_targets",
     "off by one: hides BOS on top of the prompt_length tokens", """
targets = np.where(mask.astype(bool), ids, IGNORE_INDEX).astype(np.int64)
targets[:, :prompt_length + 1] = IGNORE_INDEX
ignore = np.full((ids.shape[0], n_prefix), IGNORE_INDEX, dtype=np.int64)
return np.concatenate([ignore, targets], axis=1)
"""),
    ("11.1", "minblip/objectives.py::causal_lm_targets",
     "padding left as a target", """
targets = ids.astype(np.int64)
targets[:, :prompt_length] = IGNORE_INDEX
ignore = np.full((ids.shape[0], n_prefix), IGNORE_INDEX, dtype=np.int64)
return np.concatenate([ignore, targets], axis=1)
"""),
    # 11.2 the soft prompt's projection backward (notebook)
    ("11.2", "notebooks/11_blip2_stage2.ipynb::soft_prompt_backward",
     "the gradient of the last Q positions (the text's) instead of the first Q", """
Q, Dq = q.shape[1], q.shape[2]
dprompt = dx[:, -Q:]
dW = q.reshape(-1, Dq).T @ dprompt.reshape(-1, dprompt.shape[-1])
return dprompt @ W.T, dW, dprompt.sum(axis=(0, 1))
"""),
    ("11.2", "notebooks/11_blip2_stage2.ipynb::soft_prompt_backward",
     "dW from the first image only", """
Q = q.shape[1]
dprompt = dx[:, :Q]
return dprompt @ W.T, q[0].T @ dprompt[0], dprompt.sum(axis=(0, 1))
"""),
    ("11.2", "notebooks/11_blip2_stage2.ipynb::soft_prompt_backward",
     "the bias gradient of the first image only", """
Q, Dq = q.shape[1], q.shape[2]
dprompt = dx[:, :Q]
dW = q.reshape(-1, Dq).T @ dprompt.reshape(-1, dprompt.shape[-1])
return dprompt @ W.T, dW, dprompt[0].sum(axis=0)
"""),
    # 12.1 the fused qkv weight
    ("12.1", "minblip/hf.py::fused_qkv_from_hf",
     "splits without transposing (the shapes still fit: every block is square)", """
return list(np.split(weight, 3, axis=0))
"""),
    ("12.1", "minblip/hf.py::fused_qkv_from_hf",
     "splits along the input columns", """
return [w.T for w in np.split(weight, 3, axis=1)]
"""),
    ("12.1", "minblip/hf.py::fused_qkv_to_hf",
     "stacks without transposing", """
return np.concatenate(list(weights), axis=0)
"""),
    ("12.1", "minblip/hf.py::fused_qkv_to_hf",
     "concatenates along the input axis: (D, 3D)", """
return np.concatenate(list(weights), axis=1)
"""),
    # 13.1 the CapFilt filter decision
    ("13.1", "minblip/capfilt.py::keep_mask",
     "keeps a text at exactly the threshold (>= instead of >)", """
return p >= threshold
"""),
    ("13.1", "minblip/capfilt.py::keep_mask",
     "keeps the texts the ITM head calls unmatched", """
return p <= threshold
"""),
    ("13.1", "minblip/capfilt.py::bootstrap_captions",
     "filters the web texts only, keeps every synthetic text", """
keep_web = keep_mask(p_web, threshold) if use_filter else np.ones(n, bool)
out = []
for i in range(n):
    texts = [web_texts[i]] if keep_web[i] else []
    if use_captioner:
        texts.append(synthetic_texts[i])
    out.append(texts)
return out
"""),
    ("13.1", "minblip/capfilt.py::bootstrap_captions",
     "the synthetic texts judged at the default threshold, not the one given", """
keep_web = keep_mask(p_web, threshold) if use_filter else np.ones(n, bool)
keep_syn = keep_mask(p_synthetic) if use_filter else np.ones(n, bool)
out = []
for i in range(n):
    texts = [web_texts[i]] if keep_web[i] else []
    if use_captioner and keep_syn[i]:
        texts.append(synthetic_texts[i])
    out.append(texts)
return out
"""),
    ("13.1", "minblip/capfilt.py::bootstrap_captions",
     "filters even when use_filter is False", """
keep_web = keep_mask(p_web, threshold)
keep_syn = keep_mask(p_synthetic, threshold)
out = []
for i in range(n):
    texts = [web_texts[i]] if keep_web[i] else []
    if use_captioner and keep_syn[i]:
        texts.append(synthetic_texts[i])
    out.append(texts)
return out
"""),
    # 13.2 p(match) from the ITM logits (notebook)
    ("13.2", "notebooks/13_capfilt.ipynb::match_probability_from_logits",
     "exp without subtracting the maximum: overflows", """
e = np.exp(logits)
return e[:, 1] / e.sum(axis=1)
"""),
    ("13.2", "notebooks/13_capfilt.ipynb::match_probability_from_logits",
     "the softmax over the batch axis", """
e = np.exp(logits - logits.max(axis=0, keepdims=True))
return (e / e.sum(axis=0, keepdims=True))[:, 1]
"""),
    ("13.2", "notebooks/13_capfilt.ipynb::match_probability_from_logits",
     "the probability of 'no match' (column 0)", """
e = np.exp(logits - logits.max(axis=1, keepdims=True))
return e[:, 0] / e.sum(axis=1)
"""),
    # 14.1 warmup + cosine (notebook)
    ("14.1", "notebooks/14_training.ipynb::warmup_cosine_schedule",
     "off by one in the warmup: (step + 1) / warmup_steps", """
if step < warmup_steps:
    return warmup_start_lr + (base_lr - warmup_start_lr) * (step + 1) / warmup_steps
progress = (step - warmup_steps) / (total_steps - warmup_steps)
return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
"""),
    ("14.1", "notebooks/14_training.ipynb::warmup_cosine_schedule",
     "the cosine runs over all steps, not the ones after the warmup", """
if step < warmup_steps:
    return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
"""),
    ("14.1", "notebooks/14_training.ipynb::warmup_cosine_schedule",
     "decays to zero, forgetting min_lr", """
if step < warmup_steps:
    return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
progress = (step - warmup_steps) / (total_steps - warmup_steps)
return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
"""),
    ("14.1", "notebooks/14_training.ipynb::warmup_cosine_schedule",
     "the warmup starts from zero, ignoring warmup_start_lr", """
if step < warmup_steps:
    return base_lr * step / warmup_steps
progress = (step - warmup_steps) / (total_steps - warmup_steps)
return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
"""),
    # 14.2 AdamW (notebook)
    ("14.2", "notebooks/14_training.ipynb::adamw_update",
     "L2 regularisation: the decay added to the gradient (Adam, not AdamW)", """
beta1, beta2 = betas
g = g + weight_decay * p
m[...] = beta1 * m + (1.0 - beta1) * g
v[...] = beta2 * v + (1.0 - beta2) * g * g
m_hat = m / (1.0 - beta1 ** t)
v_hat = v / (1.0 - beta2 ** t)
p -= lr * m_hat / (np.sqrt(v_hat) + eps)
"""),
    ("14.2", "notebooks/14_training.ipynb::adamw_update",
     "no bias correction", """
beta1, beta2 = betas
p *= 1.0 - lr * weight_decay
m[...] = beta1 * m + (1.0 - beta1) * g
v[...] = beta2 * v + (1.0 - beta2) * g * g
p -= lr * m / (np.sqrt(v) + eps)
"""),
    ("14.2", "notebooks/14_training.ipynb::adamw_update",
     "the decay without the learning rate: p *= 1 - weight_decay", """
beta1, beta2 = betas
p *= 1.0 - weight_decay
m[...] = beta1 * m + (1.0 - beta1) * g
v[...] = beta2 * v + (1.0 - beta2) * g * g
m_hat = m / (1.0 - beta1 ** t)
v_hat = v / (1.0 - beta2 ** t)
p -= lr * m_hat / (np.sqrt(v_hat) + eps)
"""),
    ("14.2", "notebooks/14_training.ipynb::adamw_update",
     "m = ... rebinds the name: the optimiser's moments never change", """
beta1, beta2 = betas
p *= 1.0 - lr * weight_decay
m = beta1 * m + (1.0 - beta1) * g
v = beta2 * v + (1.0 - beta2) * g * g
m_hat = m / (1.0 - beta1 ** t)
v_hat = v / (1.0 - beta2 ** t)
p -= lr * m_hat / (np.sqrt(v_hat) + eps)
"""),
]

# Shortcuts: answers that call the package's own version of the exercise. While the
# exercise is checked those functions are unavailable to the student's code.
SHORTCUTS = [
    ("5.2", "notebooks/05_itc.ipynb::l2_normalize_backward",
     "calls the package's L2Normalize.backward", """
from minblip.softmax import L2Normalize
layer = L2Normalize()
_, cache = layer.forward(x)
return layer.backward(dy, cache)
"""),
    ("14.1", "notebooks/14_training.ipynb::warmup_cosine_schedule",
     "calls minblip.optim.warmup_cosine_lr", """
from minblip import optim
return optim.warmup_cosine_lr(step, total_steps, base_lr, warmup_steps, min_lr=min_lr,
                              warmup_start_lr=warmup_start_lr)
"""),
    ("14.2", "notebooks/14_training.ipynb::adamw_update",
     "steps a minblip.optim.AdamW on the array", """
from minblip.core import Param
from minblip.optim import AdamW
param = Param(p.copy(), dtype=p.dtype)
opt = AdamW([("p", param)], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
opt.step_count, opt.m[0][...], opt.v[0][...] = t - 1, m, v
param.grad[...] = g
opt.step(lr=lr)
p[...], m[...], v[...] = param.data, opt.m[0], opt.v[0]
"""),
]
WRONG_ANSWERS += SHORTCUTS
