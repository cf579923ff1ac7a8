"""What each ingredient of the demo's recipe buys, per CPU-minute: learning curves.

    python benchmarks/demo_recipe.py [--jobs 2] [--variants NAME ...] [--json PATH]

Each variant is the demo's recipe (``minblip.demo.demo_config()``) with one
ingredient changed or another seed, or TrainConfig's defaults (the demo before
its recipe). A worker process trains it and, every ``every`` steps, evaluates
the test split the way the demo does (``minblip.evaluate.evaluate_split``: retrieval with ITM
re-ranking, ITM accuracy, beam-search captions scored attribute by attribute),
recording the CPU seconds spent training so far (one BLAS thread). The curves
go to ``benchmarks/demo_recipe.json``, which notebook 14 plots (section 7).
Workers run ``--jobs`` at a time; every figure is the same whatever the
number of jobs.

After training, the worker also asks where the model keeps an object's place,
on single-object training scenes: a linear probe (least squares, fitted on two
thirds, scored on the rest) predicts the object's grid cell from (a) the ViT's
output token at that cell and (b) the text decoder's state just before it
names the position ("a small red circle at the ..."), and the decoder's
probability of the right position word there is compared with the wrong ones.

Nothing here asserts a figure; it measures. Expect about 6 CPU minutes per
variant of the demo's 3600 steps.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
CURVE_METRICS = ("i2t_recall@1", "t2i_recall@1", "itm_hard_negative_accuracy",
                 "caption_attribute_accuracy", "caption_colour_accuracy", "caption_shape_accuracy",
                 "caption_size_accuracy", "caption_position_accuracy", "caption_exact_match")

# name -> (what it is, TrainConfig fields on top of the demo's recipe, or None for
# TrainConfig's defaults with the demo's steps)
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "before": ("TrainConfig's defaults: 32x32 images in 8-px patches, a 4x4 patch grid over "
               "the scene's 3x3 cells; learning rate 2e-3; the position table as BLIP's", None),
    "demo": ("the demo's recipe: one 10-px patch per cell, learning rate 3e-3, the position "
             "table at std 1.0 added again at the ViT's output, the LM weighted twice", {}),
    "as_blip": ("the demo's patches and learning rate, the position table and loss weights as "
                "BLIP's (std 0.05, at the input only; ITC, ITM, LM weighed the same)",
                common.AS_BLIP),
    "input_only": ("the demo with the position table at the ViT's input only",
                   {"pos_embed_at_output": False}),
    "small_table": ("the demo with the position table drawn at std 0.05 (init_std)",
                    {"pos_embed_std": None}),
    "lm_weight_1": ("the demo with the three losses weighed the same",
                    {"loss_weights": (1.0, 1.0, 1.0)}),
    "demo_seed_1": ("the demo's recipe with seed 1 (other data, weights and draws)",
                    {"seed": 1}),
    "demo_seed_2": ("the demo's recipe with seed 2", {"seed": 2}),
}


def variant_config(name: str):
    from minblip.demo import demo_config
    from minblip.train import TrainConfig
    _, changes = VARIANTS[name]
    if changes is None:
        return TrainConfig(steps=demo_config().steps)
    return demo_config(**changes)


def position_probe(trainer, n: int = 300) -> dict:
    """Where the trained model keeps an object's grid cell (see the module docstring)."""
    import numpy as np
    from minblip.image import preprocess
    from minblip.softmax import softmax

    task, model, cfg = trainer.task, trainer.model, trainer.cfg
    tok, split = task.tokenizer, task.dataset.train
    single = [i for i, s in enumerate(split.scenes) if len(s.objects) == 1][:n]
    objects = [split.scenes[i].objects[0] for i in single]
    cell = np.array([o.row * 3 + o.col for o in objects])
    embeds, _ = model.encode_image(preprocess(split.images[single], cfg.image_size))
    grid = embeds[:, 1:]
    if grid.shape[1] != 9:
        token = None  # the patches do not match the scene's cells one to one
    else:
        token = grid[np.arange(len(single)), cell]  # the ViT's output at the object's cell
    prompts = [f"a {o.size} {o.colour} {o.shape} at the" for o in objects]
    ids, mask = tok.encode(prompts, max_length=cfg.max_text_len)
    ids, mask = ids[:, :-1], mask[:, :-1]  # no [SEP]: the caption goes on
    ids[:, 0] = tok.dec_id
    decoder = model.text_decoder  # its forward, in two halves, to keep the state between
    h, _ = decoder.bert.forward(ids, mask, embeds, causal=True)
    logits, _ = decoder.head.forward(h)
    state = h[:, -1]
    p = softmax(logits[:, -1].astype(np.float64))
    row_word = np.array([tok.encode([w], max_length=3)[0][0, 1] for w in ("top", "bottom")])
    top_row, bottom_row = cell // 3 == 0, cell // 3 == 2

    def probe(x):
        if x is None:
            return None
        x = np.c_[x.astype(np.float64), np.ones(len(x))]
        fit = 2 * len(x) // 3
        w = np.linalg.lstsq(x[:fit], np.eye(9)[cell[:fit]], rcond=1e-6)[0]
        return float(np.mean((x[fit:] @ w).argmax(1) == cell[fit:]))

    return {"images": len(single), "chance": float(np.bincount(cell).max() / len(cell)),
            "cell_from_vit_token": probe(token), "cell_from_decoder_state": probe(state),
            "p_top_when_top": float(p[top_row, row_word[0]].mean()),
            "p_top_when_bottom": float(p[bottom_row, row_word[0]].mean()),
            "p_bottom_when_bottom": float(p[bottom_row, row_word[1]].mean()),
            "p_bottom_when_top": float(p[top_row, row_word[1]].mean())}


