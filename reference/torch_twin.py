"""A PyTorch twin of minblip's BLIP pretraining step, compared tensor by tensor.

In the spirit of llm.c's ``train_gpt2.py``: the same model is written a second
time in PyTorch, from Hugging Face's BLIP modules, given the same weights and
the same batch, and one step of ITC + ITM + LM is run in both. The losses and
the gradient of every parameter (and of the pixels) must agree; a table shows
the largest difference per tensor.

The twin mirrors salesforce/BLIP ``models/blip_pretrain.py`` ``BLIP_Pretrain``
without momentum distillation (in-batch ITC, as minblip's step without a
``MomentumDistillation``):

* ``vision_model``: HF ``BlipVisionModel`` (the ViT, fused qkv);
* ``text_encoder``: HF ``BlipTextModel`` without pooler; ``text_decoder``: HF
  ``BlipTextLMHeadModel`` (LM head tied to its word embeddings);
* sharing: ``tie_encoder_decoder_weights(encoder, decoder.bert, '', '/attention')``
  re-implemented below: every module of the decoder's BERT whose path has no
  ``/attention`` lends its weight and bias Parameters to the encoder's twin
  module, so the gradients of both uses land in one tensor;
* ITC on [CLS] (text mode), ITM on [ENC] with the negatives minblip sampled,
  LM on [DEC] with label smoothing from the config (BLIP: 0.1).

Run ``python reference/torch_twin.py`` (needs torch and transformers). The test
``tests/test_torch_parity.py::test_twin_step_matches`` asserts the same.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BlipTextConfig, BlipVisionConfig  # noqa: E402
from transformers.models.blip.modeling_blip import BlipVisionModel  # noqa: E402
from transformers.models.blip.modeling_blip_text import (BlipTextLMHeadModel,  # noqa: E402
                                                         BlipTextModel)

from minblip import hf  # noqa: E402
from minblip.blip import BLIP, BLIPConfig, pretrain_step  # noqa: E402
from minblip.objectives import hard_negative_weights  # noqa: E402
from minblip.text import TextConfig  # noqa: E402
from minblip.tokenizer import Tokenizer  # noqa: E402
from minblip.vit import ViTConfig  # noqa: E402

WORDS = "a an the red blue green circle square triangle small large left right of picture".split()
CAPTIONS = ["a red circle", "a large blue square left of a green circle", "a small triangle",
            "the green circle right of a red square", "a picture of a blue triangle"]


def tie_encoder_decoder(encoder: nn.Module, decoder_bert: nn.Module, skip: str | None) -> None:
    """salesforce/BLIP ``tie_encoder_decoder_weights``: for every module of the
    decoder's BERT that has a weight and whose path ("/encoder/layer/0/crossattention/
    self/query") does not contain ``skip``, the encoder's module at the same path
    takes the decoder's weight and bias Parameters. ``skip=None`` ties everything."""
    enc_modules = dict(encoder.named_modules())
    for name, module in decoder_bert.named_modules():
        path = "/" + name.replace(".", "/")
        if "weight" not in module._parameters or (skip is not None and skip in path):
            continue
        target = enc_modules[name]
        target.weight = module.weight
        if module._parameters.get("bias") is not None:
            target.bias = module.bias


