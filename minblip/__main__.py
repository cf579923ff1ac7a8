"""Command line: ``python -m minblip {demo,train,eval,caption,ask,retrieve,capfilt,blip2} ...``.

``demo`` is the main job: it generates the built-in data, pretrains a tiny BLIP
on it, evaluates it and writes a report folder.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys
import time
from pathlib import Path

import numpy as np

DEMO_LONG_STEPS = 8000


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``, or argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


# The options of a BLIP pretraining run, by TrainConfig field. Their default is
# None, so that `train --resume` can tell an option given from one left out.
_RUN_OPTIONS = ("steps", "batch_size", "lr", "warmup_steps", "seed", "n_train", "n_test",
                "width", "depth", "sharing", "checkpoint_every")


def _train_options(p: argparse.ArgumentParser) -> None:
    from .demo import demo_config
    d = demo_config()
    p.add_argument("--steps", type=int, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch-size", type=int,
                   help=f"image-caption pairs per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"linear warmup steps (default: {d.warmup_steps} or a tenth of the "
                        f"steps, whichever is fewer)")
    p.add_argument("--seed", type=_int_at_least(0),
                   help=f"seed of the data, the initialisation and the sampling "
                        f"(default {d.seed})")
    p.add_argument("--n-train", type=int,
                   help=f"training images in the generated world (default {d.n_train})")
    p.add_argument("--n-test", type=int,
                   help=f"held-out test pairs, all different scenes (default {d.n_test})")
    p.add_argument("--width", type=int,
                   help=f"width of the ViT and the text transformer (default {d.width})")
    p.add_argument("--depth", type=int, help=f"layers in each (default {d.depth})")
    p.add_argument("--sharing", choices=["all_but_self_attention", "all", "none"],
                   help=f"what the text encoder and decoder share (default {d.sharing})")
    p.add_argument("--save-every", dest="checkpoint_every", type=_int_at_least(0), metavar="N",
                   help=f"write the checkpoint every N steps, and at the end; 0: at the end "
                        f"only (the run's checkpoint_every; default {d.checkpoint_every})")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if OUT holds another run's checkpoint, which "
                        "the new run replaces at its first save")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _given_options(args) -> dict:
    """{TrainConfig field: value} of the run options given on the command line."""
    return {name: getattr(args, name) for name in _RUN_OPTIONS if getattr(args, name) is not None}


def _config_from(args):
    from .demo import demo_config
    given = _given_options(args)
    if "warmup_steps" not in given:
        steps = given.get("steps", demo_config().steps)
        given["warmup_steps"] = min(demo_config().warmup_steps, steps // 10)
    return demo_config(**given)


def _refuse_to_replace(checkpoint: Path, overwrite: bool, how_to_continue: str) -> None:
    """A new run in a folder holding another run's checkpoint needs --overwrite."""
    from .checkpoint import read_header
    if overwrite or not checkpoint.exists():
        return
    try:
        header = read_header(checkpoint)
        what = (f"the checkpoint of another run (step {header['step']} of "
                f"{header['config'].get('steps', '?')})")
    except ValueError:
        what = "a file that is not a readable checkpoint"
    raise ValueError(f"{checkpoint} holds {what}; {how_to_continue}, or pass --overwrite to "
                     f"start a new run that replaces it at its first save")


def _check_writable(checkpoint: Path, trainer) -> None:
    """Write and remove a file of the checkpoint's size where it will go, before
    step 1: a read-only, full or mistyped folder fails now, not after training."""
    from .files import probe_writable
    # a checkpoint holds each trainable Param and AdamW's two moments of it
    probe_writable(checkpoint, 3 * sum(p.data.nbytes for p in trainer.optimizer.params))


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
    _refuse_to_replace(out / "checkpoint.npz", args.overwrite, "choose another --out")
    print(f"minblip demo: {cfg.steps} steps of batch {cfg.batch_size} on {cfg.n_train} "
          f"generated images; report in {out}/")
    trainer = blip_trainer(cfg)
    _check_writable(out / "checkpoint.npz", trainer)
    print(f"model: {trainer.model.param_count():,} parameters")
    trainer.run(progress=not args.quiet, checkpoint_path=out / "checkpoint.npz", log=print)
    metrics = write_demo_report(trainer, out)
    _print_table(metrics)
    print(f"\nwrote {out}/metrics.json, plots and checkpoint.npz")
    return 0


