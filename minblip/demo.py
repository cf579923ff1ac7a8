"""The demo: a tiny BLIP pretrained on the built-in world, evaluated and reported.

``python -m minblip demo`` trains with ``minblip.train`` on the recipe of
:func:`demo_config` and then calls :func:`write_demo_report`: retrieval,
matching and captioning measured on the held-out test split and on the
compositional split (scenes with a colour-shape pair never seen in training),
and a report folder of plots and metrics.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import report
from .evaluate import evaluate_split, retrieval_scores
from .files import write_json_atomic, write_jsonl_atomic
from .image import denormalize, preprocess
from .train import TrainConfig, Trainer

# Where the demo's recipe departs from TrainConfig's defaults: the one place the demo,
# the train command and the benchmarks read it from. The world draws its objects in a
# 3x3 grid of cells; 30-pixel images in 10-pixel patches give one patch per cell (32 in
# 8-pixel patches put a 4x4 patch grid across the cells, and patches cut objects in
# two). The next three let the captioner say where things are: the ViT's position table
# drawn at std 1.0 and added once more at its output (ViTConfig.pos_embed_at_output, a
# departure from BLIP: the captioner must fetch an object's place through the
# cross-attention's values, where the blocks leave little of the table), and the LM loss
# weighted twice (BLIP weighs its three losses the same). 3600 steps, not 3000: the
# captioner learns the relations between two objects late. benchmarks/demo_recipe.py
# measures each change against the alternatives, and notebook 14 plots its curves.
DEMO_RECIPE: dict = {"image_size": 30, "patch_size": 10, "lr": 3e-3, "pos_embed_std": 1.0,
                     "pos_embed_at_output": True, "loss_weights": (1.0, 1.0, 2.0),
                     "steps": 3600}


def demo_config(**changes) -> TrainConfig:
    """The demo's recipe (``python -m minblip demo`` and ``train``): TrainConfig's
    defaults with :data:`DEMO_RECIPE` on top, then ``changes`` (TrainConfig fields)."""
    return TrainConfig(**{**DEMO_RECIPE, **changes})


def write_demo_report(trainer: Trainer, out) -> dict:
    """Evaluate a trained BLIP (``trainer`` of a :class:`~minblip.train.BlipPretraining`
    task) on the test and compositional splits and write the report folder ``out``
    (plots, captions.jsonl, metrics.json). Returns the metrics."""
    out = Path(out)
    task = trainer.task
    model, tok, cfg, data = trainer.model, task.tokenizer, trainer.cfg, task.dataset
    start = time.perf_counter()
    metrics, captions = evaluate_split(model, tok, data.test, cfg.image_size, seed=cfg.seed)
    comp, comp_captions = evaluate_split(model, tok, data.compositional, cfg.image_size,
                                         seed=cfg.seed)
    metrics["compositional"] = comp
    metrics["train_seconds"] = trainer.train_seconds
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["steps"] = trainer.step
    metrics["parameters"] = model.param_count()
    metrics["config"] = cfg.to_dict()
    write_json_atomic(out / "metrics.json", metrics)
    records = [{"split": split.name, "generated": gen, "truth": truth, "scene": scene.to_dict()}
               for split, caps in ((data.test, captions), (data.compositional, comp_captions))
               for scene, truth, gen in zip(split.scenes, split.captions, caps)]
    write_jsonl_atomic(out / "captions.jsonl", records)

    pixels = preprocess(data.test.images, cfg.image_size)
    images = denormalize(pixels)
    n = min(16, len(images))
    sim, _, t2i = retrieval_scores(model, tok, pixels[:n], data.test.captions[:n])
    report.plot_losses(trainer.history, out / "loss_curves.png")
    report.plot_similarity(sim, out / "similarity_matrix.png", n=n)
    report.plot_retrieval(images, data.test.captions, t2i, out / "retrieval_examples.png",
                          n_queries=min(4, n))
    report.plot_captions(images, captions, data.test.captions, out / "captions.png")
    sal = report.itm_patch_saliency(model, tok, pixels[:6], data.test.captions[:6])
    report.plot_itm_heatmaps(images, data.test.captions, sal, out / "itm_heatmap.png")
    return metrics
