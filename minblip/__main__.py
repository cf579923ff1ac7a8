"""Command line: ``python -m minblip {demo,train,eval,caption,ask,retrieve,capfilt,blip2} ...``.

``demo`` is the main job: it generates the built-in data, pretrains a tiny BLIP
on it, evaluates it and writes a report folder.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

DEMO_LONG_STEPS = 8000


def _train_options(p: argparse.ArgumentParser, steps_default: int | None) -> None:
    from .train import TrainConfig
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=steps_default or d.steps,
                   help="optimiser steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="image-caption pairs per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warmup steps (default: {d.warmup_steps} or a tenth of the "
                        f"steps, whichever is fewer)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the data, the initialisation and the sampling (default %(default)s)")
    p.add_argument("--n-train", type=int, default=d.n_train,
                   help="training images in the generated world (default %(default)s)")
    p.add_argument("--n-test", type=int, default=d.n_test,
                   help="held-out test pairs, all different scenes (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width,
                   help="width of the ViT and the text transformer (default %(default)s)")
    p.add_argument("--depth", type=int, default=d.depth, help="layers in each (default %(default)s)")
    p.add_argument("--sharing", default=d.sharing,
                   choices=["all_but_self_attention", "all", "none"],
                   help="what the text encoder and decoder share (default %(default)s)")


def _config_from(args):
    from .train import TrainConfig
    warmup = args.warmup_steps
    if warmup is None:
        warmup = min(TrainConfig.warmup_steps, args.steps // 10)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       warmup_steps=warmup,
                       n_train=args.n_train, n_test=args.n_test, width=args.width,
                       depth=args.depth, sharing=args.sharing)


def _print_table(metrics: dict) -> None:
    rows = [("image-to-text recall@1", "i2t_recall@1"), ("text-to-image recall@1", "t2i_recall@1"),
            ("image-to-text recall@5", "i2t_recall@5"), ("text-to-image recall@5", "t2i_recall@5"),
            ("ITM accuracy (balanced)", "itm_accuracy"),
            ("ITM accuracy on hard negatives", "itm_hard_negative_accuracy"),
            ("caption attribute accuracy", "caption_attribute_accuracy"),
            ("caption exact match", "caption_exact_match")]
    comp = metrics.get("compositional", {})
    print(f"\n{'measure':<34} {'test':>8} {'compositional':>14}")
    for label, key in rows:
        c = f"{comp[key]:.3f}" if key in comp else "-"
        print(f"{label:<34} {metrics[key]:>8.3f} {c:>14}")
    print(f"{'training time (s)':<34} {metrics['train_seconds']:>8.1f}")


def cmd_demo(args) -> int:
    from .demo import write_demo_report
    from .train import blip_trainer
    cfg = _config_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"minblip demo: {cfg.steps} steps of batch {cfg.batch_size} on {cfg.n_train} "
          f"generated images; report in {out}/")
    trainer = blip_trainer(cfg)
    print(f"model: {trainer.model.param_count():,} parameters")
    trainer.run(progress=not args.quiet, checkpoint_path=out / "checkpoint.npz")
    metrics = write_demo_report(trainer, out)
    _print_table(metrics)
    print(f"\nwrote {out}/metrics.json, plots and checkpoint.npz")
    return 0


def cmd_train(args) -> int:
    from .train import blip_trainer, resume_blip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.npz"
    if args.resume:
        trainer = resume_blip(ckpt)
        print(f"resuming {ckpt} at step {trainer.step} of {trainer.cfg.steps}")
    else:
        trainer = blip_trainer(_config_from(args))
    trainer.run(progress=not args.quiet, checkpoint_path=ckpt)
    print(f"saved {ckpt} (step {trainer.step}, {trainer.train_seconds:.1f} s of training)")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_split
    from .files import write_json_atomic
    from .train import build_dataset, load_model
    model, tok, cfg = load_model(args.checkpoint)
    data = build_dataset(cfg)
    split = getattr(data, args.split)
    metrics, _ = evaluate_split(model, tok, split, cfg.image_size, seed=cfg.seed)
    for key, value in metrics.items():
        print(f"{key:<36} {value:.4f}" if isinstance(value, float) else f"{key:<36} {value}")
    if args.out:
        write_json_atomic(args.out, metrics)
    return 0


def _load_images(paths, image_size):
    from .image import preprocess
    return preprocess([str(p) for p in paths], image_size)


def cmd_caption(args) -> int:
    rng = np.random.default_rng(args.seed)
    if args.from_pretrained:
        # a Hugging Face BlipForConditionalGeneration folder, read by minblip.hf
        from . import hf
        from .generation import generate
        from .wordpiece import WordPieceTokenizer
        folder = Path(args.from_pretrained)
        model = hf.load_blip_captioning(folder)
        tok = WordPieceTokenizer.from_file(folder / "vocab.txt")
        pixels = _load_images(args.images, model.cfg.vision.image_size)
        prompt, sep = hf.caption_token_ids(model, tok.encode(args.prompt)[0][0]
                                           if args.prompt else None)
        max_length = min(20, model.cfg.text.max_positions)  # BLIP's COCO setting: 20 / 5
        for path, image in zip(args.images, pixels):
            embeds, _ = model.visual_encoder.forward(image[None])
            out = generate(model.text_decoder, embeds, prompt, sep_id=sep, method=args.method,
                           max_length=max_length, min_length=min(5, max_length), rng=rng)
            print(f"{path}: {tok.decode(out.tokens[0])}")
        return 0
    from .blip2_checkpoint import is_blip2_checkpoint
    if is_blip2_checkpoint(args.checkpoint):  # a BLIP-2 from 'python -m minblip blip2'
        from .blip2_checkpoint import load_blip2
        from .evaluate_blip2 import stage2_captions
        model, tok, _ = load_blip2(args.checkpoint)
        pixels = _load_images(args.images, model.image_size)
        # Blip2OPT.generate / Blip2T5.generate: beam search with 5 beams, min_length 1
        captions = stage2_captions(model, tok, pixels, prompt=args.prompt, method=args.method,
                                   rng=rng)
    else:
        from .evaluate import caption_images
        from .train import load_model
        model, tok, cfg = load_model(args.checkpoint)
        pixels = _load_images(args.images, cfg.image_size)
        captions = caption_images(model, tok, pixels, method=args.method, prompt=args.prompt,
                                  rng=rng)
    for path, caption in zip(args.images, captions):
        print(f"{path}: {caption}")
    return 0


def cmd_ask(args) -> int:
    from .blip2_checkpoint import describe, is_blip2_checkpoint, load_blip2
    from .evaluate_blip2 import answer_questions
    if not is_blip2_checkpoint(args.checkpoint):
        raise ValueError(f"{args.checkpoint}: 'ask' needs a BLIP-2 checkpoint (the "
                         f"blip2_opt.npz or blip2_t5.npz that 'python -m minblip blip2' writes); "
                         f"this one holds a BLIP")
    model, tok, info = load_blip2(args.checkpoint)
    unknown = sorted({w for w in tok.tokenize(args.question) if tok.token_to_id(w) == tok.unk_id})
    if unknown:
        print(f"note: {', '.join(unknown)} not in the model's vocabulary (read as [UNK]); "
              f"it knows the words of the built-in world's captions and questions",
              file=sys.stderr)
    pixels = _load_images(args.images, model.image_size)
    answers = answer_questions(model, tok, pixels, [args.question] * len(args.images), top=3)
    print(f"{describe(info['config'])}; zero-shot: the question follows the image's soft "
          f"prompt as 'question ... answer'")
    for path, ranked in zip(args.images, answers):
        others = ", ".join(f"{w} {p:.2f}" for w, p in ranked[1:])
        print(f"{path}: {ranked[0][0]}  (p {ranked[0][1]:.2f}; then {others})")
    return 0


def cmd_retrieve(args) -> int:
    from .evaluate import image_features, itm_match_logits, text_features
    from .train import load_model
    model, tok, cfg = load_model(args.checkpoint)
    pixels = _load_images(args.images, cfg.image_size)
    ids, mask = tok.encode([args.text], max_length=cfg.max_text_len)
    embeds, image_feat = image_features(model, pixels)
    sim = (image_feat @ text_features(model, ids, mask).T)[:, 0]
    n = len(args.images)
    itm = itm_match_logits(model, tok, embeds, np.repeat(ids, n, 0), np.repeat(mask, n, 0))
    score = itm[:, 1] + sim  # BLIP's retrieval score: ITM match logit + ITC similarity
    print(f"images ranked for: {args.text!r}")
    for rank, i in enumerate(np.argsort(-score)[:args.top], 1):
        print(f"{rank:>3}. {args.images[i]}  score {score[i]:.3f} (ITC {sim[i]:.3f})")
    return 0


def cmd_capfilt(args) -> int:
    from . import capfilt, capfilt_experiment
    cfg = capfilt.CapFiltConfig(
        noise=args.noise, threshold=args.threshold, n_clean=args.n_clean, n_web=args.n_web,
        n_test=args.n_test, width=args.width, depth=args.depth, batch_size=args.batch_size,
        pretrain_steps=args.steps, finetune_steps=args.finetune_steps)
    out = Path(args.out)
    steps = len(args.seeds) * capfilt.total_steps(cfg)
    print(f"minblip CapFilt: seeds {args.seeds}, web noise {cfg.noise:.0%}, {cfg.n_clean} clean "
          f"+ {cfg.n_web} web images, {steps} optimiser steps in {args.jobs} process(es); "
          f"report in {out}/")
    start = time.perf_counter()
    runs = capfilt_experiment.run_seeds(cfg, args.seeds, jobs=args.jobs, progress=not args.quiet)
    summary = capfilt_experiment.summarize(runs)
    summary["runtime_seconds"] = time.perf_counter() - start
    summary["jobs"] = args.jobs
    capfilt_experiment.write_report(out, runs, summary)
    print("\n" + capfilt_experiment.format_capfilt_table(summary) + "\n\n"
          + capfilt_experiment.format_difference_table(summary) + "\n\n"
          + capfilt_experiment.format_filter_table(summary))
    print(f"\n{summary['runtime_seconds']:.0f} s; wrote {out}/metrics.json, table.md, "
          f"texts.jsonl and plots")
    return 0


def cmd_blip2(args) -> int:
    from .blip2_pipeline import Blip2RunConfig, format_blip2_table, run_blip2
    cfg = Blip2RunConfig(seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                         batch_size=args.batch_size, vision_steps=args.vision_steps,
                         stage1_steps=args.stage1_steps, num_queries=args.num_queries,
                         lm_steps=args.lm_steps, stage2_steps=args.stage2_steps,
                         stage2_init=args.stage2_init, language_models=args.language_models)
    out = Path(args.out)
    if args.ablation:
        from .blip2_experiment import AblationConfig, format_ablation_tables, run_ablation
        ablation = AblationConfig(run=cfg, seeds=tuple(args.seeds))
        print(f"minblip BLIP-2 ablations: seeds {list(ablation.seeds)}, {args.jobs} "
              f"process(es); report in {out}/")
        summary = run_ablation(out, ablation, vision_checkpoint=args.vision_checkpoint,
                               jobs=args.jobs, log=print)
        print("\n" + format_ablation_tables(summary))
        print(f"\nwrote {out}/metrics.json, tables.md and plots")
        return 0
    print(f"minblip BLIP-2: a frozen ViT, stage 1, frozen language models "
          f"({', '.join(cfg.language_models)}) and stage 2 on {cfg.n_train} generated images, "
          f"{args.jobs} process(es); report in {out}/")
    metrics = run_blip2(out, cfg, vision_checkpoint=args.vision_checkpoint, jobs=args.jobs,
                        progress=not args.quiet, log=print)
    print("\n" + format_blip2_table(metrics))
    kinds = ", ".join(f"blip2_{k}.npz" for k in cfg.language_models)
    print(f"\nwrote {out}/metrics.json, {kinds}, captions and answers (.jsonl) and plots; "
          f"try: python -m minblip ask IMAGE \"what colour is the circle\" --checkpoint "
          f"{out}/blip2_{cfg.language_models[0]}.npz")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minblip",
        description="BLIP from scratch in NumPy: pretrain, evaluate and use a tiny model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate data, pretrain a tiny BLIP, evaluate, write a report",
                       description="The main job: generate the built-in world, pretrain a tiny "
                                   "BLIP (ITC + ITM + LM) on it, evaluate retrieval, matching and "
                                   "captioning on held-out scenes, and write a report folder.")
    _train_options(p, None)
    p.add_argument("--long", action="store_true",
                   help=f"train {DEMO_LONG_STEPS} steps instead (under 15 minutes on two cores)")
    p.add_argument("--out", default="runs/demo", help="report folder (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="pretrain and save a checkpoint (resumable)")
    _train_options(p, None)
    p.add_argument("--out", required=True, help="folder for checkpoint.npz")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split of the built-in world")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["val", "test", "compositional"])
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="caption image files with a checkpoint")
    p.add_argument("images", nargs="+", help="image files (any format pillow reads)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a minblip checkpoint: a BLIP's checkpoint.npz, or "
                                             "a BLIP-2's blip2_opt.npz / blip2_t5.npz")
    source.add_argument("--from-pretrained", metavar="DIR",
                        help="a Hugging Face BlipForConditionalGeneration folder: config.json, "
                             "model.safetensors, vocab.txt")
    p.add_argument("--method", default="beam", choices=["beam", "greedy", "nucleus"])
    p.add_argument("--prompt", default="", help="text the caption must start with")
    p.add_argument("--seed", type=int, default=0, help="seed for nucleus sampling")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("ask", help="answer a question about image files, zero-shot, with a "
                                   "BLIP-2 checkpoint",
                       description="BLIP-2's instructed zero-shot answers: the image's soft "
                                   "prompt, then 'question <QUESTION> answer', and the frozen "
                                   "language model's most likely next word. Stage 2 never "
                                   "trained on questions; the language model learned them "
                                   "from text. Prints the answer and the two runners-up.")
    p.add_argument("images", nargs="+", help="image files (any format pillow reads)")
    p.add_argument("question", help='the question, e.g. "what colour is the circle?"')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a BLIP-2 checkpoint from 'python -m minblip "
                                             "blip2' (blip2_opt.npz or blip2_t5.npz)")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("retrieve", help="rank image files for a text query")
    p.add_argument("images", nargs="+")
    p.add_argument("--text", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=cmd_retrieve)

    from .capfilt import CapFiltConfig
    from .capfilt_experiment import default_jobs
    d = CapFiltConfig()
    p = sub.add_parser("capfilt", help="bootstrap a clean dataset from noisy web captions "
                                       "(CapFilt) and measure whether it helps",
                       description="BLIP's CapFilt on the built-in world: pretrain on clean + "
                                   "noisy web pairs, fine-tune a captioner and a filter, "
                                   "bootstrap the web set, pretrain fresh models on four "
                                   "training sets (BLIP Table 1) and compare them over seeds.")
    p.add_argument("--out", default="runs/capfilt", help="report folder (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one full pipeline per seed (default %(default)s)")
    p.add_argument("--noise", type=float, default=d.noise,
                   help="fraction of web captions corrupted, in [0, 1] (default %(default)s)")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help="keep a text when the filter's p(match) is above this, in (0, 1) "
                        "(default %(default)s)")
    p.add_argument("--steps", type=int, default=d.pretrain_steps,
                   help="steps of each pretraining (default %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                   help="steps of each fine-tune, captioner and filter (default %(default)s)")
    p.add_argument("--n-clean", type=int, default=d.n_clean,
                   help=f"clean images, {d.clean_captions_per_image} captions each "
                        f"(default %(default)s)")
    p.add_argument("--n-web", type=int, default=d.n_web,
                   help="web images, one caption each (default %(default)s)")
    p.add_argument("--n-test", type=int, default=d.n_test,
                   help="clean test pairs for evaluation (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="image-text pairs per step, at most --n-clean (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="model width (default %(default)s)")
    p.add_argument("--depth", type=int, default=d.depth,
                   help="layers of the ViT and the text transformer (default %(default)s)")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="worker processes for the trainings (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_capfilt)

    from .blip2_pipeline import LANGUAGE_MODELS, STAGE2_INITS, Blip2RunConfig
    b = Blip2RunConfig()
    p = sub.add_parser("blip2", help="BLIP-2 on the built-in world: frozen ViT, stage 1, "
                                     "frozen LM, stage 2, zero-shot questions",
                       description="BLIP-2 at toy scale: freeze a ViT, train a Q-Former on it "
                                   "(stage 1: ITC, ITM, ITG), pretrain and freeze a small "
                                   "language model, connect the two by soft prompts (stage 2), "
                                   "then measure retrieval, captions and zero-shot answers on "
                                   "held-out images and write a report folder.")
    p.add_argument("--out", default="runs/blip2", help="report folder (default %(default)s)")
    p.add_argument("--vision-checkpoint", metavar="PATH",
                   help="a BLIP checkpoint.npz ('demo' writes runs/demo/checkpoint.npz) whose "
                        "ViT is frozen; default: train a short ITC-only BLIP first")
    p.add_argument("--seed", type=int, default=b.seed,
                   help="seed of the data, the initialisations and the sampling "
                        "(default %(default)s)")
    p.add_argument("--n-train", type=int, default=b.n_train,
                   help="training images of both stages (default %(default)s)")
    p.add_argument("--n-test", type=int, default=b.n_test,
                   help="held-out images for every measurement (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=b.batch_size,
                   help="pairs per step in every training (default %(default)s)")
    p.add_argument("--vision-steps", type=int, default=b.vision_steps,
                   help="steps of the ITC-only BLIP that trains the frozen ViT, when no "
                        "--vision-checkpoint is given (default %(default)s)")
    p.add_argument("--stage1-steps", type=int, default=b.stage1_steps,
                   help="stage-1 steps (default %(default)s)")
    p.add_argument("--num-queries", type=int, default=b.num_queries,
                   help="learned queries of the Q-Former (default %(default)s)")
    p.add_argument("--language-models", nargs="+", default=list(b.language_models),
                   choices=LANGUAGE_MODELS,
                   help="the frozen language models, one stage 2 each: opt (decoder-only) "
                        "and/or t5 (encoder-decoder) (default: %(default)s)")
    p.add_argument("--lm-steps", type=int, default=b.lm_steps,
                   help="pretraining steps of each language model (default %(default)s)")
    p.add_argument("--stage2-steps", type=int, default=b.stage2_steps,
                   help="stage-2 steps (default %(default)s)")
    p.add_argument("--stage2-init", default=b.stage2_init, choices=STAGE2_INITS,
                   help="start stage 2 from the stage-1 Q-Former (BLIP-2's recipe), a fresh "
                        "one, or stage 1 with the language model trained too (default "
                        "%(default)s)")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="processes: 2 pretrains the language models and runs one stage 2 in a "
                        "worker (the most one run uses); --ablation runs its trainings in "
                        "this many workers; the numbers are the same (default %(default)s)")
    p.add_argument("--ablation", action="store_true",
                   help="instead of one run, the paper's three ablations over --seeds: stage 2 "
                        "from stage 1 / fresh / unfrozen, stage 1 with and without ITG, 1-32 "
                        "queries (see docs/blip2_results.md)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of --ablation (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_blip2)
    return parser


def keep_freed_memory() -> None:
    """Speed trick for long runs: glibc hands large freed blocks back to the
    operating system, so every step's NumPy temporaries are page-faulted in
    again (benchmarks/README.md measures the cost); these two ``mallopt`` settings
    (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) keep them in the heap for reuse. A
    no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)
        libc.mallopt(-1, 1 << 30)
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if getattr(args, "long", False):
        args.steps = DEMO_LONG_STEPS
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