def run_variant(name: str, every: int) -> dict:
    """Train one variant with evaluations every ``every`` steps (in a worker)."""
    import os
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    common.use_repo()
    from minblip.evaluate import evaluate_split
    from minblip.train import blip_trainer

    cfg = variant_config(name)
    start = time.process_time()
    trainer = blip_trainer(cfg)
    setup = time.process_time() - start
    data, tok = trainer.task.dataset, trainer.task.tokenizer
    curve, train_cpu = [], 0.0
    while trainer.step < cfg.steps:
        start = time.process_time()
        trainer.run(until=min(trainer.step + every, cfg.steps), progress=False)
        train_cpu += time.process_time() - start
        metrics, _ = evaluate_split(trainer.model, tok, data.test, cfg.image_size, seed=cfg.seed)
        curve.append({"step": trainer.step, "train_cpu_s": round(train_cpu, 2),
                      **{k: metrics[k] for k in CURVE_METRICS}})
    comp, _ = evaluate_split(trainer.model, tok, data.compositional, cfg.image_size, seed=cfg.seed)
    return {"name": name, "what": VARIANTS[name][0], "config": cfg.to_dict(),
            "setup_cpu_s": round(setup, 2), "params": trainer.model.param_count(),
            "curve": curve, "compositional": {k: comp[k] for k in CURVE_METRICS},
            "losses": {k: trainer.history[k] for k in ("itc", "itm", "lm")},
            "position_probe": position_probe(trainer)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--every", type=int, default=300, help="steps between evaluations")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    p.add_argument("--json", default=str(HERE / "demo_recipe.json"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(run_variant, name, args.every) for name in args.variants}
        runs = {}
        for name, future in futures.items():
            runs[name] = r = future.result()
            last = r["curve"][-1]
            print(f"{name:<12} {last['step']:>5} steps, {last['train_cpu_s']:6.0f} CPU s: "
                  f"R@1 {last['i2t_recall@1']:.3f} / {last['t2i_recall@1']:.3f}, ITM hard "
                  f"{last['itm_hard_negative_accuracy']:.3f}, captions "
                  f"{last['caption_attribute_accuracy']:.3f} (position "
                  f"{last['caption_position_accuracy']:.3f})", flush=True)
    common.write_study("demo_recipe.py", argv, started, runs, args.json, every=args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
