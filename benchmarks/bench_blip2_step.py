"""One BLIP-2 stage-1 training step (``minblip.blip2.stage1_step``), and its
ratio to a PyTorch twin when one exists.

    python benchmarks/bench_blip2_step.py [--threads 1 2] [--repeats 15]

The step mirrors ``minblip.blip2.Stage1Trainer.train_step`` on a fixed batch:
``Stage1Config()`` defaults (Q-Former width 64, depth 2, 4 heads, 8 queries,
batch 32) reading a frozen demo-size ViT whose features are computed once, as
the trainer does; zero_grad, ITC + ITM + ITG forward and backward, gradient
clipping, AdamW. The ratio against PyTorch needs a twin of the whole stage-1
step (like ``reference/torch_twin.py`` for BLIP), expected in
``reference/torch_twin_blip2.py``. While there is none, the ratio is null with
the reason, and only minblip's own step time is reported.
"""
from __future__ import annotations

import sys

import common

TWIN = common.ROOT / "reference" / "torch_twin_blip2.py"


def twin_status() -> str | None:
    """None if a stage-1 twin can be timed, else the reason it cannot."""
    if not TWIN.exists():
        return ("no PyTorch twin of the BLIP-2 stage-1 step exists (reference/ has only the "
                "BLIP twin; tests/test_torch_parity.py compares the Q-Former forward alone)")
    return ("reference/torch_twin_blip2.py exists but this benchmark does not drive it yet: "
            "add it to benchmarks/bench_blip2_step.py as bench_train_step.py does for BLIP")


def worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    common.use_repo()
    import numpy as np
    from minblip import world
    from minblip.blip2 import Blip2Stage1, Stage1Config, stage1_step
    from minblip.image import preprocess
    from minblip.optim import AdamW, clip_grad_norm, warmup_cosine_lr
    from minblip.train import TrainConfig, build_tokenizer
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
        model.zero_grad()
        stage1_step(model, None, ids, mask, image_features=feats, dec_id=tok.dec_id,
                    rng=step_rng, weights=cfg.loss_weights)
        clip_grad_norm(model, cfg.grad_clip)
        optimizer.step(lr=warmup_cosine_lr(count[0], cfg.steps, cfg.lr, cfg.warmup_steps,
                                           min_lr=cfg.min_lr))
        count[0] += 1

    out = {"threads": threads, "load_average_start": common.load_average(),
           "config": {"width": cfg.width, "depth": cfg.depth, "heads": cfg.heads,
                      "num_queries": cfg.num_queries, "batch_size": cfg.batch_size,
                      "trainable_params": model.param_count(),
                      "frozen_params": vit.param_count()}}
    times = common.interleave({"minblip": step}, repeats, warmup=3)
    out["minblip"] = common.summary_ms(times["minblip"])
    out["torch"] = out["ratio"] = None
    out["reason"] = twin_status()
    out["load_average_end"] = common.load_average()
    return out


def measure(threads=common.THREADS, repeats=None) -> dict:
    per = {}
    for n in threads:
        print(f"-- BLIP-2 stage-1 step, {n} thread(s) --", flush=True)
        per[str(n)] = r = common.run_worker("bench_blip2_step.py", n,
                                            ["--repeats", str(repeats)] if repeats else [])
        if "error" in r:
            print(f"   failed: {r['error']}")
            continue
        print(f"   minblip {r['minblip']['median_ms']:.1f} ms (min {r['minblip']['min_ms']:.1f}); "
              f"ratio to torch: {r['ratio']} ({r['reason']})")
    return {"per_threads": per}


def headline(result: dict, threads: str = "1"):
    r = result["per_threads"].get(threads)
    if r is None:
        return None, f"not measured with {threads} thread(s)"
    if "error" in r:
        return None, r["error"]
    if r["ratio"] is None:
        return None, r["reason"]
    return r["ratio"]["median"], None


def main(argv=None) -> int:
    args = common.worker_args().parse_args(argv)
    if args.worker:
        common.write_result(args.result, worker(args))
        return 0
    common.write_result(args.json, measure(args.threads, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