class TwinBLIP(nn.Module):
    """minblip's BLIP (a :class:`minblip.blip.BLIPConfig`) built from HF modules."""

    def __init__(self, cfg: BLIPConfig):
        super().__init__()
        v, t = cfg.vision, cfg.text
        vision_config = BlipVisionConfig(
            hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
            num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
            layer_norm_eps=v.eps, hidden_act="gelu", attention_dropout=0.0)
        text_config = BlipTextConfig(
            vocab_size=t.vocab_size, hidden_size=t.width, encoder_hidden_size=t.encoder_width,
            intermediate_size=t.mlp_dim, num_hidden_layers=t.depth, num_attention_heads=t.heads,
            max_position_embeddings=t.max_positions, layer_norm_eps=t.eps, hidden_act="gelu",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=t.pad_id,
            bos_token_id=0, eos_token_id=0, sep_token_id=0,
            label_smoothing=cfg.label_smoothing)
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_config)
        self.vision_proj = nn.Linear(v.width, cfg.embed_dim)
        self.text_proj = nn.Linear(t.width, cfg.embed_dim)
        self.itm_head = nn.Linear(t.width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.pos_embed_at_output = v.pos_embed_at_output  # minblip's departure, ViTConfig
        if cfg.sharing != "none":
            tie_encoder_decoder(self.text_encoder, self.text_decoder.bert,
                                "/attention" if cfg.sharing == "all_but_self_attention" else None)

    def step(self, images, ids, mask, neg_image_idx, neg_text_idx, *, cls_id, enc_id, dec_id,
             weights=(1.0, 1.0, 1.0)):
        """``BLIP_Pretrain.forward`` with alpha = 0 and no queue -> (total, losses, sim_i2t)."""
        B = ids.shape[0]
        image_embeds = self.vision_model(pixel_values=images).last_hidden_state
        if self.pos_embed_at_output:
            image_embeds = image_embeds + self.vision_model.embeddings.position_embedding
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        # ITC: the unimodal encoder on "[CLS] text"
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_out = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)
        sim_i2t = image_feat @ text_feat.t() / self.temp
        sim_t2i = text_feat @ image_feat.t() / self.temp
        targets = torch.arange(B)
        loss_itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2
        # ITM: "[ENC] text" against its image, then text with a negative image and a
        # negative text with the image (in that order, as blip_pretrain.py)
        enc_ids = ids.clone()
        enc_ids[:, 0] = enc_id
        out_pos = self.text_encoder(input_ids=enc_ids, attention_mask=mask,
                                    encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_atts).last_hidden_state
        ids_all = torch.cat([enc_ids, enc_ids[neg_text_idx]])
        mask_all = torch.cat([mask, mask[neg_text_idx]])
        images_all = torch.cat([image_embeds[neg_image_idx], image_embeds])
        out_neg = self.text_encoder(input_ids=ids_all, attention_mask=mask_all,
                                    encoder_hidden_states=images_all,
                                    encoder_attention_mask=torch.ones(images_all.shape[:-1],
                                                                      dtype=torch.long)
                                    ).last_hidden_state
        itm_logits = self.itm_head(torch.cat([out_pos[:, 0], out_neg[:, 0]]))
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long),
                                torch.zeros(2 * B, dtype=torch.long)])
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        # LM: "[DEC] text", padding ignored, label smoothing inside BlipTextLMHeadModel
        dec_ids = ids.clone()
        dec_ids[:, 0] = dec_id
        labels = dec_ids.masked_fill(mask == 0, -100)
        loss_lm = self.text_decoder(input_ids=dec_ids, attention_mask=mask,
                                    encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_atts, labels=labels).loss
        w_itc, w_itm, w_lm = weights
        total = w_itc * loss_itc + w_itm * loss_itm + w_lm * loss_lm
        return total, {"itc": loss_itc, "itm": loss_itm, "lm": loss_lm}, sim_i2t


def tiny_minblip(seed: int = 0, dtype=np.float64, sharing: str = "all_but_self_attention",
                 scale: float = 0.3, pos_embed_at_output: bool = False):
    """A small minblip BLIP with weights far from their init (so every gradient is
    well away from zero) and its tokenizer."""
    tok = Tokenizer(WORDS)
    cfg = BLIPConfig(vision=ViTConfig(image_size=16, patch_size=8, width=16, depth=2, heads=2,
                                      mlp_dim=32, pos_embed_at_output=pos_embed_at_output),
                     text=TextConfig(vocab_size=tok.vocab_size, width=16, depth=2, heads=2,
                                     mlp_dim=32, max_positions=16, encoder_width=16),
                     embed_dim=8, sharing=sharing, label_smoothing=0.1)
    rng = np.random.default_rng(seed)
    model = BLIP(cfg, rng).to(dtype)
    for name, p in model.named_params():
        if name.endswith("gamma"):
            p.data[...] = 1.0 + 0.2 * rng.standard_normal(p.shape)
        elif name != "temp":
            p.data[...] = scale * rng.standard_normal(p.shape)
    return model, tok


def twin_of(model: BLIP, cfg: BLIPConfig | None = None) -> TwinBLIP:
    """A TwinBLIP holding ``model``'s weights (copied through minblip.hf's map)."""
    torch_dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    twin = TwinBLIP(model.cfg if cfg is None else cfg).to(torch_dtype)
    state = {k: torch.from_numpy(np.array(v)) for k, v in
             hf.hf_state_dict(model, "pretraining", include_tied=True).items()}
    twin.load_state_dict(state, strict=True)
    return twin.eval()