def cmd_train(args) -> int:
    from .checkpoint import read_config
    from .train import blip_trainer, resume_blip
    ckpt = Path(args.out) / "checkpoint.npz"
    if args.resume:
        if args.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                             "give one of them")
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: no checkpoint to resume; leave out --resume to "
                                    f"start a new run there")
        saved = read_config(ckpt)
        trainer = resume_blip(ckpt, changes=_given_options(args))
        changed = [f"{key} {saved.get(key)!r} -> {value!r}"
                   for key, value in trainer.cfg.to_dict().items() if saved.get(key) != value]
        print(f"resuming {ckpt} at step {trainer.step} of {trainer.cfg.steps}"
              + (f"; changed: {', '.join(changed)}" if changed else ""))
    else:
        _refuse_to_replace(ckpt, args.overwrite, "continue it with --resume")
        trainer = blip_trainer(_config_from(args))
    _check_writable(ckpt, trainer)
    trainer.run(progress=not args.quiet, checkpoint_path=ckpt, log=print)
    print(f"saved {ckpt} (step {trainer.step}, {trainer.train_seconds:.1f} s of training)")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_split
    from .files import probe_writable, write_json_atomic
    from .train import build_dataset, load_model
    if args.out:  # before the evaluation, not after it
        if Path(args.out).is_dir():
            raise IsADirectoryError(errno.EISDIR, "a folder", args.out)
        probe_writable(args.out)
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


# ---- Hugging Face folders and model names (--from-pretrained) ------------------------
# Decoding defaults per model when an option is not given, each the reference's own:
# BLIP's captioner (salesforce/BLIP demo: 3 beams, 20 / 5 tokens counting [DEC] and the
# prompt), BLIP's VQA (BLIP_VQA.forward: 3 beams, 10 / 1), BLIP-2 (LAVIS
# Blip2OPT.generate and predict_answers: 5 beams, 30 / 1 new tokens for a caption,
# 10 / 1 for an answer, after BOS and the prompt).
BLIP2_PROMPT = "Question: {} Answer:"  # LAVIS's prompt for BLIP-2 OPT questions


def _pretrained(args):
    """(folder, family): the folder of --from-pretrained (a folder, or a model name
    found in the local Hugging Face cache or, with --download, fetched), and
    "blip-2" or the BLIP kind its config.json names."""
    from . import hf
    from .hf_hub import resolve_pretrained
    folder = resolve_pretrained(args.from_pretrained, download=args.download)
    config = hf.read_hf_config(folder)
    if config.get("model_type") == "blip-2":
        return folder, "blip-2"
    return folder, hf.blip_kind(config, folder)


def _decoding(args, rng, *, beams: int, max_length: int, min_length: int,
              repetition_penalty=None) -> dict:
    """The options of minblip.generation.generate: the command line's, else the defaults."""
    return dict(method=args.method, num_beams=args.beams or beams,
                max_length=args.max_length or max_length,
                min_length=min_length if args.min_length is None else args.min_length,
                repetition_penalty=repetition_penalty, rng=rng)


def _blip2_generate(folder, args, rng, prompt_text: str, new_tokens: int):
    """BLIP-2 (OPT) on args.images after ``prompt_text`` -> (full ids per image, the
    tokenizer, the prompt's length in tokens)."""
    from .bpe import ByteLevelBPETokenizer
    from .hf_blip2 import blip2_generate, load_blip2
    model = load_blip2(folder)
    tok = ByteLevelBPETokenizer.from_folder(folder)
    prompt = tok.encode(prompt_text) if prompt_text else np.array([model.configs.bos_id])
    P = len(prompt)
    room = model.language_model.cfg.max_positions - model.num_queries
    decoding = _decoding(args, rng, beams=5, max_length=min(P + new_tokens, room),
                         min_length=P + 1, repetition_penalty=1.0)  # LAVIS: no penalty
    pixels = _load_images(args.images, model.image_size)
    return blip2_generate(model, pixels, prompt, **decoding), tok, P


def _caption_pretrained(folder, family: str, args, rng) -> list[str]:
    """Captions as the Hugging Face model's generate and decode make them: the prompt
    is part of the caption."""
    if family == "blip-2":
        outs, tok, _ = _blip2_generate(folder, args, rng, args.prompt, new_tokens=30)
        return [tok.decode(ids).strip() for ids in outs]
    if family != "captioning":
        raise ValueError(f"{folder}: caption needs a BlipForConditionalGeneration or a BLIP-2 "
                         f"folder, this one is a BLIP {family} model")
    from . import hf
    from .wordpiece import WordPieceTokenizer
    model = hf.load_blip_captioning(folder)
    tok = WordPieceTokenizer.from_file(folder / "vocab.txt")
    prompt = tok.encode(args.prompt)[0][0] if args.prompt else None
    decoding = _decoding(args, rng, beams=3, max_length=min(20, model.cfg.text.max_positions),
                         min_length=5)
    pixels = _load_images(args.images, model.cfg.vision.image_size)
    return [tok.decode(ids) for ids in hf.caption_generate(model, pixels, prompt, **decoding)]


