"""One BLIP-2 stage-1 training step: minblip against its PyTorch twin.

    python benchmarks/bench_blip2_step.py [--threads 1 2] [--repeats 15]

The step mirrors ``minblip.train.Trainer.train_step`` around the stage-1 task
(``minblip.train_blip2.Stage1Training``) on a fixed batch:
``Stage1Config()`` defaults (Q-Former width 64, depth 2, 4 heads, 8 queries,
batch 32, float32) reading a frozen demo-size ViT whose features are computed
once, as the stage-1 task does; zero_grad, ITC + ITM + ITG forward and backward,
gradient clipping, AdamW on the warmup-cosine schedule. The twin
(``reference/torch_twin_blip2.py``) runs the same step in PyTorch with the same
weights, features, batch and ITM negatives (those of a first forward; minblip
keeps sampling its own, which costs microseconds), ITG as minblip computes it
(one pass under the UniLM mask), then ``clip_grad_norm_`` and
``torch.optim.AdamW`` with minblip's decay rule and schedule. For each thread
count, a fresh process alternates the two steps and reports the median time
of each and the median of the per-round ratios minblip / torch (above 1:
minblip is slower). Without PyTorch the ratio is null and the reason is
recorded.
"""
from __future__ import annotations

import sys

import common


def worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    common.use_repo()
    import numpy as np
    from minblip import world
    from minblip.blip2_stage1 import Blip2Stage1, stage1_step
    from minblip.image import preprocess
    from minblip.optim import AdamW, clip_grad_norm, warmup_cosine_lr
    from minblip.train import TrainConfig, build_tokenizer
    from minblip.train_blip2 import Stage1Config
    from minblip.vit import VisionTransformer

    repeats = args.repeats or 15
    tok = build_tokenizer()
    demo = TrainConfig()
    vision = demo.model_config(tok.vocab_size).vision
    cfg = Stage1Config()
    vit = VisionTransformer(vision, np.random.default_rng([0, 1]))
    model = Blip2Stage1(cfg.model_config(tok.vocab_size, vision), np.random.default_rng([0, 11]),
                        visual_encoder=vit)
    optimizer = AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = world.make_dataset(max(64, cfg.batch_size), 1, 1, seed=0, image_size=demo.image_size)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(data.train), cfg.batch_size, replace=False)
    feats = model.frozen_features(preprocess(data.train.images[idx], demo.image_size))
    ids, mask = tok.encode([world.describe(data.train.scenes[i], rng) for i in idx],
                           max_length=cfg.max_text_len)
    step_rng = np.random.default_rng([0, 13])
    count = [0]

    def step():
        optimizer.zero_grad()  # as Trainer.train_step does
        stage1_step(model, None, ids, mask, image_features=feats, dec_id=tok.dec_id,
                    rng=step_rng, weights=cfg.loss_weights)
        clip_grad_norm(optimizer.params, cfg.grad_clip)
        optimizer.step(lr=warmup_cosine_lr(count[0], cfg.steps, cfg.lr, cfg.warmup_steps,
                                           min_lr=cfg.min_lr))
        count[0] += 1

    out = {"threads": threads, "load_average_start": common.load_average(),
           "config": {"width": cfg.width, "depth": cfg.depth, "heads": cfg.heads,
                      "num_queries": cfg.num_queries, "batch_size": cfg.batch_size,
                      "max_text_len": cfg.max_text_len, "dtype": str(model.dtype),
                      "trainable_params": model.param_count(),
                      "frozen_params": vit.param_count(include_frozen=True)}}
    fns = {"minblip": step}
    torch_ok, reason = common.torch_available()
    if torch_ok:  # built before minblip's first update: both start from the same weights
        first = stage1_step(model, None, ids, mask, image_features=feats, dec_id=tok.dec_id,
                            rng=np.random.default_rng(0), weights=cfg.loss_weights,
                            backward=False)  # the ITM negatives the twin will use
        fns["torch"], twin_loss = torch_step(model, tok, cfg, threads, feats, ids, mask,
                                             first.neg_image_idx, first.neg_text_idx)
        out["first_loss"] = {"minblip": first.loss, "torch": twin_loss}
    times = common.interleave(fns, repeats, warmup=3)
    common.record_times(out, times, torch_ok, reason)
    out["load_average_end"] = common.load_average()
    return out


def torch_step(model, tok, cfg, threads: int, *batch):
    """The twin's trainer step (``torch_twin_blip2.TwinTrainer``) with ``model``'s
    current weights on ``batch`` = (features, ids, mask, neg_image_idx,
    neg_text_idx). Returns (step function, the twin's loss before any update)."""
    import torch
    import torch_twin_blip2
    torch.set_num_threads(threads)
    twin = torch_twin_blip2.twin_of(model)
    trainer = torch_twin_blip2.TwinTrainer(
        twin, lr=cfg.lr, min_lr=cfg.min_lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, dec_id=tok.dec_id,
        weights=cfg.loss_weights)
    inputs = tuple(torch.from_numpy(a) for a in batch)
    with torch.no_grad():
        total, _, _ = twin.step(*inputs, dec_id=tok.dec_id, weights=cfg.loss_weights)
    return (lambda: trainer.train_step(*inputs)), float(total)


def measure(threads=common.THREADS, repeats=None) -> dict:
    per = {}
    for n in threads:
        print(f"-- BLIP-2 stage-1 step, {n} thread(s) --", flush=True)
        per[str(n)] = r = common.run_worker("bench_blip2_step.py", n,
                                            ["--repeats", str(repeats)] if repeats else [])
        if "error" in r:
            print(f"   failed: {r['error']}")
            continue
        common.print_step_against_torch(r)
    return {"per_threads": per}


headline = common.ratio_headline


def main(argv=None) -> int:
    args = common.worker_args().parse_args(argv)
    return common.run_script(args, worker, lambda: measure(args.threads, args.repeats))


if __name__ == "__main__":
    sys.exit(main())