def _row(name, mine, ref):
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    diff = float(np.max(np.abs(mine - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return {"name": name, "shape": tuple(ref.shape), "max_ref": scale, "max_abs": diff,
            "rel": diff / max(scale, 1e-300)}


def compare_step(model: BLIP, tok, seed: int = 0, batch: int = 4,
                 twin_cfg: BLIPConfig | None = None):
    """One step in both implementations. Returns (rows, info): one row per loss,
    per gradient tensor (Hugging Face name) and for the pixels, each with the max
    |reference|, the max absolute difference and their ratio. ``twin_cfg`` builds
    the twin from another config (to see the comparison fail)."""
    rng = np.random.default_rng(seed)
    dtype = model.dtype
    images = rng.standard_normal((batch, 3, model.cfg.vision.image_size,
                                  model.cfg.vision.image_size)).astype(dtype)
    ids, mask = tok.encode(CAPTIONS[:batch], max_length=model.cfg.text.max_positions)
    kw = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id)

    model.zero_grad()
    result = pretrain_step(model, images, ids, mask, rng=rng, **kw)  # samples the negatives

    twin = twin_of(model, twin_cfg)
    pixels = torch.tensor(images, requires_grad=True)
    neg_i = torch.from_numpy(result.neg_image_idx)
    neg_t = torch.from_numpy(result.neg_text_idx)
    total, losses, sim_i2t = twin.step(pixels, torch.from_numpy(ids), torch.from_numpy(mask),
                                       neg_i, neg_t, **kw)
    total.backward()

    rows = [_row("loss", result.loss, total.item())]
    rows += [_row(f"loss_{k}", result.losses[k], v.item()) for k, v in losses.items()]
    rows.append(_row("ITC logits sim_i2t", result.sim_i2t, sim_i2t.detach().numpy()))
    # the sampling weights of the hard negatives, recomputed from the twin's similarities
    with torch.no_grad():
        w = torch.softmax(sim_i2t.t().double(), dim=1) + 1e-4
        w.fill_diagonal_(0)
    rows.append(_row("hard-negative weights t2i", hard_negative_weights(result.sim_i2t.T),
                     w.numpy()))

    torch_params = dict(twin.named_parameters())  # each shared Parameter once
    compared = set()
    for t in hf.hf_tensors(model, "pretraining"):
        if t.tied_to is not None:
            continue
        if t.name not in torch_params:
            raise AssertionError(f"minblip has {t.name} ({', '.join(t.minblip_names)}) as its "
                                 f"own tensor; in the twin it is shared or absent")
        grad = torch_params[t.name].grad
        ref = np.zeros(t.shape) if grad is None else grad.numpy()
        rows.append(_row(t.name, t.to_hf([p.grad for p in t.params]), ref))
        compared.add(t.name)
    extra = sorted(set(torch_params) - compared)
    if extra:
        raise AssertionError(f"the twin has parameters minblip shares or lacks: {extra}")
    rows.append(_row("pixels", result.d_images, pixels.grad.numpy()))
    info = {"negatives": (result.neg_image_idx.tolist(), result.neg_text_idx.tolist()),
            "n_params": len(compared)}
    return rows, info


# (rtol, atol) per dtype: a tensor passes when max|diff| <= rtol * max|torch| + atol.
# atol covers gradients that are zero in exact arithmetic, where both sides hold
# rounding noise: the attention key biases (adding b to every key adds q.b to every
# score of a query row, which the softmax ignores).
TOLERANCES = {"float64": (1e-8, 1e-12), "float32": (1e-4, 1e-6)}


def passes(row, dtype: str) -> bool:
    rtol, atol = TOLERANCES[dtype]
    return row["max_abs"] <= rtol * row["max_ref"] + atol


def print_table(rows, dtype: str) -> None:
    width = max(len(r["name"]) for r in rows)
    print(f"{'tensor':<{width}}  {'shape':<14} {'max|torch|':>11} {'max abs diff':>13} "
          f"{'rel diff':>10}  ok")
    for r in rows:
        ok = "ok" if passes(r, dtype) else "FAIL"
        print(f"{r['name']:<{width}}  {str(r['shape']):<14} {r['max_ref']:>11.3e} "
              f"{r['max_abs']:>13.3e} {r['rel']:>10.2e}  {ok}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--sharing", default="all_but_self_attention",
                        choices=["all_but_self_attention", "all", "none"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    model, tok = tiny_minblip(args.seed, np.dtype(args.dtype), args.sharing)
    rows, info = compare_step(model, tok, args.seed)
    print(f"minblip vs PyTorch twin, {args.dtype}, sharing={args.sharing}, "
          f"{info['n_params']} parameter tensors, ITM negatives (image per text, text per "
          f"image) = {info['negatives']}")
    print_table(rows, args.dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "sharing": args.sharing, "seed": args.seed,
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "tolerance": dict(zip(("rtol", "atol"), TOLERANCES[args.dtype])),
                       "rows": rows}, f, indent=1)
    rtol, atol = TOLERANCES[args.dtype]
    failed = [r["name"] for r in rows if not passes(r, args.dtype)]
    worst = max(r["rel"] for r in rows if r["max_ref"] > atol)
    print(f"worst relative difference {worst:.2e} over tensors with max|torch| > {atol:g}; "
          f"{len(rows) - len(failed)}/{len(rows)} within rtol={rtol:g}, atol={atol:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