def _answers_pretrained(folder, family: str, args, rng) -> list[str]:
    """Answers to args.question: BlipForQuestionAnswering's, or BLIP-2's after
    "Question: ... Answer:" (the answer alone, without the prompt)."""
    if family == "blip-2":
        outs, tok, P = _blip2_generate(folder, args, rng, BLIP2_PROMPT.format(args.question),
                                       new_tokens=10)
        return [tok.decode(ids[P:]).strip() for ids in outs]
    if family != "vqa":
        raise ValueError(f"{folder}: ask needs a BlipForQuestionAnswering or a BLIP-2 folder, "
                         f"this one is a BLIP {family} model")
    from . import hf
    from .wordpiece import WordPieceTokenizer
    model = hf.load_blip_vqa(folder)
    tok = WordPieceTokenizer.from_file(folder / "vocab.txt")
    ids, mask = tok.encode([args.question] * len(args.images),
                           max_length=model.cfg.text.max_positions)
    decoding = _decoding(args, rng, beams=3, max_length=10, min_length=1)
    pixels = _load_images(args.images, model.cfg.vision.image_size)
    return [tok.decode(a) for a in hf.vqa_generate(model, pixels, ids, mask, **decoding)]


def _no_download_without_pretrained(args) -> None:
    if args.download and not args.from_pretrained:
        raise ValueError("--download fetches a --from-pretrained model name; it has nothing "
                         "to do without one")


def cmd_caption(args) -> int:
    from .blip2_checkpoint import is_blip2_checkpoint
    _no_download_without_pretrained(args)
    rng = np.random.default_rng(args.seed)
    if args.from_pretrained:
        captions = _caption_pretrained(*_pretrained(args), args, rng)
    elif is_blip2_checkpoint(args.checkpoint):  # a BLIP-2 from 'python -m minblip blip2'
        from .blip2_checkpoint import load_blip2
        from .evaluate_blip2 import stage2_captions
        model, tok, _ = load_blip2(args.checkpoint)
        pixels = _load_images(args.images, model.image_size)
        # Blip2OPT.generate / Blip2T5.generate: beam search with 5 beams, min_length 1
        captions = stage2_captions(model, tok, pixels, prompt=args.prompt, method=args.method,
                                   num_beams=args.beams or 5, max_length=args.max_length or 20,
                                   min_length=1 if args.min_length is None else args.min_length,
                                   rng=rng)
    else:
        from .evaluate import caption_images
        from .train import load_model
        model, tok, cfg = load_model(args.checkpoint)
        pixels = _load_images(args.images, cfg.image_size)
        captions = caption_images(model, tok, pixels, method=args.method, prompt=args.prompt,
                                  max_length=args.max_length or 20,
                                  min_length=5 if args.min_length is None else args.min_length,
                                  num_beams=args.beams or 3, rng=rng)
    if not args.from_pretrained:  # minblip's captioners return the words after the prompt
        captions = [f"{args.prompt} {c}".strip() for c in captions]
    for path, caption in zip(args.images, captions):
        print(f"{path}: {caption}")
    return 0


def cmd_ask(args) -> int:
    _no_download_without_pretrained(args)
    rng = np.random.default_rng(args.seed)
    if args.from_pretrained:
        answers = _answers_pretrained(*_pretrained(args), args, rng)
        for path, answer in zip(args.images, answers):
            print(f"{path}: {answer}")
        return 0
    return _ask_blip2(args)


def _ask_blip2(args) -> int:
    """Zero-shot answers of a minblip BLIP-2 checkpoint: the most likely answer
    word and the two runners-up."""
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


