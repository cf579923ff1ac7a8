"""Plausible wrong answers to the exercises, one or more per exercise.

Each entry is (exercise id, region, what is wrong, body). ``tests/test_exercises.py``
puts the body in place of that solution region (the exercise's other regions keep
their solution) and requires the exercise's checks — visible or hidden — to fail.
A region is named as in the registry (``path::Qualified.name``). Instructor-only:
the student version leaves this file out.
"""

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
    # 1.3 softmax backward (notebook)
    ("1.3", "notebooks/01_backprop_and_gradcheck.ipynb::softmax_backward",
     "the sum over the wrong axis", """
return p * (dp - np.sum(dp * p, axis=0, keepdims=True))
"""),
    ("1.3", "notebooks/01_backprop_and_gradcheck.ipynb::softmax_backward",
     "only the diagonal of the Jacobian", """
return p * dp
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
    # 3.2 patchify backward (notebook)
    ("3.2", "notebooks/03_vit_patch_embedding.ipynb::patchify_backward",
     "a reshape without the inverse transpose", """
return dpatches.reshape(dpatches.shape[0], -1, height, width)
"""),
    ("3.2", "notebooks/03_vit_patch_embedding.ipynb::patchify_backward",
     "patchify's transpose again instead of its inverse", """
B, _, K = dpatches.shape
C, gh, gw = K // (p * p), height // p, width // p
x = dpatches.reshape(B, gh, gw, C, p, p).transpose(0, 2, 4, 1, 3, 5)
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
    # 5.1 ITC forward and backward
    ("5.1", "minblip/blip.py::itc_forward",
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
    ("5.1", "minblip/blip.py::itc_forward",
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
    ("5.1", "minblip/blip.py::itc_backward",
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
    ("5.1", "minblip/blip.py::itc_backward",
     "forgets the second use of each feature matrix", """
(image_feat, text_feat, text_all, image_all, sim_i2t, sim_t2i, t, c_i2t, c_t2i,
 text_online, image_online) = cache["loss"]
ce = CrossEntropyLoss()
dlog_i2t = ce.backward(0.5 * dloss, c_i2t)
dlog_t2i = ce.backward(0.5 * dloss, c_t2i)
temp.grad += -(np.sum(dlog_i2t * sim_i2t) + np.sum(dlog_t2i * sim_t2i)) / (t * t)
return dlog_i2t / t @ text_all, dlog_t2i / t @ image_all
"""),
    ("5.1", "minblip/blip.py::itc_backward",
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
    ("6.1", "minblip/blip.py::hard_negative_weights",
     "masks the positive before the softmax", """
B = sim.shape[0]
s = sim[:, :B].astype(np.float64)
np.fill_diagonal(s, -np.inf)
return softmax(s) + 1e-4
"""),
    ("6.1", "minblip/blip.py::hard_negative_weights",
     "forgets the + 1e-4", """
B = sim.shape[0]
w = softmax(sim[:, :B].astype(np.float64))
np.fill_diagonal(w, 0.0)
return w
"""),
    ("6.1", "minblip/blip.py::hard_negative_weights",
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
]
