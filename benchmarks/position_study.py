"""Why the demo's captioner cannot say where things are: short runs that isolate it.

    python benchmarks/position_study.py [--jobs 2] [--steps 1500] [--variants NAME ...] [--json PATH]

Trained as BLIP trains (its ViT adds the position table once, at the input; the
three losses weigh the same), the demo named colours, sizes and shapes almost
perfectly and positions at chance. Each variant here trains that recipe
(``minblip.demo.demo_config()`` with ``common.AS_BLIP``) for ``STEPS`` steps with
one thing changed: which objectives train (all three, or the captioner's LM
alone), on which scenes (the world's mix, 9% of whose training scenes hold one
object, or the single-object scenes alone), two changes to the model (a position
table initialised 20 times larger; no weights shared between the text encoder
and the decoder), and the changes the demo made after this study (the table
added again at the ViT's output, ``pos_embed_at_output``; the LM weighted twice).
Every variant trains on the same fixed captions, six drawn once per training
image, so only the named change differs.

Each trained model is then scored three ways, on scenes it never saw:

* ``single_position``: beam-search captions of the 41 single-object scenes of
  the val and test splits, the share whose position phrase is right (the demo's
  caption scoring, ``minblip.world.score_caption``);
* ``single_cell_ranking``: for the same scenes, the decoder's log-likelihood of
  the canonical caption with the object put in each of the 9 cells; the share
  where the true cell scores highest (chance about 1/9: a model that always
  picks one cell is right as often as that cell is the true one, recorded as
  ``single_cell_chance`` for the most frequent cell). This needs no generation, so
  it sees a preference too weak to win a beam;
* ``pair_relation_ranking``: for the test split's two-object scenes, with each
  object first in turn, "a X <relation> a Y" under each of the four relations; the
  share where the best-scored relation is true (one or two of the four hold;
  chance, the share that hold, is recorded beside it).

The results go to ``benchmarks/position_study.json``; notebook 14 (section 7)
reads them. Nothing here asserts a figure. About 12 CPU minutes in all.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
STEPS = 1500
CAPTIONS_PER_IMAGE = 6

# Stands for the demo's own values (minblip.demo.DEMO_RECIPE) of the fields in
# common.AS_BLIP: its position changes, read in the worker, which may import minblip.
DEMO_POSITION = "the demo's position changes"

# name -> (what it is, the scenes trained on, TrainConfig fields on top of
# common.AS_BLIP, or DEMO_POSITION)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "lm_single": ("LM alone, single-object scenes only", "single", {"loss_weights": (0, 0, 1)}),
    "all_single": ("ITC + ITM + LM, single-object scenes only", "single", {}),
    "lm_world": ("LM alone, the world's mix", "world", {"loss_weights": (0, 0, 1)}),
    "all_world": ("ITC + ITM + LM, the world's mix (the demo as BLIP trains, shorter)",
                  "world", {}),
    "big_position_table": ("as BLIP, position table drawn with std 1.0 instead of 0.05",
                           "world", {"pos_embed_std": 1.0}),
    "no_sharing": ("as BLIP, encoder and decoder sharing nothing", "world",
                   {"sharing": "none"}),
    "output_single": ("ITC + ITM + LM, single-object scenes only, with the demo's position "
                      "changes", "single", DEMO_POSITION),
    "output_world": ("the world's mix with the demo's position changes", "world", DEMO_POSITION),
}


def caption_log_likelihood(model, tok, image_embeds, captions, max_length):
    """Sum over the words of log p(word | image, earlier words) under the decoder,
    one caption per image: (N,) float64."""
    import numpy as np
    from minblip.softmax import log_softmax
    ids, mask = tok.encode(captions, max_length=max_length)
    dec = ids.copy()
    dec[:, 0] = tok.dec_id
    logits, _ = model.text_decoder.forward(dec, mask, image_embeds)
    logp = log_softmax(logits[:, :-1].astype(np.float64))  # position t predicts token t+1
    picked = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return (picked * mask[:, 1:]).sum(axis=1)


def rank_scores(model, tok, cfg, data) -> dict:
    """single_position, single_cell_ranking and pair_relation_ranking (module docstring)."""
    import dataclasses
    import numpy as np
    from minblip import world
    from minblip.evaluate import caption_images
    from minblip.image import preprocess

    def words(obj):  # the canonical words of an object, "a small red circle"
        return world.OBJECT_TEMPLATE.format(size=obj.size, colour=obj.colour, shape=obj.shape)
    relations = [phrases[0] for phrases in world.RELATION_PHRASES.values()]  # "left of", ...

    singles = [(split, i) for split in (data.val, data.test)
               for i, s in enumerate(split.scenes) if len(s.objects) == 1]
    scenes = [split.scenes[i] for split, i in singles]
    pixels = preprocess(np.stack([split.images[i] for split, i in singles]), cfg.image_size)
    captions = caption_images(model, tok, pixels)
    marks = [world.score_caption(s, c)["position"] for s, c in zip(scenes, captions)]
    embeds, _ = model.encode_image(pixels)
    cells = [(r, c) for r in range(3) for c in range(3)]
    scores = np.stack([
        caption_log_likelihood(model, tok, embeds, [world.canonical_caption(world.Scene(
            (dataclasses.replace(s.objects[0], row=r, col=c),), s.background))
            for s in scenes], cfg.max_text_len)
        for r, c in cells], axis=1)  # (N, 9)
    truth = [cells.index((s.objects[0].row, s.objects[0].col)) for s in scenes]

    # every two-object test scene twice, once with each object first: a scene lists its
    # objects in (row, col) order, so one order alone would make "above" nearly always true
    two = [i for i, s in enumerate(data.test.scenes) if len(s.objects) == 2]
    pairs = two + two
    pair_embeds, _ = model.encode_image(preprocess(data.test.images[pairs], cfg.image_size))
    phrase = []
    for k, i in enumerate(pairs):
        a, b = data.test.scenes[i].objects[::1 if k < len(two) else -1]
        phrase.append((words(a), words(b)))
    rel_scores = np.stack([
        caption_log_likelihood(model, tok, pair_embeds,
                               [f"{first} {rel} {second}" for first, second in phrase],
                               cfg.max_text_len)
        for rel in relations], axis=1)  # (P, 4)
    # a relation "holds" when the world's own caption scoring marks the caption's position right
    holds = np.array([[world.score_caption(data.test.scenes[i], f"{first} {rel} {second}")[
        "position"] for rel in relations]
        for i, (first, second) in zip(pairs, phrase)])  # (P, 4) bool
    best_holds = holds[np.arange(len(pairs)), rel_scores.argmax(axis=1)]
    return {"singles": len(scenes), "pairs": len(two),
            "single_position": float(np.mean([m is True for m in marks])),
            "single_cell_ranking": float(np.mean(scores.argmax(axis=1) == truth)),
            "single_cell_chance": float(np.bincount(truth).max() / len(truth)),
            "pair_relation_ranking": float(np.mean(best_holds)),
            "pair_relation_chance": float(holds.mean()),
            "example_captions": captions[:4]}


def run_variant(name: str, steps: int = STEPS) -> dict:
    """Train one variant and score it (in a worker process)."""
    import os
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    common.use_repo()
    import numpy as np
    from minblip import world
    from minblip.demo import demo_config
    from minblip.train import blip_trainer, build_dataset

    from minblip.demo import DEMO_RECIPE

    what, scenes_kind, changes = VARIANTS[name]
    if changes == DEMO_POSITION:
        changes = {field: DEMO_RECIPE[field] for field in common.AS_BLIP}
    cfg = demo_config(steps=steps, warmup_steps=min(200, steps // 5),
                      **{**common.AS_BLIP, **changes})
    data = build_dataset(cfg)
    train = data.train
    keep = [i for i, s in enumerate(train.scenes)
            if scenes_kind == "world" or len(s.objects) == 1]
    rng = np.random.default_rng([cfg.seed, 7])
    captions = [[world.describe(train.scenes[i], rng) for _ in range(CAPTIONS_PER_IMAGE)]
                for i in keep]
    trainer = blip_trainer(cfg, dataset=data, train_images=train.images[keep],
                           train_captions=captions)
    start = time.process_time()
    trainer.run(progress=False)
    train_cpu = time.process_time() - start
    scores = rank_scores(trainer.model, trainer.task.tokenizer, cfg, data)
    return {"name": name, "what": what, "scenes": scenes_kind, "changes": changes,
            "training_images": len(keep), "steps": steps, "train_cpu_s": round(train_cpu, 1),
            **scores}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=STEPS, help="training steps of every variant")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    p.add_argument("--json", default=str(HERE / "position_study.json"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    runs = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(run_variant, name, args.steps) for name in args.variants}
        for name, future in futures.items():
            runs[name] = r = future.result()
            print(f"{name:<19} {r['train_cpu_s']:6.0f} CPU s: single-object position "
                  f"{r['single_position']:.2f} (cell ranking {r['single_cell_ranking']:.2f}), "
                  f"pair relation ranking {r['pair_relation_ranking']:.2f} "
                  f"(chance {r['pair_relation_chance']:.2f})  {r['what']}", flush=True)
    common.write_study("position_study.py", argv, started, runs, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