def _retrieval_scores(args):
    """(score, ITC similarity) per image for args.text: BLIP's retrieval score, ITM match
    logit + ITC cosine similarity, from a minblip checkpoint or a Hugging Face
    BlipForImageTextRetrieval folder (which feeds ITM the text's [CLS] as HF does)."""
    if args.from_pretrained:
        from . import hf
        from .wordpiece import WordPieceTokenizer
        folder, family = _pretrained(args)
        if family != "retrieval":
            raise ValueError(f"{folder}: retrieve needs a BlipForImageTextRetrieval folder, "
                             f"this one is {family!r}")
        model = hf.load_blip_retrieval(folder)
        tok = WordPieceTokenizer.from_file(folder / "vocab.txt")
        pixels = _load_images(args.images, model.cfg.vision.image_size)
        ids, mask = tok.encode([args.text], max_length=model.cfg.text.max_positions)
        embeds, image_feat = model.encode_image(pixels)
        sim = (image_feat @ model.encode_text(ids, mask).T)[:, 0]
        n = len(args.images)
        itm = model.itm_logits(embeds, np.repeat(ids, n, 0), np.repeat(mask, n, 0), tok.cls_id)
        return itm[:, 1] + sim, sim
    from .evaluate import image_features, itm_match_logits, text_features
    from .train import load_model
    model, tok, cfg = load_model(args.checkpoint)
    pixels = _load_images(args.images, cfg.image_size)
    ids, mask = tok.encode([args.text], max_length=cfg.max_text_len)
    embeds, image_feat = image_features(model, pixels)
    sim = (image_feat @ text_features(model, ids, mask).T)[:, 0]
    n = len(args.images)
    itm = itm_match_logits(model, tok, embeds, np.repeat(ids, n, 0), np.repeat(mask, n, 0))
    return itm[:, 1] + sim, sim


def cmd_retrieve(args) -> int:
    _no_download_without_pretrained(args)
    score, sim = _retrieval_scores(args)
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


def _pretrained_option(group, models: str, example: str) -> None:
    group.add_argument("--from-pretrained", metavar="DIR_OR_NAME",
                       help=f"{models} Hugging Face model: a folder (config.json, "
                            f"safetensors, vocab.txt or vocab.json + merges.txt) or a model "
                            f"name such as {example}, found in the local Hugging Face cache "
                            f"($HF_HUB_CACHE or $HF_HOME/hub)")


def _download_option(p) -> None:
    p.add_argument("--download", action="store_true",
                   help="fetch a --from-pretrained model name missing from the local cache "
                        "(needs the optional huggingface_hub; nothing is fetched otherwise)")


