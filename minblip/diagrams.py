"""Architecture pictures drawn from the real model objects.

Each picture has two halves: a ``*_parts`` function that reads a model object
(which sub-modules it holds, which Params are the same objects, which are
frozen, what a real training step calls) and returns plain records, and a
``draw_*`` function that lays those records out with matplotlib. Nothing in a
picture is typed in by hand that the object could tell, so a picture cannot
disagree with the code: build the decoder with another sharing mode, unfreeze
the ViT or give the Q-Former cross-attention in every layer, and the picture
changes with it.

* :func:`draw_med`: BLIP's text side, the encoder run twice and the decoder,
  coloured by which Params the encoder and decoder share (object identity);
* :func:`draw_pretraining_step`: the text-encoder and decoder calls of one
  real ``pretrain_step``, in order, with the order of their backwards;
* :func:`draw_qformer`: BLIP-2's Q-Former, layer by layer;
* :func:`draw_blip2_stages`: BLIP-2's two stages, frozen parts in grey;
* :func:`draw_capfilt`: the CapFilt loop of BLIP section 3.3.

Every box is a matplotlib patch whose ``gid`` names its kind (``"med:shared"``,
``"qformer:cross_attn"``, ``"blip2:frozen"``...), so a test can count them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyBboxPatch

from .blip import BLIP, pretrain_step
from .capfilt import CAPTIONER_WEIGHTS, FILTER_WEIGHTS, CapFiltConfig
from .core import Module, Param
from .qformer import QFormer
from .text import TextDecoder, TextTransformer

COLOURS = {
    "shared": "#a6d96a",      # held by the encoder and the decoder: one object
    "encoder": "#92c5de",     # the encoder's own
    "decoder": "#f4a582",     # the decoder's own
    "skipped": "#ffffff",     # a module the call does not run
    "frozen": "#cccccc",      # every Param frozen
    "trainable": "#fdb863",   # every Param trains
    "partly": "#fee0b6",      # some Params frozen, some not
    "data": "#f7f7f7",        # inputs, outputs, datasets
    "query": "#b2abd2",       # Q-Former query positions
    "text": "#92c5de",        # Q-Former text positions
    "both": "#a6d96a",        # Q-Former modules that every position goes through
    "step": "#fdb863",        # a stage of a procedure
}
OBJECTIVES = ("ITC", "ITM", "LM")


def _box(ax, x, y, w, h, text, colour, gid, fontsize=8, hatch=None, bold=False):
    """A rounded box centred at (x, y), tagged with ``gid`` for tests."""
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.01,rounding_size=0.05",
                           facecolor=COLOURS[colour], edgecolor="#444444", linewidth=0.8,
                           hatch=hatch, gid=gid)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, wrap=True,
            fontweight="bold" if bold else "normal", color="#999999" if colour == "skipped"
            else "black")
    return patch


def _arrow(ax, start, end, colour="#444444", style="-|>", lw=0.9, text=None, fontsize=7):
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle=style, color=colour, lw=lw, shrinkA=0, shrinkB=0))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, text, fontsize=fontsize,
                ha="center", va="bottom", color=colour)


def _canvas(width, height, figsize, title=None):
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=11)
    return fig, ax


def _legend(ax, entries, loc="upper right", ncol=1):
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=COLOURS[c], edgecolor="#444444",
                             hatch=h) for c, _, h in entries]
    ax.legend(handles, [label for _, label, _ in entries], loc=loc, fontsize=8, frameon=False,
              ncol=ncol)


def _param_ids(*parts) -> set[int]:
    """ids of every Param (frozen ones too) of the given Modules and Params."""
    ids = set()
    for part in parts:
        if isinstance(part, Param):
            ids.add(id(part))
        elif isinstance(part, Module):
            ids |= {id(p) for p in part.params(include_frozen=True)}
    return ids


def _count(parts) -> tuple[int, int]:
    """(trainable, total) scalars of Modules and Params, each Param once."""
    seen, trainable, total = set(), 0, 0
    for part in parts:
        params = [part] if isinstance(part, Param) else part.params(include_frozen=True)
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.size
                trainable += p.size if p.trainable else 0
    return trainable, total


def _status(trainable: int, total: int) -> str:
    return "frozen" if trainable == 0 else "trainable" if trainable == total else "partly"


# ---------------------------------------------------------------------------------------
# MED: the text encoder and decoder of BLIP
# ---------------------------------------------------------------------------------------

@dataclass
class MedBlock:
    """One box of the MED picture. ``column``: 0 the unimodal text encoder (ITC),
    1 the image-grounded text encoder (ITM), 2 the image-grounded decoder (LM).
    ``role``: "shared" (all its Params are also the other tower's), "partly"
    (some are), "encoder" or "decoder" (none are: its own); ``runs``: False for
    cross-attention in text mode."""

    column: int
    row: int
    label: str
    role: str
    runs: bool = True


def _tower_units(tower: TextTransformer):
    units = [("embeddings\n(word + position, LN)", (tower.embeddings,))]
    for i, layer in enumerate(tower.layers):
        units.append((f"layer {i}: self-attention + LN", (layer.self_attn, layer.self_attn_ln)))
        if layer.cross_attn is not None:
            units.append((f"layer {i}: cross-attention + LN",
                          (layer.cross_attn, layer.cross_attn_ln)))
        units.append((f"layer {i}: feed-forward + LN", (layer.ffn, layer.ffn_ln)))
    return units


def med_parts(encoder: TextTransformer, decoder: TextDecoder) -> list[MedBlock]:
    """The boxes of :func:`draw_med`, read from the two objects: a box is
    "shared" when its Params are Params of the other tower too (by identity)."""

    def role(modules, other, own):
        ids = _param_ids(*modules)
        common = ids & other
        return "shared" if common == ids else "partly" if common else own

    if not isinstance(encoder, TextTransformer) or not isinstance(decoder, TextDecoder):
        raise TypeError(f"med_parts: expected a TextTransformer and a TextDecoder, got "
                        f"{type(encoder).__name__} and {type(decoder).__name__}")
    in_encoder, in_decoder = _param_ids(encoder), _param_ids(decoder)
    blocks = []
    for column in (0, 1):
        for row, (label, modules) in enumerate(_tower_units(encoder)):
            runs = not (column == 0 and "cross" in label)  # text mode skips cross-attention
            blocks.append(MedBlock(column, row, label, role(modules, in_decoder, "encoder"), runs))
    units = _tower_units(decoder.bert)
    head = decoder.head
    units.append(("LM head: dense, GELU, LN, bias\n(output matrix: see note)",
                  (head.dense, head.layer_norm, head.bias)))
    for row, (label, modules) in enumerate(units):
        blocks.append(MedBlock(2, row, label, role(modules, in_encoder, "decoder")))
    return blocks


def draw_med(encoder: TextTransformer, decoder: TextDecoder, title: str | None = None):
    """BLIP's multimodal mixture of encoder-decoder as three columns, one per
    function, bottom to top; returns the figure. Colours come from
    :func:`med_parts`; the note under the picture says whether the LM head's
    output matrix is the word-embedding Param and how many Params are shared."""
    blocks = med_parts(encoder, decoder)
    rows = max(b.row for b in blocks) + 1
    fig, ax = _canvas(13.2, rows + 4.0, (12, 0.55 * rows + 3.6), title or
                      "BLIP's MED: one text transformer, three functions")
    xs = (2.2, 6.6, 11.0)
    heads = ("unimodal text encoder\n[CLS] + text, bidirectional mask",
             "image-grounded text encoder\n[ENC] + text, bidirectional mask",
             "image-grounded text decoder\n[DEC] + text, causal mask")
    outs = ("[CLS] -> text_proj -> ITC", "[ENC] -> itm_head -> ITM", "next-word logits -> LM")
    base = 1.8  # y of the inputs
    for x, head, out in zip(xs, heads, outs):
        _box(ax, x, base, 3.4, 0.8, head, "data", "med:input", fontsize=7.5)
        _box(ax, x, base + rows + 1.3, 3.4, 0.6, out, "data", "med:output", fontsize=8)
        _arrow(ax, (x, base + 0.4), (x, base + 0.65))
        _arrow(ax, (x, base + rows + 0.35), (x, base + rows + 1.0))
    for b in blocks:
        y = base + 1.0 + b.row
        colour = "skipped" if not b.runs else "shared" if b.role == "partly" else b.role
        hatch = "//" if not b.runs else ".." if b.role == "partly" else None
        _box(ax, xs[b.column], y, 3.4, 0.7, b.label + ("" if b.runs else "  (skipped)"), colour,
             f"med:{b.role}" if b.runs else "med:skipped", fontsize=7, hatch=hatch)
    for x in xs[1:]:  # the image tokens run up beside the two image-grounded columns
        rail = x - 2.15
        cross = [base + 1.0 + b.row for b in blocks
                 if b.runs and "cross" in b.label and xs[b.column] == x]
        if cross:
            ax.plot([rail, rail], [base - 0.3, max(cross)], color="#b2182b", lw=0.9)
            ax.text(rail, base - 0.55, "image tokens", fontsize=7, color="#b2182b", ha="center")
            for y in cross:
                _arrow(ax, (rail, y), (x - 1.72, y), colour="#b2182b")
    tied = decoder.head.weight is decoder.bert.embeddings.word_embeddings.weight
    shared_params = len(_param_ids(encoder) & _param_ids(decoder))
    note = (f"{shared_params} Param objects are held by both the encoder and the decoder. "
            f"The LM head's output matrix {'is' if tied else 'is not'} the decoder's "
            f"word-embedding Param{' (tied)' if tied else ''}.")
    ax.text(6.6, 0.75, note, ha="center", fontsize=8)
    _legend(ax, [("shared", "shared by encoder and decoder (same objects)", None),
                 ("shared", "partly shared", ".."), ("encoder", "encoder only", None),
                 ("decoder", "decoder only", None), ("skipped", "not run in this function", "//")],
            loc="lower center", ncol=5)
    return fig


# ---------------------------------------------------------------------------------------
# The calls of one BLIP pretraining step
# ---------------------------------------------------------------------------------------

@dataclass
class ModuleCall:
    """One forward call of a top-level module during a real ``pretrain_step``.

    ``module``: "visual_encoder", "text_encoder" or "text_decoder"; ``rows``: the
    batch size of the call; ``first_token``: the token every text starts with
    (None for the ViT); ``with_image``: cross-attention to image tokens;
    ``backward_order``: the position of this call's backward among the backwards
    of the step (0 first), None if it had none."""

    order: int
    module: str
    rows: int
    first_token: str | None
    with_image: bool
    backward_order: int | None = None

    @property
    def objective(self) -> str:
        """What the call's output feeds, as pretrain_step uses it."""
        if self.module == "text_decoder":
            return "LM"
        if self.module == "text_encoder":
            return "ITM" if self.with_image else "ITC"
        return "image tokens"


def trace_pretraining_step(model: BLIP, tokenizer, images, ids, mask,
                           rng: np.random.Generator) -> list[ModuleCall]:
    """Run one real ``pretrain_step`` (forward and backward; the Params' grads
    are left as the step made them) and record every forward and backward call
    of the model's ``visual_encoder``, ``text_encoder`` and ``text_decoder``.
    A call made from inside another recorded call (the decoder's own body when
    it *is* the encoder, sharing "all") is not counted twice."""
    calls: list[ModuleCall] = []
    by_cache: dict[int, ModuleCall] = {}
    backwards = [0]
    depth = [0]
    names = ("visual_encoder", "text_encoder", "text_decoder")

    def recorder(name, module):
        forward, backward = module.forward, module.backward
        signature = inspect.signature(forward)

        def record_forward(*args, **kwargs):
            if depth[0]:
                return forward(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            depth[0] += 1
            try:
                out, cache = forward(*args, **kwargs)
            finally:
                depth[0] -= 1
            if name == "visual_encoder":
                call = ModuleCall(len(calls), name, len(bound["images"]), None, False)
            else:
                first = np.unique(np.asarray(bound["ids"])[:, 0])
                token = ", ".join(tokenizer.id_to_token(int(t)) for t in first)
                call = ModuleCall(len(calls), name, len(bound["ids"]), token,
                                  bound.get("image_embeds") is not None)
            calls.append(call)
            by_cache[id(cache)] = call
            return out, cache

        def record_backward(dout, cache):
            if depth[0]:
                return backward(dout, cache)
            depth[0] += 1
            try:
                result = backward(dout, cache)
            finally:
                depth[0] -= 1
            by_cache[id(cache)].backward_order = backwards[0]
            backwards[0] += 1
            return result

        return record_forward, record_backward

    modules = {name: getattr(model, name) for name in names}
    try:
        for name, module in modules.items():
            if module.__dict__.get("forward") is not None:
                raise RuntimeError(f"{name} already has a recorder attached")
            module.forward, module.backward = recorder(name, module)
        pretrain_step(model, images, ids, mask, cls_id=tokenizer.cls_id,
                      enc_id=tokenizer.enc_id, dec_id=tokenizer.dec_id, rng=rng)
    finally:
        for module in modules.values():  # the instance attributes go; the methods remain
            module.__dict__.pop("forward", None)
            module.__dict__.pop("backward", None)
    return calls


def draw_pretraining_step(calls: list[ModuleCall], batch: int, title: str | None = None):
    """The calls of :func:`trace_pretraining_step` left to right in forward
    order, each with its batch (in units of the step's ``batch``), first token,
    image input and the objective it feeds; below, the order of the backwards."""
    text_calls = [c for c in calls if c.module != "visual_encoder"]
    vit = [c for c in calls if c.module == "visual_encoder"]
    n = len(text_calls)
    fig, ax = _canvas(3.2 * n + 3.5, 6.0, (3.2 * n + 3.5, 4.4),
                      title or "One BLIP pretraining step: the text-side calls, as traced")
    vit_back = [c.backward_order for c in vit if c.backward_order is not None]
    vit_label = (f"visual_encoder\n{len(vit)} forward call(s): {batch} images\n"
                 + (f"backward #{vit_back[0] + 1}" if vit_back else "no backward"))
    _box(ax, 1.6, 3.2, 2.6, 1.6, vit_label, "data", "step:vit", fontsize=8)
    rail = 1.7  # the image tokens run along here to the calls that cross-attend
    ax.plot([1.6, 1.6], [2.4, rail], color="#b2182b", lw=0.9)
    ax.text(1.7, rail - 0.35, "image tokens", fontsize=7.5, color="#b2182b")
    for k, c in enumerate(text_calls):
        x = 4.8 + 3.2 * k
        rows = f"{c.rows // batch}B" if c.rows % batch == 0 else str(c.rows)
        rows = "B" if rows == "1B" else rows
        image = "cross-attends to image tokens" if c.with_image else "no image"
        back = "no backward" if c.backward_order is None else f"backward #{c.backward_order + 1}"
        label = (f"forward {k + 1}: {c.module}\n{rows} texts starting {c.first_token}\n"
                 f"{image}\n{back}")
        colour = "decoder" if c.module == "text_decoder" else "encoder"
        _box(ax, x, 3.2, 2.9, 1.6, label, colour, f"step:{c.module}", fontsize=7.5)
        _box(ax, x, 5.3, 2.0, 0.6, c.objective, "data", "step:objective", fontsize=9, bold=True)
        _arrow(ax, (x, 4.0), (x, 5.0))
        if c.with_image:
            ax.plot([1.6, x], [rail, rail], color="#b2182b", lw=0.9)
            _arrow(ax, (x, rail), (x, 2.4), colour="#b2182b")
        if c.objective == "ITC":
            _arrow(ax, (1.6, 4.0), (x - 1.0, 5.3), colour="#444444",
                   text="[CLS] -> vision_proj")
    ax.text(0.3, 0.4, "Backwards run in the reverse order of the forwards: every consumer of "
            "the image tokens adds its gradient before the ViT's backward runs.", fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------
# The Q-Former
# ---------------------------------------------------------------------------------------

@dataclass
class QFormerLayerParts:
    """What one Q-Former layer holds: self-attention (always one module for
    queries and text), cross-attention (query rows only) or not, and its
    feed-forwards; ``ffn_same_object`` is True when the query and text
    feed-forwards are one module (they are not, in BLIP-2)."""

    index: int
    cross_attn: bool
    ffn_query: bool
    ffn_text: bool
    ffn_same_object: bool


def qformer_parts(qformer: QFormer) -> dict:
    """{"num_queries", "width", "text": bool (the text embeddings are present),
    "layers": [QFormerLayerParts, ...]} read from the object."""
    if not isinstance(qformer, QFormer):
        raise TypeError(f"qformer_parts: expected a QFormer, got {type(qformer).__name__}")
    layers = [QFormerLayerParts(i, layer.cross_attn is not None, layer.ffn_query is not None,
                                layer.ffn is not None,
                                layer.ffn is not None and layer.ffn is layer.ffn_query)
              for i, layer in enumerate(qformer.layers)]
    return {"num_queries": qformer.query_tokens.shape[1], "width": qformer.query_tokens.shape[2],
            "text": qformer.embeddings.word_embeddings is not None, "layers": layers}


def draw_qformer(qformer: QFormer, title: str | None = None):
    """The Q-Former bottom to top: the learned queries (left lane) and the text
    (right lane), each layer's one self-attention across both lanes, its
    cross-attention to the frozen image features in the query lane (only in
    the layers that have it) and the two feed-forwards."""
    parts = qformer_parts(qformer)
    layers = parts["layers"]
    rows = 3 * len(layers)
    fig, ax = _canvas(11, rows + 3.5, (9, 0.45 * rows + 3.2), title or
                      f"The Q-Former: {parts['num_queries']} learned queries, "
                      f"{len(layers)} layers")
    xq, xt = 4.0, 8.0
    _box(ax, xq, 0.8, 3.2, 0.8, f"learned queries: one Param\n(1, {parts['num_queries']}, "
         f"{parts['width']}), broadcast to the batch", "query", "qformer:queries", fontsize=7.5)
    if parts["text"]:
        _box(ax, xt, 0.8, 3.2, 0.8, "text tokens\nword + position embeddings", "text",
             "qformer:text", fontsize=7.5)
    else:
        ax.text(xt, 0.8, "(no text parts:\nstage 2 removed them)", ha="center", va="center",
                fontsize=7.5, color="#777777")
    _box(ax, 1.0, rows / 2 + 1.5, 1.6, 1.2, "frozen image\nfeatures\n(ViT + ln_vision)",
         "frozen", "qformer:image", fontsize=7)
    y = 2.0
    for layer in layers:
        _box(ax, (xq + xt) / 2, y, 7.2, 0.7, f"layer {layer.index}: self-attention + LN "
             "(one module: queries and text, mask by task)", "both", "qformer:self_attn",
             fontsize=7.5)
        y += 1.0
        if layer.cross_attn:
            _box(ax, xq, y, 3.2, 0.7, f"layer {layer.index}: cross-attention + LN\n"
                 "(query rows only)", "query", "qformer:cross_attn", fontsize=7.5)
            _arrow(ax, (1.8, rows / 2 + 1.5), (xq - 1.62, y), colour="#b2182b", lw=0.7)
        else:
            ax.text(xq, y, f"layer {layer.index}: no cross-attention", ha="center",
                    va="center", fontsize=7, color="#777777")
        y += 1.0
        if layer.ffn_same_object:
            _box(ax, (xq + xt) / 2, y, 7.2, 0.7, f"layer {layer.index}: one feed-forward "
                 "for queries and text", "both", "qformer:ffn_shared", fontsize=7.5)
        else:
            if layer.ffn_query:
                _box(ax, xq, y, 3.2, 0.7, f"layer {layer.index}: query feed-forward + LN",
                     "query", "qformer:ffn_query", fontsize=7.5)
            if layer.ffn_text:
                _box(ax, xt, y, 3.2, 0.7, f"layer {layer.index}: text feed-forward + LN",
                     "text", "qformer:ffn_text", fontsize=7.5)
        y += 1.0
    _box(ax, xq, y + 0.2, 3.2, 0.6, f"{parts['num_queries']} query outputs", "data",
         "qformer:output", fontsize=8)
    if parts["text"]:
        _box(ax, xt, y + 0.2, 3.2, 0.6, "text outputs", "data", "qformer:output", fontsize=8)
    _legend(ax, [("query", "query positions only", None), ("text", "text positions only", None),
                 ("both", "every position", None)], loc="upper left")
    return fig


# ---------------------------------------------------------------------------------------
# BLIP-2's two stages
# ---------------------------------------------------------------------------------------

@dataclass
class StagePart:
    """One box of a BLIP-2 stage: an attribute of the model, its trainable and
    total scalars, "frozen" / "trainable" / "partly", and whether it is the same
    object as the stage-1 model's attribute of that name."""

    name: str
    trainable: int
    total: int
    status: str
    same_as_stage1: bool = False


STAGE1_PARTS = (("visual_encoder",), ("ln_vision",), ("qformer",),
                ("vision_proj", "text_proj", "temp"), ("itm_head",), ("lm_head",))
STAGE2_PARTS = (("visual_encoder",), ("ln_vision",), ("qformer",), ("language_projection",),
                ("language_model",))


def _stage_parts(model, groups, stage1=None) -> list[StagePart]:
    out = []
    for group in groups:
        objects = [getattr(model, name) for name in group]
        if group == ("lm_head",):  # its own parts; the output matrix is drawn as a tie
            head = model.lm_head
            objects = [head.dense, head.layer_norm, head.bias]
        trainable, total = _count(objects)
        same = stage1 is not None and all(getattr(stage1, n, None) is getattr(model, n)
                                          for n in group)
        out.append(StagePart(" + ".join(group), trainable, total, _status(trainable, total), same))
    return out


def blip2_stage_parts(stage1, stage2) -> tuple[list[StagePart], list[StagePart]]:
    """The parts of a ``Blip2Stage1`` and a ``Blip2Stage2``, in data-flow order,
    with their Param counts and frozen status read from ``Param.frozen``."""
    return _stage_parts(stage1, STAGE1_PARTS), _stage_parts(stage2, STAGE2_PARTS, stage1)


def _stage_label(part: StagePart, caption: str) -> str:
    counts = (f"{part.total:,} params, frozen" if part.status == "frozen" else
              f"{part.trainable:,} of {part.total:,} train")
    same = "\nsame object as in stage 1" if part.same_as_stage1 else ""
    return f"{caption}\n{counts}{same}"


def draw_blip2_stages(stage1, stage2, title: str | None = None):
    """Stage 1 (top) and stage 2 (bottom) left to right, every part coloured by
    :func:`blip2_stage_parts`: grey when all its Params are frozen."""
    parts1, parts2 = blip2_stage_parts(stage1, stage2)
    fig, ax = _canvas(15, 8.4, (15, 6.2), title or "BLIP-2: two stages, what trains and what is frozen")
    tied = stage1.lm_head.weight is stage1.qformer.embeddings.word_embeddings.weight
    captions1 = ("image encoder (ViT)", "ln_vision", "Q-Former", "ITC: vision_proj,\ntext_proj, temp",
                 "ITM: itm_head", "ITG: lm_head" + ("\n(output = Q-Former word table)" if tied
                                                    else "\n(its own output matrix)"))
    captions2 = ("image encoder (ViT)", "ln_vision", "Q-Former (queries only)",
                 "language_projection", "language model")
    ax.text(0.2, 7.9, "stage 1: representation learning (ITC + ITM + ITG)", fontsize=10,
            fontweight="bold")
    ax.text(0.2, 3.6, "stage 2: generative learning (soft prompt -> frozen LM)", fontsize=10,
            fontweight="bold")
    xs = (1.6, 4.3, 7.0)
    for part, caption, x in zip(parts1[:3], captions1[:3], xs):
        _box(ax, x, 5.8, 2.4, 1.3, _stage_label(part, caption), part.status,
             f"blip2:{part.status}", fontsize=7.5)
    for i, (part, caption) in enumerate(zip(parts1[3:], captions1[3:])):
        y = 7.1 - 1.3 * i
        _box(ax, 11.0, y, 3.4, 1.1, _stage_label(part, caption), part.status,
             f"blip2:{part.status}", fontsize=7.5)
        _arrow(ax, (8.2, 5.8), (9.3, y))
    for a, b in zip(xs, xs[1:]):
        _arrow(ax, (a + 1.2, 5.8), (b - 1.2, 5.8))
    xs2 = (1.6, 4.3, 7.0, 9.7, 12.8)
    for part, caption, x in zip(parts2, captions2, xs2):
        _box(ax, x, 1.8, 2.4 if x < 12 else 3.0, 1.4, _stage_label(part, caption), part.status,
             f"blip2:{part.status}", fontsize=7.5)
    for a, b in zip(xs2, xs2[1:]):
        _arrow(ax, (a + 1.2, 1.8), (b - (1.5 if b > 12 else 1.2), 1.8))
    ax.text(11.2, 2.7, "soft prompt", fontsize=7, ha="center")
    ax.text(12.8, 0.6, "soft prompt + text -> next word", fontsize=7.5, ha="center")
    _legend(ax, [("frozen", "frozen (Param.frozen)", None),
                 ("trainable", "trainable", None), ("partly", "partly frozen", None)])
    return fig


# ---------------------------------------------------------------------------------------
# CapFilt
# ---------------------------------------------------------------------------------------

def objective_names(weights) -> str:
    """(ITC, ITM, LM) loss weights -> "ITC + ITM" (the objectives that are on)."""
    on = [name for name, w in zip(OBJECTIVES, weights) if w]
    return " + ".join(on) if on else "nothing"


def capfilt_parts(cfg: CapFiltConfig, run=None, captioner_weights=CAPTIONER_WEIGHTS,
                  filter_weights=FILTER_WEIGHTS) -> list[tuple[str, str]]:
    """The steps of the CapFilt loop as (key, text), from a CapFiltConfig (and a
    finished ``CapFiltRun`` for the counts of kept texts)."""
    n_clean_pairs = cfg.n_clean * cfg.clean_captions_per_image
    kept = ""
    if run is not None:
        kept = (f"\nkept: {int(run.keep_web.sum())} of {len(run.keep_web)} web texts, "
                f"{int(run.keep_synthetic.sum())} of {len(run.keep_synthetic)} synthetic")
    return [
        ("pretrain", f"1. pretrain BLIP (ITC + ITM + LM)\non clean ({cfg.n_clean} images, "
                     f"{n_clean_pairs} human captions)\n+ web ({cfg.n_web} images, "
                     f"{cfg.noise:.0%} of captions wrong)"),
        ("captioner", f"2a. fine-tune a copy as captioner\non clean, "
                      f"{objective_names(captioner_weights)}"),
        ("filter", f"2b. fine-tune a copy as filter\non clean, {objective_names(filter_weights)}"),
        ("caption", "3. captioner writes one synthetic\ncaption per web image (nucleus)"),
        ("judge", f"4. filter judges each text on its own,\nweb and synthetic alike: keep if "
                  f"p(match) > {cfg.threshold:g}{kept}"),
        ("bootstrap", "5. pretrain a fresh BLIP on clean\n+ kept web + kept synthetic"),
    ]


def draw_capfilt(cfg: CapFiltConfig, run=None, title: str | None = None):
    """The CapFilt loop (BLIP section 3.3, ``minblip.capfilt``) from a config and,
    optionally, a finished run."""
    steps = dict(capfilt_parts(cfg, run))
    fig, ax = _canvas(19, 7, (15, 5.6), title or "CapFilt: bootstrapping the captions of web images")
    pos = {"pretrain": (2.4, 3.5), "captioner": (7.0, 5.6), "filter": (7.0, 1.4),
           "caption": (11.7, 5.6), "judge": (11.7, 1.4), "bootstrap": (16.4, 3.5)}
    for key, (x, y) in pos.items():
        _box(ax, x, y, 4.3, 1.6, steps[key], "step", f"capfilt:{key}", fontsize=7.5)
    _arrow(ax, (4.55, 3.9), (4.85, 5.2), text="copy")
    _arrow(ax, (4.55, 3.1), (4.85, 1.8), text="copy")
    _arrow(ax, (9.15, 5.6), (9.55, 5.6))
    _arrow(ax, (9.15, 1.4), (9.55, 1.4))
    _arrow(ax, (11.7, 4.8), (11.7, 2.2))
    ax.text(11.8, 3.5, "synthetic texts", fontsize=7.5)
    _arrow(ax, (4.55, 3.5), (9.55, 2.0), colour="#777777")
    ax.text(6.0, 2.95, "web texts", fontsize=7.5, color="#777777")
    _arrow(ax, (13.85, 1.6), (14.25, 3.1))
    ax.text(13.0, 2.5, "kept texts", fontsize=7.5)
    return fig