def _decoding_options(p, defaults: str) -> None:
    p.add_argument("--method", default="beam", choices=["beam", "greedy", "nucleus"],
                   help="decoding (default %(default)s)")
    p.add_argument("--beams", type=_int_at_least(1), default=None,
                   help="beams of beam search (default: see below)")
    p.add_argument("--max-length", type=_int_at_least(1), default=None,
                   help="the longest text in tokens, counting the start token and the prompt, "
                        "as Hugging Face's generate(max_length=) counts them for BLIP (for "
                        "BLIP-2 HF also counts its query placeholders, minblip does not)")
    p.add_argument("--min-length", type=_int_at_least(0), default=None,
                   help="no end token before this many tokens, counted as --max-length")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed for nucleus sampling")
    p.epilog = f"Defaults of the decoding options: {defaults}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minblip",
        description="BLIP from scratch in NumPy: pretrain, evaluate and use a tiny model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate data, pretrain a tiny BLIP, evaluate, write a report",
                       description="The main job: generate the built-in world, pretrain a tiny "
                                   "BLIP (ITC + ITM + LM) on it, evaluate retrieval, matching and "
                                   "captioning on held-out scenes, and write a report folder.")
    _train_options(p)
    p.add_argument("--long", action="store_true",
                   help=f"train {DEMO_LONG_STEPS} steps instead (under 15 minutes on two cores)")
    p.add_argument("--out", default="runs/demo", help="report folder (default %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="pretrain and save a checkpoint (resumable)")
    _train_options(p)
    p.add_argument("--out", required=True, help="folder for checkpoint.npz")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.npz; only --steps (more of them) and "
                        "--save-every may differ from the saved run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split of the built-in world")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["val", "test", "compositional"])
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="caption image files with a checkpoint or a Hugging "
                                       "Face BLIP / BLIP-2 model",
                       description="Caption image files. The caption starts with the prompt "
                                   "when one is given, as Hugging Face's decode prints it.")
    p.add_argument("images", nargs="+", help="image files (any format pillow reads)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a minblip checkpoint: a BLIP's checkpoint.npz, or "
                                             "a BLIP-2's blip2_opt.npz / blip2_t5.npz")
    _pretrained_option(source, "a BlipForConditionalGeneration or a BLIP-2 (OPT)",
                       "Salesforce/blip-image-captioning-base")
    _download_option(p)
    _decoding_options(p, "BLIP: beam search with 3 beams, 20 / 5 tokens counting [DEC] and the "
                         "prompt (BLIP's demo); BLIP-2: 5 beams, 30 / 1 new tokens after BOS and "
                         "the prompt (LAVIS)")
    p.add_argument("--prompt", default="",
                   help="text the caption must start with (BLIP's captioner: 'a picture of'; "
                        "BLIP-2: 'a photo of'); the printed caption includes it")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("ask", help="answer a question about image files with a Hugging Face "
                                   "BLIP VQA or BLIP-2 model",
                       description="Answer one question about each image: with "
                                   "BlipForQuestionAnswering (the question is encoded with the "
                                   "image, the answer decoded from it), or with BLIP-2 prompted "
                                   "'Question: ... Answer:' as LAVIS does. Prints the answer.")
    p.add_argument("images", nargs="+", help="image files (any format pillow reads)")
    p.add_argument("question", help="the question, e.g. \"what is the woman wearing?\"")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a BLIP-2 checkpoint from 'python -m minblip "
                                             "blip2' (blip2_opt.npz or blip2_t5.npz): the "
                                             "image's soft prompt, then 'question <QUESTION> "
                                             "answer', and the frozen language model's most "
                                             "likely next word; prints it and the two runners-up")
    _pretrained_option(source, "a BlipForQuestionAnswering or a BLIP-2 (OPT)",
                       "Salesforce/blip-vqa-base")
    _download_option(p)
    _decoding_options(p, "BLIP VQA: beam search with 3 beams, 10 / 1 tokens counting [DEC] "
                         "(salesforce/BLIP); BLIP-2: 5 beams, 10 / 1 new tokens after the "
                         "prompt (LAVIS)")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("retrieve", help="rank image files for a text query")
    p.add_argument("images", nargs="+")
    p.add_argument("--text", required=True, help="the text query")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a minblip checkpoint.npz")
    _pretrained_option(source, "a BlipForImageTextRetrieval", "Salesforce/blip-itm-base-coco")
    _download_option(p)
    p.add_argument("--top", type=_int_at_least(1), default=5,
                   help="how many of the ranked images to print (default %(default)s)")
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


# What to do about a file-system error, by errno: the message names the path too.
_WHAT_TO_DO = {
    errno.ENOENT: "check the path",
    errno.EEXIST: "choose another path, or remove what is there",
    errno.EISDIR: "give the path of a file, not of a folder",
    errno.ENOTDIR: "it, or a folder on the way to it, is a file: choose another path",
    errno.EACCES: "choose a place you may write to, or change its permissions",
    errno.EPERM: "choose a place you may write to, or change its permissions",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOSPC: "free some space or choose another disk; the file there, if any, is unchanged",
}

EXIT_BAD_INPUT = 2     # a bad option, file or path, and every file-system error
EXIT_DIVERGED = 3      # training diverged: stopped before a NaN reached any weight or file
EXIT_INTERRUPTED = 130


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error: the path, what went wrong, what to do."""
    if err.errno is None or err.filename is None:
        return str(err)  # raised with a whole message, which names its path
    path = os.fspath(err.filename)
    if err.filename2 is not None:
        path = f"{path} -> {os.fspath(err.filename2)}"
    advice = _WHAT_TO_DO.get(err.errno)
    return f"{path}: {err.strerror}" + (f"; {advice}" if advice else "")


def main(argv=None) -> int:
    """Run one subcommand. Every error the user can cause ends in one line on
    stderr and a non-zero exit code, never a traceback: a bad option, file or
    path (including every file-system error: a folder that exists, is read-only,
    is full, is a file) exits 2, a diverged training 3, an interrupt 130."""
    from .train import TrainingDiverged
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if getattr(args, "long", False):
        args.steps = DEMO_LONG_STEPS
    try:
        return args.func(args)
    except TrainingDiverged as err:
        return _fail(str(err), EXIT_DIVERGED)
    except OSError as err:
        return _fail(describe_os_error(err), EXIT_BAD_INPUT)
    except MemoryError as err:
        return _fail(f"out of memory: {err}; try smaller options", EXIT_BAD_INPUT)
    except ValueError as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return _fail("interrupted; every file written so far is complete (each write is "
                     "atomic), and 'train --resume' continues a training from its last "
                     "checkpoint", EXIT_INTERRUPTED)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
